"""Is the answer the learner's own? What a learner's function calls, read from its code.

An exercise asks for a parser, a handler or a log helper that the kit
already has. Calling the kit's own one is not an answer: such a function
passes every case and teaches nothing. :func:`delegations` reads what a
function can reach (its code object and every code object nested in it):

* the global names it uses, resolved in its module's namespace
  (``peek_header`` from the set-up cell, ``np``);
* attribute chains that start at a module (``vhostlab.protocol.parse_message``,
  ``np.frombuffer``), read from the bytecode's LOAD_GLOBAL / LOAD_ATTR runs;
* ``import`` and ``from ... import`` statements inside the function;
* closures (free variables) and default argument values;
* functions the learner wrote and calls, followed the same way.

Whatever of these comes from the kit (a module, function, method or class
whose ``__module__`` is ``vhostlab`` or under it) and is not on the
question's allowed list is a delegation. Plain data the set-up provides
(constants, enums, sets of requests) is never one: reading a constant is
not calling a parser.
"""
from __future__ import annotations

import dis
import enum
import inspect
import types
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

__all__ = ["Delegation", "delegations", "kit_object", "explain"]

KIT = "vhostlab"


@dataclass(frozen=True)
class Delegation:
    """``function`` reaches ``name`` (the kit's ``qualname``) through ``how``."""

    function: str
    name: str
    qualname: str
    how: str


def _kit_module(module: str | None) -> bool:
    return bool(module) and (module == KIT or module.startswith(KIT + "."))


def kit_object(obj: Any) -> str | None:
    """The dotted name of a kit module, function, method or class; None for
    anything else (plain data, enums, the standard library, numpy)."""
    if isinstance(obj, types.ModuleType):
        return obj.__name__ if _kit_module(obj.__name__) else None
    if isinstance(obj, enum.EnumMeta) or isinstance(obj, enum.Enum):
        return None                     # named constants: data, not behaviour
    if isinstance(obj, (types.MethodType,)):
        obj = obj.__func__
    if isinstance(obj, (types.FunctionType, types.BuiltinFunctionType, type)) \
            or callable(obj):
        module = getattr(obj, "__module__", None)
        if _kit_module(module):
            return f"{module}.{getattr(obj, '__qualname__', type(obj).__name__)}"
        if not isinstance(obj, (types.FunctionType, type)):
            # a bound method or callable instance of a kit class
            owner = type(obj)
            if _kit_module(owner.__module__) and not isinstance(obj, enum.Enum):
                return f"{owner.__module__}.{owner.__qualname__}"
    return None


def _codes(code: types.CodeType) -> Iterator[types.CodeType]:
    yield code
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _codes(const)


def _chains(code: types.CodeType) -> Iterator[tuple[str, tuple[str, ...]]]:
    """(first global, attribute names...) for each LOAD_GLOBAL/LOAD_NAME
    followed by LOAD_ATTR/LOAD_METHOD runs, and ("import", dotted) items."""
    run: list[str] | None = None
    module = ""
    for ins in dis.get_instructions(code):
        op = ins.opname
        if op in ("LOAD_GLOBAL", "LOAD_NAME"):
            if run:
                yield run[0], tuple(run[1:])
            run = [ins.argval]
        elif op in ("LOAD_ATTR", "LOAD_METHOD") and run is not None:
            run.append(ins.argval)
        else:
            if run:
                yield run[0], tuple(run[1:])
            run = None
            if op == "IMPORT_NAME":
                module = str(ins.argval)
                yield "import", (module,)
            elif op == "IMPORT_FROM" and ins.argval:
                yield "from", (f"{module}.{ins.argval}",)
    if run:
        yield run[0], tuple(run[1:])


def _resolve(start: Any, attrs: Iterable[str]) -> Iterator[tuple[Any, str]]:
    """Each object along an attribute chain, with the chain's text so far."""
    obj, path = start, []
    for attr in attrs:
        try:
            obj = getattr(obj, attr)
        except Exception:
            return
        path.append(attr)
        yield obj, ".".join(path)


