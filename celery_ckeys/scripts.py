"""The Lua scripts as Redis runs them: each script after the parts of the shared library it
uses (``lua/core.lua``, then ``lua/lib.lua``), and no more.

Redis runs a script's whole text on every call, so each helper it defines costs every call
(a closure, a table): all of core.lua and lib.lua cost ~17 us a call on Redis 7.0, more
than most scripts then do. A definition is kept only when the script, or a definition kept
for it, names it; a Lua local can only name those defined before it, so one pass from the
end finds them all. A name missed would fail every call of that script at once (Redis
refuses globals), which the tests would show; a name kept that is not needed costs only
time.
"""

from __future__ import annotations

import re
from importlib import resources

#: The shared library, in the order its definitions depend on each other.
LIBRARY = ("core", "lib")

# a top-level definition starts at column 0: "local function f(" or "local A, B = ..."
_DEFINITION = re.compile(r"^local (?:function )?([\w, ]+?)\s*[=(]", re.M)
_COMMENT = re.compile(r"(?:^|(?<=\s))--[^\n]*")
_WORD = re.compile(r"[A-Za-z_]\w*")

_SOURCES: dict[str, str] = {}


def read_lua(name: str) -> str:
    return (resources.files("celery_ckeys") / "lua" / f"{name}.lua").read_text(encoding="utf-8")


def _definitions(source: str) -> list[tuple[set[str], str]]:
    """The top-level definitions of a library file: the names each defines, and its text
    (up to the next definition; the file's opening comment is dropped)."""
    starts = list(_DEFINITION.finditer(source))
    out = []
    for n, match in enumerate(starts):
        end = starts[n + 1].start() if n + 1 < len(starts) else len(source)
        names = {name.strip() for name in match.group(1).split(",")}
        out.append((names, source[match.start():end].rstrip("\n") + "\n"))
    return out


def _words(text: str) -> set[str]:
    return set(_WORD.findall(_COMMENT.sub("", text)))


def script_source(name: str) -> str:
    """Script ``name`` (``lua/<name>.lua``) after the library definitions it uses."""
    if name not in _SOURCES:
        body = read_lua(name)
        library = [d for part in LIBRARY for d in _definitions(read_lua(part))]
        needed = _words(body)
        kept = []
        for names, text in reversed(library):
            if names & needed:
                kept.append(text)
                needed |= _words(text)
        _SOURCES[name] = "".join(reversed(kept)) + body
    return _SOURCES[name]
