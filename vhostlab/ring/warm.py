"""Compile (or load from numba's cache) every ring kernel before a device serves.

numba compiles a kernel on its first call. A back-end that let that happen
inside its message loop would go silent for the length of the compile (about
37 s of CPU for both formats with an empty cache, measured) at the first
request that starts a ring: QEMU waits, a learner's cell hangs, and a
front-end that times out its replies gives up. So the server calls
:func:`load_kernels` before it opens its socket, the way DPDK has its
datapath ready before it creates the vhost-user socket.

Each format's TX and RX burst runs once on an empty ring of 8 in a small
memfd, through the same :class:`DeviceRing` methods the device uses, so the
kernels are compiled for exactly the argument types the device passes. The
work is done once per process; later calls return at once.
"""
from __future__ import annotations

import threading

from ..memory import GuestMemory
from .arena import FrameArena
from .format import RING_FORMATS, make_ring

__all__ = ["load_kernels", "kernels_loaded"]

_RAM = 1 << 20
_NUM = 8
_lock = threading.Lock()
_loaded = False


def kernels_loaded() -> bool:
    """Whether :func:`load_kernels` has run in this process."""
    return _loaded


def load_kernels() -> None:
    """Call each ring format's TX and RX kernel once (nothing is available, so
    nothing moves); the first call in a process compiles or loads them."""
    global _loaded
    with _lock:
        if _loaded:
            return
        memory = GuestMemory.allocate(_RAM, layout="flat")
        try:
            arena = FrameArena(4096, 4)
            for fmt in RING_FORMATS:
                vq = make_ring(fmt, 0, "warm-up")
                vq.set_num(_NUM)
                desc, avail, _ = vq.area_sizes(_NUM)
                base = 0x1000
                vq.set_addr(base, base + desc, (base + desc + avail + 0xFFF) & ~0xFFF,
                            memory=memory)
                vq.begin_service(64)
                vq.tx_burst(memory, arena, hdr_len=12)
                arena.clear()
                arena.append(bytes(60))
                vq.rx_burst(memory, arena, hdr_len=12)
                arena.clear()
        finally:
            memory.close()
        _loaded = True
