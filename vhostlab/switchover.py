"""The rings and the log at a migration's switch-over, as the back-ends saw them.

Theory of operation
-------------------
When the source VM stops, ``vhost_dev_stop`` sends GET_VRING_BASE for each
ring: the back-end stops the ring and answers ``last_avail_idx``. The
destination's ``vhost_dev_start`` sends SET_VRING_BASE with that number,
then SET_VRING_ADDR and SET_VRING_KICK, and the ring runs again there. The
front-end cannot look at a ring at those moments (a real QEMU is blocked
waiting for the reply), but the back-end can: it has guest RAM mapped.

:class:`SwitchoverRecorder` wraps a back-end server's handlers (whatever
they are, the kit's or a learner's) so that each ring is copied out of guest
memory

- on the source, just before GET_VRING_BASE stops it, together with the
  dirty log as it is then: what ``vhost_log_put``'s final sync will take,
  since a stopped ring writes nothing more;
- on the destination, at SET_VRING_KICK, before the ring starts: after
  SET_VRING_BASE gave it the source's ``last_avail_idx``.

Each copy is a :class:`VringAtSwitchover` (a split ring) or a
:class:`PackedRingAtSwitchover` (a packed ring: the descriptor ring, the event
areas and the device's positions with their wrap counters), of plain values
and numpy copies; nothing keeps a mapping alive.

:class:`StopWindow` acts in the window between QEMU's last dirty-bitmap sync
and the stop, on the source: it can write RX frames there (a real back-end
receives right up to GET_VRING_BASE; the kit's paced traffic leaves those few
milliseconds empty), and it can emulate a skipped final sync by discarding
the log's marks as the rings stop.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable

import numpy as np

from vhostlab.memory import TARGET_PAGE_SIZE
from vhostlab.protocol import TO_BACKEND, Feature, Request
from vhostlab.ring.layout import (VRING_DESC_DTYPE, VRING_DESC_F_NEXT, VRING_USED_ELEM_DTYPE,
                                  VringCopy, vring_views)
from vhostlab.ring.packed_layout import (PackedRingSnapshot, packed_ring_copy,
                                         packed_vring_position, slot_state,
                                         waiting_for_device)

__all__ = ["VringAtSwitchover", "PackedRingAtSwitchover", "SwitchoverRecorder", "StopWindow",
           "frames_in_pages"]


@dataclass(frozen=True)
class VringAtSwitchover(VringCopy):
    """One split ring at the switch-over, copied from guest memory by a back-end.

    ``side``: "source" (taken just before GET_VRING_BASE) or "destination"
    (after SET_VRING_BASE, as the ring starts); ``last_avail_idx``: the
    back-end's counter then; ``in_flight``: heads the driver made available
    that the device has not taken (avail.idx - last_avail_idx of them);
    ``gpas``: where desc, avail and used live; ``log_bitmap``: the source's
    dirty log at that moment (None on the destination or with no log).
    """

    side: str
    moment: str
    index: int
    last_avail_idx: int
    in_flight: tuple[int, ...]
    gpas: dict
    log_bitmap: bytes | None = None

    ring_format = "split"

    @property
    def kind(self) -> str:
        return "RX" if self.index % 2 == 0 else "TX"


@dataclass(frozen=True)
class PackedRingAtSwitchover(PackedRingSnapshot):
    """One packed ring at the switch-over: the descriptor ring and the event areas
    copied from guest memory, with the device's positions (``device``: what
    GET_VRING_BASE answered on the source, what SET_VRING_BASE gave on the
    destination). The driver's positions are the guest's, which a back-end
    cannot see (``driver`` is None). ``side``, ``moment`` and ``log_bitmap``
    as in :class:`VringAtSwitchover`.
    """

    side: str = ""
    moment: str = ""
    log_bitmap: bytes | None = None

    ring_format = "packed"
    kind = VringAtSwitchover.kind

    @property
    def last_avail_idx(self) -> int:
        """The device's next slot (its wrap counter is ``device.avail_wrap_counter``)."""
        return self.device.last_avail_idx

    @property
    def in_flight(self) -> tuple[int, ...]:
        """Buffer ids of the chains the driver made available that the device has
        not taken: a chain's id is on its last descriptor (2.8.6)."""
        return tuple(int(self.desc[slot]["id"]) for slot in waiting_for_device(self)
                     if not int(self.desc[slot]["flags"]) & VRING_DESC_F_NEXT)


