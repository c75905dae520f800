"""Memory-ordering primitives for the rings and the dirty log, as numba intrinsics.

The guest's driver and the back-end share a split virtqueue without a lock.
Two rules keep them in step (virtio 1.x, 2.7.13 "Supplying Buffers to The
Device" and 2.7.8 "The Virtqueue Used Ring"):

* The driver writes descriptors and the avail ring entry, then avail->idx.
  The device reads avail->idx, and only after it the entries it covers: an
  **acquire** load. A plain load is wrong. The compiler assumes nobody else
  writes memory behind its back, so it may hoist a plain load of avail->idx out
  of a loop (and never see the guest's update) or schedule the descriptor
  reads before it; on weakly ordered CPUs (arm64, POWER) the hardware itself
  may satisfy later loads first. Either way the device would read a descriptor
  the driver has not finished writing.
* The device writes used elements, then used->idx: a **release** store, so
  the driver never sees the new index before the elements it covers.

Linux's virtio_ring.c calls these virtio_load_acquire / virtio_store_release
(smp_load_acquire / smp_store_release); libvhost-user and DPDK use C11
atomics. numba has none, so this module emits the LLVM instructions through
``numba.extending.intrinsic``:

=====================  ========================================  ============
intrinsic              LLVM                                      used for
=====================  ========================================  ============
load_acquire(a, i)     ``load atomic ... acquire``               avail->idx, used->idx
store_release(a, i, v) ``store atomic ... release``              used->idx, avail->idx
load_relaxed(a, i)     ``load atomic ... monotonic``             descriptor fields
atomic_or(a, i, v)     ``atomicrmw or ... release``              dirty-log bits
atomic_xchg(a, i, v)   ``atomicrmw xchg ... seq_cst``            dirty-log sync
fence_seq_cst()        ``fence seq_cst``                         notify decisions
=====================  ========================================  ============

``load_relaxed`` reads a guest-owned value exactly once: a plain load could
legally be repeated by the compiler, and the guest may change the descriptor
between the check and the use (TOCTOU). ``atomic_or`` is release so that the
data written to a page is visible before its dirty bit: QEMU clears the log
concurrently with an atomic exchange and then copies the page.
``fence_seq_cst`` orders a store before a later load (release and acquire do
not), which the "should I notify?" decisions of EVENT_IDX need.

Each intrinsic takes a numpy array and an element index and works on that
element with the array's dtype (uint8 to uint64, naturally aligned). They do
no bounds checking: the caller checks first. They only work inside numba code;
``smp_load_acquire``, ``smp_store_release`` and ``smp_mb`` are jitted
functions Python code (the built-in guest driver) can call. Every intrinsic
has a plain-Python twin ``<name>_py`` doing a plain numpy access: the CPython
interpreter does not reorder one bytecode's memory accesses with the next
one's, and x86 keeps stores in order (TSO), which is enough for the twins'
teaching and testing use.
"""
from __future__ import annotations

from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

__all__ = [
    "load_acquire", "store_release", "load_relaxed", "atomic_or", "atomic_xchg",
    "fence_seq_cst", "borrow", "borrow_py", "keep_alive",
    "load_acquire_py", "store_release_py", "load_relaxed_py", "atomic_or_py",
    "atomic_xchg_py", "fence_seq_cst_py",
    "smp_load_acquire", "smp_store_release", "smp_mb",
]


def _element_pointer(context, builder, aryty, ary_value, index):
    ary = context.make_array(aryty)(context, builder, ary_value)
    return cgutils.get_item_pointer(context, builder, aryty, ary, [index])


def _is_uint_array(arr) -> bool:
    return (isinstance(arr, types.Array) and isinstance(arr.dtype, types.Integer)
            and arr.ndim == 1)


