"""``python -m celery_ckeys.contrib.launch -A APP worker ...``: ``celery -A APP worker ...``
for ``celery_ckeys.contrib.testing.CeleryWorkers``.

Before Celery's own command line takes over, it applies the settings in
``$CKEYS_TEST_SETTINGS`` (JSON) to the app and, with ``$CKEYS_TEST_RECORDER`` (JSON
``[url, key]``), installs the recorder, so that the pool processes inherit both. Celery's
``-A`` then finds the same app object.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Optional, Sequence


def _app_spec(argv: Sequence[str]) -> Optional[str]:
    for i, arg in enumerate(argv):
        if arg in ("-A", "--app") and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--app="):
            return arg.split("=", 1)[1]
    return None


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    sys.argv = ["celery", *args]
    from celery import maybe_patch_concurrency

    maybe_patch_concurrency(sys.argv)
    settings = os.environ.get("CKEYS_TEST_SETTINGS")
    spec = _app_spec(args)
    if settings and spec:
        from celery.app.utils import find_app

        find_app(spec).conf.update(json.loads(settings))
    recorder = os.environ.get("CKEYS_TEST_RECORDER")
    if recorder:
        from .testing import install_recorder

        url, key = json.loads(recorder)
        install_recorder(url, key)
    from celery.bin.celery import main as celery_main

    sys.exit(celery_main())


if __name__ == "__main__":
    main()
