"""Keep a kernel's on-disk numba cache honest about the files it is built from.

numba (``cache=True``) stamps a cached kernel with the source of the file that
defines it, and nothing else. A kernel is compiled together with the jitted
helpers it calls (the chain walker, the dirty-log marking, the atomics), so
after an edit to one of those files numba would go on loading the old machine
code. :func:`depends_on` folds the source of those files into the stamp: any
edit to any of them makes the cache stale and the kernel compiles afresh.

This touches one private attribute of numba's cache; with a numba that lays
its cache out differently it does nothing and numba's own stamp stays.

:func:`twin` makes a kernel's plain-Python twin from the kernel's own text
where the two differ only in the helpers they call: one text serves both, so
the twin cannot drift from the kernel. It refuses to make a twin that would
still call compiled code (a dispatcher, or an intrinsic: numba's private
``_Intrinsic`` class).
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from types import FunctionType, ModuleType

from numba.core.dispatcher import Dispatcher
from numba.core.extending import _Intrinsic

__all__ = ["depends_on", "twin"]


def depends_on(dispatcher, *modules: ModuleType):
    """Make ``dispatcher``'s cache depend on the source of ``modules`` too.
    Returns the dispatcher."""
    cache_file = getattr(getattr(dispatcher, "_cache", None), "_cache_file", None)
    if cache_file is None or not hasattr(cache_file, "_source_stamp"):
        return dispatcher
    digest = hashlib.sha256(repr(cache_file._source_stamp).encode())
    for module in modules:
        digest.update(Path(module.__file__).read_bytes())
    cache_file._source_stamp = digest.hexdigest()
    return dispatcher


def _nothing(*args):
    """What a step only compiled code needs does in the interpreter."""


def twin(kernel, **helpers):
    """The plain-Python twin of the jitted ``kernel``: its own code, run by the
    interpreter, with each helper it calls by a global name replaced by that
    helper's twin (``helpers``: name -> twin, or None for a step only compiled
    code needs, such as ``keep_alive``: the twin's call does nothing). Named
    ``<kernel>_py``.

    The names it calls are bound when the twin is made: make it after them.
    """
    code = kernel.py_func.__code__
    unknown = sorted(set(helpers) - set(code.co_names))
    if unknown:
        raise TypeError(f"twin of {kernel.__name__}: it calls no {', '.join(unknown)}")
    helpers = {name: _nothing if fn is None else fn for name, fn in helpers.items()}
    scope = dict(kernel.py_func.__globals__, **helpers)
    compiled = sorted(name for name in code.co_names
                      if isinstance(scope.get(name), (Dispatcher, _Intrinsic)))
    if compiled:     # the twin would run compiled code, or fail on a memoryview
        raise TypeError(f"twin of {kernel.__name__}: no twin given for {', '.join(compiled)}")
    fn = FunctionType(code, scope, f"{code.co_name}_py", kernel.py_func.__defaults__)
    fn.__qualname__ = fn.__name__
    fn.__module__ = kernel.py_func.__module__
    fn.__doc__ = f"Twin of :func:`{code.co_name}` (the same code, plain Python)."
    return fn
