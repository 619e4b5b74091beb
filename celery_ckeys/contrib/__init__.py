"""Optional integrations: ``celery_ckeys.contrib.pytest`` (the ``ckeys`` pytest plugin) and
``celery_ckeys.contrib.testing`` (what it is built on, usable without pytest)."""
