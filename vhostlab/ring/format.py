"""What a back-end needs from a ring, whatever its format: the ring seam.

A vhost-user back-end drives each virtqueue through the same few steps,
whatever the layout in guest memory (virtio spec 2.7 split, 2.8 packed):

    map        SET_VRING_NUM / SET_VRING_ADDR: the ring's size and where it lies
    base       SET_VRING_BASE / GET_VRING_BASE: where the device resumes
    burst      after a kick: TX chains into a FrameArena, an arena into RX buffers
    stop       GET_VRING_BASE: the back-end stops touching the ring

:class:`DeviceRing` names those steps; :data:`RING_FORMATS` maps a format's
name to the class that implements them (``split``: :class:`.virtqueue.Virtqueue`,
the one module that wraps the split-ring kernels; ``packed``:
:class:`.packed_virtqueue.PackedVirtqueue`). The
back-end makes its rings with :func:`make_ring` and calls nothing else, so a
packed ring is a sibling module registered here, with no change to the
back-end, the front-end or the views.

:class:`RingState` is the state vhost-user gives every ring (vhost-user.rst
"Ring states"), held by the back-end as one value per ring.
"""
from __future__ import annotations

import enum
from typing import Protocol, runtime_checkable

from .errors import RingConfigError
from .packed_virtqueue import PackedVirtqueue
from .virtqueue import Virtqueue

__all__ = ["RingState", "DeviceRing", "RING_FORMATS", "make_ring", "ring_format"]


class RingState(enum.Enum):
    """One ring's state, as vhost-user.rst "Ring states" and libvhost-user name it.

    "Rings have two independent states: started/stopped, and
    enabled/disabled. While a ring is stopped, the back-end must not process
    the ring at all, regardless of whether it is enabled or disabled. The
    enabled/disabled state should still be tracked, though" (hence
    STOPPED_ENABLED). libvhost-user keeps the two as ``vq->started`` and
    ``vq->enable``; BROKEN is the ring a guest broke a rule on (libvhost-user's
    ``dev->broken``, per ring here): it is not processed until SET_VRING_BASE
    or SET_VRING_NUM configures it afresh.
    """

    STOPPED = "stopped"
    STOPPED_ENABLED = "stopped (enabled once started)"
    STARTED_DISABLED = "started but disabled"
    STARTED_ENABLED = "started and enabled"
    BROKEN = "broken"

    @property
    def started(self) -> bool:
        return self is RingState.STARTED_DISABLED or self is RingState.STARTED_ENABLED

    @property
    def enabled(self) -> bool:
        return self is RingState.STARTED_ENABLED or self is RingState.STOPPED_ENABLED

    @staticmethod
    def of(started: bool, enabled: bool) -> "RingState":
        if started:
            return RingState.STARTED_ENABLED if enabled else RingState.STARTED_DISABLED
        return RingState.STOPPED_ENABLED if enabled else RingState.STOPPED

    def start(self) -> "RingState":
        """A kick fd came (SET_VRING_KICK): "The back-end must start ring"."""
        return self if self is RingState.BROKEN else RingState.of(True, self.enabled)

    def stop(self) -> "RingState":
        """GET_VRING_BASE: "stop ring"; the enabled state is kept. A broken ring stays so."""
        return self if self is RingState.BROKEN else RingState.of(False, self.enabled)

    def enable(self, on: bool) -> "RingState":
        """SET_VRING_ENABLE, or a front-end without VHOST_USER_F_PROTOCOL_FEATURES."""
        return self if self is RingState.BROKEN else RingState.of(self.started, on)

    def __str__(self) -> str:
        return self.value


@runtime_checkable
class DeviceRing(Protocol):
    """The device side of one virtqueue: what the back-end calls, and nothing more."""

    index: int
    name: str

    @property
    def num(self) -> int: ...
    @property
    def last_avail_idx(self) -> int: ...
    @property
    def used_idx(self) -> int: ...
    @property
    def broken(self) -> bool: ...
    @property
    def error(self): ...
    # the counters a service reads (what its bursts did so far)
    frames: int
    bytes: int
    dropped: int
    logged: int
    oversized: int
    avail_pending: int

    # map
    @staticmethod
    def area_sizes(num: int) -> tuple[int, int, int]:
        """Bytes of the three areas SET_VRING_ADDR points at, for ``num`` entries."""
    def set_num(self, num: int) -> None: ...
    def set_addr(self, desc: int, avail: int, used: int, log_guest_addr: int = 0,
                 flags: int = 0, *, memory=None) -> None: ...
    def set_event_idx(self, enabled: bool) -> None: ...
    # base
    def set_base(self, num: int) -> None: ...
    def get_base(self) -> int: ...
    def sync_used_idx(self, memory) -> None: ...
    # burst
    def begin_service(self, desc_budget: int, max_chain: int | None = None) -> None: ...
    def service_spent(self) -> bool: ...
    def tx_burst(self, memory, arena, *, log=None, hdr_len: int = 0,
                 max_frames: int | None = None, impl: str = "numba") -> int: ...
    def rx_burst(self, memory, arena, *, log=None, hdr_len: int = 10,
                 mrg_rxbuf: bool = False, impl: str = "numba") -> int: ...
    def take_call(self) -> bool: ...
    # stop
    def stop(self) -> None: ...


#: Ring formats by name: split (2.7) and packed (2.8, VIRTIO_F_RING_PACKED).
RING_FORMATS: dict[str, type] = {"split": Virtqueue, "packed": PackedVirtqueue}


def ring_format(fmt: str, index: int = 0) -> type:
    """The class implementing ring format ``fmt`` ("split" or "packed")."""
    try:
        return RING_FORMATS[fmt]
    except KeyError:
        raise RingConfigError(f"queue {index}: ring format {fmt!r}: known formats are "
                              f"{sorted(RING_FORMATS)}", queue=index, field="format",
                              value=fmt, limit=sorted(RING_FORMATS)) from None


def make_ring(fmt: str, index: int, name: str = "") -> DeviceRing:
    """A fresh ring of format ``fmt`` ("split" or "packed")."""
    return ring_format(fmt, index)(index, name)