def _load(ordering: str):
    def typer(typingctx, arr, index):
        if not _is_uint_array(arr):
            return None

        def codegen(context, builder, sig, args):
            ptr = _element_pointer(context, builder, sig.args[0], args[0], args[1])
            return builder.load_atomic(ptr, ordering, ptr.type.pointee.width // 8)
        return arr.dtype(arr, types.intp), codegen
    typer.__name__ = f"load_{ordering}"
    return typer


load_acquire = intrinsic(_load("acquire"))
load_acquire.__doc__ = "``arr[index]`` read with acquire ordering."
load_relaxed = intrinsic(_load("monotonic"))
load_relaxed.__doc__ = "``arr[index]`` read exactly once (atomic, no ordering)."


def _is_store(arr, value) -> bool:
    return _is_uint_array(arr) and isinstance(value, types.Integer)


def _element_and_value(context, builder, sig, args):
    """The element's pointer, and the value cast to the array's dtype."""
    aryty = sig.args[0]
    ptr = _element_pointer(context, builder, aryty, args[0], args[1])
    return ptr, context.cast(builder, args[2], sig.args[2], aryty.dtype)


@intrinsic
def store_release(typingctx, arr, index, value):
    """``arr[index] = value`` with release ordering."""
    if not _is_store(arr, value):
        return None

    def codegen(context, builder, sig, args):
        ptr, val = _element_and_value(context, builder, sig, args)
        builder.store_atomic(val, ptr, "release", ptr.type.pointee.width // 8)
        return context.get_dummy_value()
    return types.void(arr, types.intp, value), codegen


def _rmw(op: str, ordering: str):
    def typer(typingctx, arr, index, value):
        if not _is_store(arr, value):
            return None

        def codegen(context, builder, sig, args):
            ptr, val = _element_and_value(context, builder, sig, args)
            return builder.atomic_rmw(op, ptr, val, ordering)
        return arr.dtype(arr, types.intp, value), codegen
    typer.__name__ = f"atomic_{op}"
    return typer


atomic_or = intrinsic(_rmw("or", "release"))
atomic_or.__doc__ = "``arr[index] |= value`` atomically (release); returns the old value."
atomic_xchg = intrinsic(_rmw("xchg", "seq_cst"))
atomic_xchg.__doc__ = "Swap ``arr[index]`` with ``value`` atomically; returns the old value."


@intrinsic
def fence_seq_cst(typingctx):
    """A full memory barrier (Linux's smp_mb / virtio_mb)."""
    def codegen(context, builder, sig, args):
        builder.fence("seq_cst")
        return context.get_dummy_value()
    return types.void(), codegen


@intrinsic
def borrow(typingctx, arr):
    """The same array without its reference count (meminfo set to NULL).

    numba increments and decrements (atomically) the reference count of every
    array a non-inlined jitted function receives; in a per-descriptor loop
    that costs more than the work itself. A borrowed array costs nothing to
    pass around. It is only valid while the original is alive: borrow a
    kernel's own arguments (the caller holds them for the whole call), never
    a temporary.
    """
    if not isinstance(arr, types.Array):
        return None

    def codegen(context, builder, sig, args):
        ary = context.make_array(sig.args[0])(context, builder, value=args[0])
        ary.meminfo = context.get_constant_null(types.MemInfoPointer(types.voidptr))
        ary.parent = context.get_constant_null(types.pyobject)
        return ary._getvalue()
    return arr(arr), codegen


def borrow_py(arr):
    """Twin of :func:`borrow`: the array itself."""
    return arr


@intrinsic
def keep_alive(typingctx, arr):
    """Do nothing, but count as a use of ``arr``.

    numba frees an array after its last use; a kernel that borrows an array it
    allocated itself calls ``keep_alive(owner)`` after the last use of the
    borrowed one, so the owner lives until then.
    """
    if not isinstance(arr, types.Array):
        return None

    def codegen(context, builder, sig, args):
        return context.get_dummy_value()
    return types.void(arr), codegen


# --- plain-Python twins: plain numpy accesses (see the module docstring) ---
def load_acquire_py(arr, index):
    """Twin of :func:`load_acquire`: a plain read."""
    return arr[index]


def load_relaxed_py(arr, index):
    """Twin of :func:`load_relaxed`: a plain read."""
    return arr[index]


def store_release_py(arr, index, value):
    """Twin of :func:`store_release`: a plain write."""
    arr[index] = value


def atomic_or_py(arr, index, value):
    """Twin of :func:`atomic_or`: read, or, write (not atomic)."""
    old = arr[index]
    arr[index] = old | value
    return old


def atomic_xchg_py(arr, index, value):
    """Twin of :func:`atomic_xchg`: read, write (not atomic)."""
    old = arr[index]
    arr[index] = value
    return old


def fence_seq_cst_py():
    """Twin of :func:`fence_seq_cst`: nothing to do in the interpreter."""


# --- callable from Python, with real ordering (for the guest-side driver) ---
@njit(cache=True, nogil=True)
def smp_load_acquire(arr, index):
    """``arr[index]`` with acquire ordering, callable from Python."""
    return load_acquire(arr, index)


@njit(cache=True, nogil=True)
def smp_store_release(arr, index, value):
    """``arr[index] = value`` with release ordering, callable from Python."""
    store_release(arr, index, value)


@njit(cache=True, nogil=True)
def smp_mb():
    """A full memory barrier, callable from Python."""
    fence_seq_cst()