def _learner_function(obj: Any, namespace: dict) -> bool:
    return isinstance(obj, types.FunctionType) and obj.__globals__ is namespace


def delegations(fn: Callable, allowed: Iterable[str] = (), *,
                namespace: dict | None = None,
                not_followed: Iterable[str] = ()) -> list[Delegation]:
    """What `fn` (and the learner's functions it calls) takes from the kit.

    ``allowed``: names the question provides on purpose (``xchg64``), as the
    learner's code spells them; ``not_followed``: the learner's functions not
    to look into (answers to other questions, judged there). Returns one Delegation per kit object
    reached, in the order met; empty when the answer is the learner's own.
    """
    allowed = set(allowed)
    skip = set(not_followed)
    found: list[Delegation] = []
    seen_fn: set[int] = set()
    seen_name: set[str] = set()

    def note(where: str, obj: Any, spelled: str, how: str) -> None:
        qual = kit_object(obj)
        if qual is None or spelled.split(".")[0] in allowed or spelled in allowed:
            return
        if qual not in seen_name:
            seen_name.add(qual)
            found.append(Delegation(where, spelled, qual, how))

    def visit(func: Any) -> None:
        func = inspect.unwrap(func) if callable(func) else func
        if isinstance(func, types.MethodType):
            func = func.__func__
        if not isinstance(func, types.FunctionType) or id(func) in seen_fn:
            return
        seen_fn.add(id(func))
        ns = namespace if namespace is not None else func.__globals__
        where = func.__name__
        builtins = ns.get("__builtins__", {})
        for value in (func.__defaults__ or ()) + tuple((func.__kwdefaults__ or {}).values()):
            note(where, value, repr(value), "a default argument value")
        for cell in func.__closure__ or ():
            try:
                value = cell.cell_contents
            except ValueError:
                continue
            note(where, value, getattr(value, "__name__", "a closure variable"),
                 "a variable from an enclosing function")
            if _learner_function(value, ns) and value.__name__ not in skip:
                visit(value)
        for code in _codes(func.__code__):
            chains = list(_chains(code))
            from_modules = {a[0].rsplit(".", 1)[0] for f, a in chains if f == "from"}
            for first, attrs in chains:
                if first in ("import", "from"):
                    name = attrs[0]
                    if first == "import" and name in from_modules:
                        continue                  # named by what it imports from it
                    if _kit_module(name) and name not in allowed \
                            and name.rsplit(".", 1)[-1] not in allowed:
                        if name not in seen_name:
                            seen_name.add(name)
                            found.append(Delegation(where, name, name, "an import inside it"))
                    continue
                if first in ns:
                    start = ns[first]
                elif isinstance(builtins, dict) and first in builtins:
                    continue
                else:
                    continue
                if _learner_function(start, ns) and first not in skip:
                    visit(start)
                # the deepest kit object the chain reaches names the delegation best
                deepest = (start, first, "a global name")
                for obj, path in _resolve(start, attrs):
                    if kit_object(obj) is not None:
                        deepest = (obj, f"{first}.{path}", "an attribute")
                note(where, *deepest)
    visit(fn)
    return found


def explain(target: str, found: list[Delegation], what: str = "") -> str:
    """The learner's message: what was called, and why that scores 0."""
    names = ", ".join(f"`{d.name}` ({d.qualname}, {d.how})" if d.name != d.qualname
                      else f"`{d.name}` ({d.how})" for d in found[:3])
    via = found[0]
    inside = "" if via.function == target else f" (through your `{via.function}`)"
    return (f"`{target}` uses {names}{inside}: that is the kit's own code, not yours, "
            f"so this question scores 0 as it stands. {what}".strip()
            + " Write the steps yourself with the building blocks the set-up cell gives.")
