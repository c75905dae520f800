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

__all__ = ["builtin_guest_ring", "vring_view"]


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


def vring_view(guest: Any, backend: Any, queue: int, title: str | None = None) -> VirtqueueView:
    """The view of virtqueue ``queue``: the ring as guest memory holds it now, and
    the back-end's own state (``last_avail_idx``, errors) beside it.

    ``guest`` is the built-in guest or the QEMU guest driver (which reads the
    ring over qtest); both are read afresh at every display.
    """
    if hasattr(guest, "ring_state"):                     # the QEMU guest driver
        def ring() -> Any:
            return guest.ring_state(queue)
    else:
        ring = builtin_guest_ring(guest, queue)

    def state() -> Any:
        return backend.snapshot(trace=False).vrings[queue]
    kind = "RX" if queue % 2 == 0 else "TX"
    return VirtqueueView(ring, state=state, title=title or f"queue {queue} ({kind})")
