"""A lab guest's virtqueue, read afresh at every display, with the back-end's state beside it.

The ring is drawn by ``VirtqueueView``; this module only says where a lab's
ring comes from: guest memory and the driver's own counters for the built-in
guest (``vhostlab.frontend``), the ring read over qtest for the QEMU guest
driver (``vhostlab.qemu``), and ``last_avail_idx`` and errors from the
back-end's snapshot.
"""
from __future__ import annotations

from typing import Any, Callable

from .virtqueue import VirtqueueView

__all__ = ["builtin_guest_ring", "packed_guest_ring", "vring_view"]


def builtin_guest_ring(guest: Any, queue: int) -> Callable[[], dict]:
    """A reader of ring ``queue`` of the built-in guest: guest memory, and what only
    the driver knows (``last_used_idx``, the chains in flight)."""
    from vhostlab.ring import vring_views
    q = guest.queues[queue]

    def ring() -> dict:
        return {"views": vring_views(guest.memory, q.num, q.desc, q.avail, q.used),
                "last_used_idx": q.last_used_idx, "in_flight": tuple(q.inflight),
                "gpas": {"desc": q.desc, "avail": q.avail, "used": q.used}}
    return ring


def packed_guest_ring(guest: Any, queue: int, backend: Any = None) -> Callable[[], Any]:
    """A reader of packed ring ``queue`` of the built-in guest: the descriptor ring
    and event areas from guest memory, the driver's positions from its driver,
    the device's from ``backend``'s snapshot (when given and the ring is mapped)."""
    from .packed import packed_ring_copy
    q = guest.queues[queue]

    def ring() -> Any:
        drv = q.driver
        device = None
        if backend is not None:
            state = backend.snapshot(trace=False).vrings[queue]
            if state.avail_wrap_counter is not None and state.used_idx is not None:
                device = (state.last_avail_idx & 0x7FFF, state.avail_wrap_counter,
                          state.used_idx & 0x7FFF, state.used_wrap_counter)
        return packed_ring_copy(guest.memory, q.num,
                                {"desc": q.desc, "driver": q.avail, "device": q.used},
                                device=device, index=queue,
                                driver=(drv.next_avail_idx, drv.avail_wrap_counter,
                                        drv.last_used_idx, drv.used_wrap_counter))
    return ring


def vring_view(guest: Any, backend: Any, queue: int, title: str | None = None) -> VirtqueueView:
    """The view of virtqueue ``queue``: the ring as guest memory holds it now, and
    the back-end's own state (``last_avail_idx``, errors) beside it.

    ``guest`` is the built-in guest or the QEMU guest driver (which reads the
    ring over qtest); both are read afresh at every display.
    """
    kind = "RX" if queue % 2 == 0 else "TX"
    if getattr(guest, "ring", "split") == "packed":      # the built-in guest, packed rings
        from .packed import PackedVirtqueueView
        return PackedVirtqueueView(source=packed_guest_ring(guest, queue, backend),
                                   title=title or f"queue {queue} ({kind}, packed)")
    if hasattr(guest, "ring_state"):                     # the QEMU guest driver
        def ring() -> Any:
            return guest.ring_state(queue)
    else:
        ring = builtin_guest_ring(guest, queue)

    def state() -> Any:
        return backend.snapshot(trace=False).vrings[queue]
    return VirtqueueView(ring, state=state, title=title or f"queue {queue} ({kind})")
