"""An example Celery project using celery_ckeys (see README.md)."""
