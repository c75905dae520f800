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


#: Every top-level module or package of vhostlab and its layer: a module may
#: import its own layer and the layers below it, never one above (DESIGN.md).
LAYERS = {
    "__init__": 0, "errors": 0, "sigbus": 0, "command": 0,
    "protocol": 1, "memory": 1,
    "ring": 2,
    "dirtylog": 3,
    "backend": 4,
    "switchover": 5,
    "frontend": 6,
    "qemu": 7,
    "viz": 8, "sweep": 8, "bench": 8, "doctor": 8,
    "exercises": 9,
    "labkit": 10, "lab": 10, "demo": 10,
    "cli": 11,
    "__main__": 12,
}


def _imports(path, package):
    """The vhostlab modules ``path`` imports, relative imports resolved
    against ``package`` (its dotted package name)."""
    import ast
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                if node.module:
                    yield ".".join(base + [node.module])
                else:
                    yield from (".".join(base + [a.name]) for a in node.names)
            elif node.module:
                yield node.module
        elif isinstance(node, ast.Import):
            yield from (a.name for a in node.names)


def test_lower_layers_do_not_import_higher_ones():
    """Absolute and relative imports alike, every module ranked."""
    import pathlib
    root = pathlib.Path(vhostlab.__file__).parent
    bad, unranked = [], set()
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).parts
        layer = rel[0].removesuffix(".py")
        if layer not in LAYERS:
            unranked.add(layer)
            continue
        package = ".".join(("vhostlab",) + rel[:-1])
        for mod in _imports(path, package):
            parts = mod.split(".")
            if parts[0] != "vhostlab" or len(parts) < 2 or parts[1] == layer:
                continue
            if parts[1] not in LAYERS:
                unranked.add(parts[1])
            elif LAYERS[parts[1]] > LAYERS[layer]:
                bad.append(f"{'/'.join(rel)} (layer {LAYERS[layer]}) imports {mod} "
                           f"(layer {LAYERS[parts[1]]})")
    assert not unranked, f"modules with no layer in LAYERS: {sorted(unranked)}"
    assert not bad, "\n".join(bad)


def test_every_exception_derives_from_vhostlab_error():
    """One root: ``except vhostlab.VhostlabError`` catches whatever the kit raises."""
    import inspect
    errors = []
    for info in pkgutil.walk_packages(vhostlab.__path__, "vhostlab."):
        if info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if (inspect.isclass(obj) and issubclass(obj, BaseException)
                    and obj.__module__ == info.name
                    and not issubclass(obj, vhostlab.VhostlabError)):
                errors.append(f"{info.name}.{name}")
    assert not errors, f"exceptions outside vhostlab.VhostlabError: {errors}"
