"""Every package says what it exports (`__all__`), and says it truthfully."""
from __future__ import annotations

import importlib
import pkgutil
import types

import pytest

import vhostlab


def _packages():
    yield "vhostlab"
    for info in pkgutil.iter_modules(vhostlab.__path__):
        if info.ispkg:
            yield f"vhostlab.{info.name}"


@pytest.mark.parametrize("name", sorted(_packages()))
def test_all_matches_public_names(name):
    pkg = importlib.import_module(name)
    exported = getattr(pkg, "__all__", None)
    assert exported is not None, f"{name} has no __all__"
    missing = [n for n in exported if not hasattr(pkg, n)]
    assert not missing, f"{name}.__all__ names what it does not define: {missing}"
    public = {n for n, v in vars(pkg).items()
              if not n.startswith("_") and not isinstance(v, types.ModuleType)
              and getattr(v, "__module__", name).startswith("vhostlab")}
    unlisted = sorted(public - set(exported))
    assert not unlisted, f"{name} defines public names missing from __all__: {unlisted}"


def test_lower_layers_do_not_import_higher_ones():
    """protocol < memory < ring/dirtylog < backend < frontend/qemu < viz/exercises (DESIGN.md)."""
    import ast
    import pathlib
    rank = {"protocol": 0, "memory": 1, "ring": 2, "dirtylog": 2, "backend": 3,
            "frontend": 4, "qemu": 4, "viz": 5, "exercises": 5, "labkit": 6, "cli": 7}
    root = pathlib.Path(vhostlab.__file__).parent
    bad = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root).parts
        layer = rel[0].removesuffix(".py")
        if layer not in rank:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            mods = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                mods = [node.module]
            elif isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            for mod in mods:
                parts = mod.split(".")
                if parts[0] == "vhostlab" and len(parts) > 1 and parts[1] in rank:
                    if rank[parts[1]] > rank[layer]:
                        bad.append(f"{'/'.join(rel)} imports {mod}")
    assert not bad, "\n".join(bad)