def copy_packed_ring(memory, index: int, num: int, gpas: dict, base: int, side: str,
                     moment: str, log=None) -> PackedRingAtSwitchover:
    """Copy packed ring ``index`` out of guest ``memory``; ``base``: the 32-bit vring
    base (its 16-bit form, DPDK's, puts used where avail is)."""
    pos = packed_vring_position(base)
    areas = {"desc": gpas["desc"], "driver": gpas.get("driver", gpas.get("avail")),
             "device": gpas.get("device", gpas.get("used"))}
    snap = packed_ring_copy(memory, num, areas, device=pos, index=index)
    bitmap = log.snapshot().tobytes() if log is not None and not log.closed else None
    return PackedRingAtSwitchover(
        num=snap.num, desc=snap.desc, driver_event=snap.driver_event,
        device_event=snap.device_event, device=snap.device, index=index,
        gpas={k: int(g) for k, g in areas.items()}, side=side, moment=moment,
        log_bitmap=bitmap if side == "source" else None)


def copy_ring(memory, index: int, num: int, gpas: dict, last_avail_idx: int, side: str,
              moment: str, log=None, ring_format: str = "split"):
    """Copy ring ``index`` (``num`` entries at ``gpas``) out of guest ``memory``: a
    VringAtSwitchover, or with ``ring_format="packed"`` a PackedRingAtSwitchover
    (``last_avail_idx`` is then the packed vring base)."""
    if ring_format == "packed":
        return copy_packed_ring(memory, index, num, gpas, last_avail_idx, side, moment, log)
    v = vring_views(memory, num, gpas["desc"], gpas["avail"], gpas["used"])
    last = last_avail_idx & 0xFFFF
    avail_idx = int(v.avail_idx[0])
    ring = v.avail_ring.copy()
    pending = (avail_idx - last) & 0xFFFF
    in_flight = tuple(int(ring[(last + i) % num]) for i in range(min(pending, num)))
    bitmap = log.snapshot().tobytes() if log is not None and not log.closed else None
    out = VringAtSwitchover(
        side=side, moment=moment, index=index, num=num,
        desc=np.array(v.desc, dtype=VRING_DESC_DTYPE), avail_flags=int(v.avail_flags[0]),
        avail_idx=avail_idx, avail_ring=ring, used_flags=int(v.used_flags[0]),
        used_idx=int(v.used_idx[0]), used_ring=np.array(v.used_ring, VRING_USED_ELEM_DTYPE),
        last_avail_idx=last, in_flight=in_flight, gpas={k: int(g) for k, g in gpas.items()},
        log_bitmap=bitmap if side == "source" else None)
    del v
    return out


def _copy_ring(dev, vring, side: str, moment: str):
    """Copy ``vring`` out of the device's guest memory (None if it is not mapped)."""
    vq = vring.ring
    if vq is None or dev.memory is None or dev.memory.closed or not vring.num:
        return None
    packed = vq.ring_format == "packed"
    return copy_ring(dev.memory, vring.index, vring.num,
                     {"desc": vq.desc, "avail": vq.avail, "used": vq.used},
                     vq.get_base() if packed else vring.last_avail_idx, side, moment,
                     dev.log, vq.ring_format)


