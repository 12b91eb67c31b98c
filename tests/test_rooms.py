"""Which room imports which: the README's folder table, checked against the code.

The table is this test's ``MAY_IMPORT``; a room that imports another one (or a heavy library) the
table does not list fails here, so the two cannot drift apart.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ROOMS = ("store", "inference", "training", "transforms", "pipelines", "runners", "serve")
HEAVY = ("apache_beam", "torch", "transformers")
MAY_IMPORT = {  # rooms and heavy libraries, as the README's folder table says
    "store": set(),
    "inference": {"torch", "transformers"},
    "training": {"inference", "torch", "transformers"},
    "transforms": {"store", "inference", "apache_beam"},
    "pipelines": {"store", "inference", "training", "transforms", "apache_beam"},
    "runners": {*ROOMS, *HEAVY} - {"runners", "torch", "transformers"},
    "serve": {"store", "inference"},
}


def _imports(room: str) -> set[str]:
    """Rooms (``querycache.<room>``) and heavy libraries that any module of ``room`` imports, anywhere in it."""
    found = set()
    for path in (REPO / room).glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text("utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                parts = name.split(".")
                if parts[0] == "querycache" and len(parts) > 1 and parts[1] in ROOMS:
                    found.add(parts[1])
                elif parts[0] in HEAVY:
                    found.add(parts[0])
    return found - {room}


@pytest.mark.parametrize("room", ROOMS)
def test_each_room_imports_what_the_readme_table_says(room):
    assert _imports(room) <= MAY_IMPORT[room]


@pytest.mark.parametrize(
    ("module", "kept_out"),
    [
        ("querycache.store", HEAVY),
        ("querycache.inference.engine", ("apache_beam",)),
        ("querycache.serve", ("apache_beam",)),
        ("querycache.runners.cli", HEAVY),  # the light install's command line
    ],
)
def test_importing_a_room_loads_none_of_what_it_must_not(module, kept_out):
    code = f"import sys, {module}; print(sorted(set({kept_out!r}) & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
