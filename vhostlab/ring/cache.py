"""Keep a kernel's on-disk numba cache honest about the files it is built from.

numba (``cache=True``) stamps a cached kernel with the source of the file that
defines it, and nothing else. A kernel is compiled together with the jitted
helpers it calls (the chain walker, the dirty-log marking, the atomics), so
after an edit to one of those files numba would go on loading the old machine
code. :func:`depends_on` folds the source of those files into the stamp: any
edit to any of them makes the cache stale and the kernel compiles afresh.

This touches one private attribute of numba's cache; with a numba that lays
its cache out differently it does nothing and numba's own stamp stays.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from types import ModuleType

__all__ = ["depends_on"]


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
