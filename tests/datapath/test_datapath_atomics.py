"""The ordering intrinsics emit the LLVM atomics they promise, the kernels use
them where the spec needs them, and each behaves like its twin."""
from __future__ import annotations

import re

import numpy as np
import pytest
from numba import njit

from vhostlab.ring import atomics
from vhostlab.ring.atomics import (atomic_or, atomic_or_py, atomic_xchg, atomic_xchg_py,
                                   borrow, fence_seq_cst, load_acquire, load_acquire_py,
                                   load_relaxed, load_relaxed_py, smp_load_acquire, smp_mb,
                                   smp_store_release, store_release, store_release_py)
from vhostlab.ring.tx import vring_tx_burst
from vhostlab.ring.rx import vring_rx_burst
from vhostlab.dirtylog import vhost_dev_sync_region
from vhostlab.ring import FrameArena

from test_datapath_support import Rig


@njit
def _all_ops(a16, a8, a64):
    x = load_acquire(a16, 1)
    y = load_relaxed(a16, 2)
    store_release(a16, 3, x + y)
    atomic_or(a8, 0, np.uint8(0x81))
    old_x = atomic_xchg(a64, 0, np.uint64(5))
    fence_seq_cst()
    return x, y, old_x


# typed pointers (i16*) in older LLVM, opaque ones (ptr) in newer
PTR = r"(?:i\d+\*|ptr)"


def _llvm(dispatcher) -> str:
    return dispatcher.inspect_llvm(dispatcher.signatures[0])


def test_intrinsics_emit_the_llvm_atomics():
    a16, a8, a64 = np.arange(8, dtype=np.uint16), np.zeros(4, np.uint8), np.full(2, 9, np.uint64)
    assert _all_ops(a16, a8, a64) == (1, 2, 9)
    ir = _llvm(_all_ops)
    assert re.search(rf"load atomic i16, {PTR} .* acquire, align 2", ir)
    assert re.search(rf"load atomic i16, {PTR} .* monotonic, align 2", ir)
    assert re.search(r"store atomic i16 .* release, align 2", ir)
    assert re.search(rf"atomicrmw or {PTR} .* release", ir)
    assert re.search(rf"atomicrmw xchg {PTR} .* seq_cst", ir)
    assert "fence seq_cst" in ir
    assert a16[3] == 3 and a8[0] == 0x81 and a64[0] == 5


@pytest.mark.parametrize("kernel, needles", [
    (vring_tx_burst, [rf"load atomic i16, {PTR} .* acquire",        # avail->idx
                      r"store atomic i16 .* release",               # used->idx
                      rf"load atomic i64, {PTR} .* monotonic",      # desc.addr, read once
                      r"fence seq_cst"]),                           # before notify decision
    # The dirty log: an atomic OR whose old value is used (to count the bits it
    # set) may be lowered to a compare-exchange loop, still with release.
    (vring_rx_burst, [rf"load atomic i16, {PTR} .* acquire", r"store atomic i16 .* release",
                      rf"(atomicrmw or {PTR}|cmpxchg {PTR}) .* release"]),
    (vhost_dev_sync_region, [rf"atomicrmw xchg {PTR} .* seq_cst"]),
])
def test_kernels_order_their_ring_accesses(kernel, needles):
    fresh = njit(nogil=True)(kernel.py_func)       # the cached kernel cannot be inspected
    rig = Rig(num=4)
    try:
        if kernel is vhost_dev_sync_region:
            args = (np.zeros(2, np.uint64), 0, 1, np.zeros(128, np.int64))
        else:
            arena = FrameArena(4096, 4)
            arena.append(b"x" * 10)
            host, table = rig.memory.kernel_args()
            common = (host, table, rig.vq.state, np.zeros(64, np.uint8), arena.buf,
                      arena.offsets, arena.lengths)
            args = common + ((0, 4) if kernel is vring_tx_burst else (1, 10, 0))
        fresh(*args)
        del args
    finally:
        rig.close()
    ir = _llvm(fresh)
    for needle in needles:
        assert re.search(needle, ir), needle


def test_python_callable_wrappers_and_twins_agree():
    a = np.zeros(4, np.uint16)
    smp_store_release(a, 2, np.uint16(513))
    assert smp_load_acquire(a, 2) == 513 == load_acquire_py(a, 2) == load_relaxed_py(a, 2)
    smp_mb()
    store_release_py(a, 1, 7)
    assert a[1] == 7
    b = np.array([0x10], np.uint8)
    assert atomic_or_py(b, 0, 0x01) == 0x10 and b[0] == 0x11
    c = np.array([3], np.uint64)
    assert atomic_xchg_py(c, 0, 0) == 3 and c[0] == 0
    assert atomics.fence_seq_cst_py() is None


@njit
def _through_borrow(a):
    b = borrow(a)
    b[0] = 42
    return b.size, b[1]


def test_borrow_is_the_same_memory():
    a = np.array([1, 2, 3], np.int64)
    assert _through_borrow(a) == (3, 2)
    assert a[0] == 42
    assert atomics.borrow_py(a) is a