class SwitchoverRecorder:
    """Copies rings (and the source's log) at GET_VRING_BASE and SET_VRING_KICK.

    ``install(server, side)`` wraps the server's current handlers; the
    wrapper copies the ring, then calls the handler it replaced. ``rings``
    holds the copies in the order they were taken.
    """

    def __init__(self) -> None:
        self.rings: list[VringAtSwitchover] = []
        self._lock = threading.Lock()

    def install(self, server, side: str) -> None:
        if side == "source":
            self._wrap(server, Request.GET_VRING_BASE, side, "before GET_VRING_BASE")
        else:
            self._wrap(server, Request.SET_VRING_KICK, side, "after SET_VRING_BASE")

    def _wrap(self, server, request: Request, side: str, moment: str) -> None:
        inner: Callable = server.handlers[request]

        def handler(dev, msg, fds):
            # GET_VRING_BASE carries a vring state (index); SET_VRING_KICK a u64
            # whose bits 0-7 are the index (vring_index).
            payload = msg.payload
            index = getattr(payload, "vring_index", getattr(payload, "index", None))
            if isinstance(index, int) and 0 <= index < len(dev.vrings):
                try:
                    snap = _copy_ring(dev, dev.vrings[index], side, moment)
                except Exception:      # a picture must never break the migration
                    snap = None
                if snap is not None:
                    with self._lock:
                        self.rings.append(snap)
            return inner(dev, msg, fds)

        server.handlers[request] = handler

    def observer(self, device, side: str) -> Callable:
        """A relay's observer for a back-end we cannot wrap (DPDK's): ``device``
        (an ``ObservedDevice``) keeps what the front-end told the back-end; the
        ring is copied on the source as GET_VRING_BASE's answer passes (the
        ring has stopped; the answer is its last_avail_idx), on the
        destination as SET_VRING_KICK passes, before the back-end has it."""
        def observe(direction: str, msg, fds) -> None:
            device(direction, msg, fds)
            wanted = (Request.GET_VRING_BASE if side == "source" else Request.SET_VRING_KICK)
            if msg.request != wanted or (direction == TO_BACKEND) != (side != "source"):
                return
            index = getattr(msg.payload, "vring_index", getattr(msg.payload, "index", None))
            ring = device.ring_at(index) if isinstance(index, int) else None
            if ring is None:
                return
            num, gpas, base = ring
            last = msg.payload.num if side == "source" else base
            moment = "at GET_VRING_BASE's answer" if side == "source" else "after SET_VRING_BASE"
            packed = bool(device.features & Feature.VIRTIO_F_RING_PACKED)
            try:
                snap = copy_ring(device.memory, index, num, gpas, last, side, moment, device.log,
                                 "packed" if packed else "split")
            except Exception:      # a picture must never break the migration
                return
            with self._lock:
                self.rings.append(snap)
        return observe

    def taken(self, side: str) -> list[VringAtSwitchover]:
        """The last copy of each ring on ``side``, by ring index."""
        with self._lock:
            latest = {r.index: r for r in self.rings if r.side == side}
        return [latest[i] for i in sorted(latest)]

    def final_log(self) -> np.ndarray | None:
        """The source's log at its last GET_VRING_BASE, as a bitmap (None without one)."""
        with self._lock:
            logs = [r.log_bitmap for r in self.rings
                    if r.side == "source" and r.log_bitmap is not None]
        if not logs:
            return None
        out = np.zeros(max(len(b) for b in logs), np.uint8)
        for b in logs:
            out[:len(b)] |= np.frombuffer(b, np.uint8)
        return out


class StopWindow:
    """The source back-end's GET_VRING_BASE, with the window before the stop made visible.

    ``frames()`` (optional) returns RX frames; the back-end writes them into
    the guest's RX buffers when GET_VRING_BASE for ring 0 arrives, before the
    ring stops, so they are marked in the log after QEMU's last bitmap sync:
    only ``vhost_log_put``'s final sync reports them. ``delivered``: how many.

    ``discard_marks`` is an emulated fault, not a QEMU option (QEMU cannot be
    told to skip that sync): after each GET_VRING_BASE has stopped its ring,
    the back-end takes every mark out of the shared log (an exchange per
    64-bit word, as ``vhost_dev_sync_region`` does) and throws it away, so
    the final sync finds nothing: what a front-end that skipped the final
    sync would lose. ``discarded``: those pages.

    Install it after a :class:`SwitchoverRecorder`, so that the recorder's
    copy of the log is taken after the frames and before the discard.
    """

    def __init__(self, frames: Callable[[], list] | None = None, discard_marks: bool = False):
        self.frames, self.discard_marks = frames, discard_marks
        self.delivered = 0
        self.discarded: set[int] = set()

    def install(self, server) -> "StopWindow":
        from vhostlab.backend import rings
        from vhostlab.ring import FrameArena
        inner: Callable = server.handlers[Request.GET_VRING_BASE]

        def handler(dev, msg, fds):
            index = getattr(msg.payload, "index", None)
            if index == 0 and self.frames is not None and not self.delivered:
                frames = self.frames()
                if frames:
                    before = dev.counters.guest_rx_frames
                    rings.deliver(dev, FrameArena.from_frames(frames), 0)
                    self.delivered = dev.counters.guest_rx_frames - before
            out = inner(dev, msg, fds)
            if self.discard_marks and dev.log is not None and not dev.log.closed:
                self.discarded.update(int(p) for p in dev.log.sync())
            return out

        server.handlers[Request.GET_VRING_BASE] = handler
        return self


def frames_in_pages(ring: VringAtSwitchover, read: Callable[[int, int], bytes],
                    pages, name: Callable[[bytes], str | None], hdr_len: int) -> dict:
    """Which frames lived in ``pages``: page -> labels, from the ring's used entries.

    ``ring``: the source's RX ring before GET_VRING_BASE; ``read(gpa, n)``
    reads the source's RAM; ``name(frame)`` names a frame ("RX #12") or
    returns None. The last ``num`` used entries are walked: a written buffer
    whose bytes touch one of ``pages`` is reported there.
    """
    want = set(int(p) for p in pages)
    out: dict[int, list[str]] = {}
    for head, gpa, room, length in _written_buffers(ring):
        first = gpa // TARGET_PAGE_SIZE
        last = (gpa + max(1, min(length, room)) - 1) // TARGET_PAGE_SIZE
        hit = [p for p in range(first, last + 1) if p in want]
        if not hit:
            continue
        try:
            frame = read(gpa + hdr_len, max(0, min(length, room) - hdr_len))
            label = name(frame)
        except Exception:
            label = None
        label = label or f"{ring.kind} buffer {head}"
        for p in hit:
            out.setdefault(p, []).append(label)
    return {p: tuple(v) for p, v in out.items()}


def _written_buffers(ring):
    """(id, gpa, room, bytes written) of each buffer the device returned (newest
    first for a split ring, in slot order for a packed one).

    A split ring's used entries name the head, whose descriptor still holds
    the buffer. A packed ring's device writes id and len back into the slot
    where the chain began and leaves addr as the driver wrote it (2.8.7), so
    the slots in the used state carry it all; a chain's later buffers are not
    looked at, as with the split ring.
    """
    num = ring.num
    if ring.ring_format == "packed":
        for slot in range(num):
            d = ring.desc[slot]
            if slot_state(int(d["flags"]))[0] == "used" and int(d["len"]):
                yield int(d["id"]), int(d["addr"]), int(d["len"]), int(d["len"])
        return
    for i in range(min(num, ring.used_idx)):
        elem = ring.used_ring[(ring.used_idx - 1 - i) % num]
        head, length = int(elem["id"]), int(elem["len"])
        if head >= num or not length:
            continue
        d = ring.desc[head]
        yield head, int(d["addr"]), int(d["len"]), length
