"""Python-level overrides of two datapath decisions, for one server only.

The challenge exercise lets a learner's code decide, inside a back-end that
serves a real QEMU:

* ``should_signal(ring)``: after a used-ring update, whether the device
  writes the call eventfd (EVENT_IDX's used_event, or the avail flags);
* ``place_frame(frame_len, hdr_len, buffer_sizes)``: how one received frame
  is spread over the guest's RX buffers with VIRTIO_NET_F_MRG_RXBUF, and the
  ``num_buffers`` of its header.

Set ``device.overrides = RingOverrides(...)`` on one server's device (before
the guest's driver starts the rings); every other device keeps
``overrides = None`` and the numba kernels decide, untouched. Each override
decision is recorded beside the kit's own decision on the same inputs, so a
grader can compare them; a learner function that raises is recorded too and
counts as "no signal" / "no placement".
"""
from __future__ import annotations

import struct
import threading
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from vhostlab.ring.chain import (CHAIN_END, avail_head_py, avail_ready_py, chain_next_py,
                                 chain_start_py, map_ring_py, publish_used_py, put_used_elem_py)
from vhostlab.ring.errors import RING_OK
from vhostlab.ring.layout import VRING_AVAIL_F_NO_INTERRUPT, vring_need_event_py
from vhostlab.ring.rx import rx_fill_chain_py

__all__ = ["RingOverrides", "SignalView", "applies", "decide_call", "reference_should_signal",
           "reference_place_frame", "rx_burst_placed"]

_U16 = struct.Struct("<H")
_NO_LOG = np.zeros(0, np.uint8)
NUM_BUFFERS_OFFSET = 10          # virtio_net_hdr_mrg_rxbuf.num_buffers


@dataclass(frozen=True)
class SignalView:
    """What the device knows when it decides whether to signal the call eventfd.

    ``new_idx``: used->idx just published; ``old_idx``: used->idx at the
    previous decision on this ring (None before the first); ``used_event``:
    avail->ring[num], written by the driver; ``event_idx``: whether
    VIRTIO_RING_F_EVENT_IDX was negotiated; ``avail_flags``: avail->flags.
    """

    new_idx: int
    old_idx: int | None
    used_event: int
    event_idx: bool
    avail_flags: int


def reference_should_signal(ring: SignalView) -> bool:
    """The kit's decision (what the kernels decide), on a SignalView."""
    if not ring.event_idx:
        return not ring.avail_flags & VRING_AVAIL_F_NO_INTERRUPT
    if ring.old_idx is None:
        return True
    return bool(vring_need_event_py(ring.used_event, ring.new_idx, ring.old_idx))


def reference_place_frame(frame_len: int, hdr_len: int, buffer_sizes: list[int]):
    """The kit's placement: fill buffers in order, each as far as it holds."""
    left, lengths = hdr_len + frame_len, []
    for size in buffer_sizes:
        if left <= 0:
            break
        lengths.append(min(size, left))
        left -= lengths[-1]
    if left > 0:
        return None
    return len(lengths), lengths


@dataclass
class RingOverrides:
    """The learner's functions for one device, and what they decided."""

    should_signal: Callable | None = None
    place_frame: Callable | None = None
    decisions: list = field(default_factory=list)    # (ring index, learner, reference)
    placements: list = field(default_factory=list)   # (frame_len, learner, reference)
    errors: list = field(default_factory=list)
    last_idx: dict = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def _error(self, what: str, exc: BaseException) -> None:
        with self.lock:
            self.errors.append(f"{what}: {type(exc).__name__}: {exc}")

    def calls(self) -> tuple[int, int]:
        """(signals the learner's decisions made, signals the reference would make)."""
        with self.lock:
            return (sum(1 for _, got, _ in self.decisions if got),
                    sum(1 for _, _, want in self.decisions if want))


def applies(vq) -> bool:
    """Overrides read and write split rings (avail flags, used_event, the used
    ring); a packed ring keeps the kernels' own decisions."""
    return vq.ring_format == "split"


def _ring_memory(dev, vq):
    host, table = dev.memory.kernel_args()
    mv = memoryview(host)
    status, desc, avail, used = map_ring_py(table.tolist(), vq.state[0])
    return mv, table.tolist(), status, desc, avail, used


def decide_call(dev, vring, overrides: RingOverrides) -> bool:
    """Whether to signal `vring`'s call eventfd, by the learner's should_signal."""
    vq = vring.ring
    vq.take_call()                               # the kernel's decision is not used here
    s = vq.state[0]
    new = int(s["used_idx"])
    old = overrides.last_idx.get(vring.index)
    if old == new:
        return False                             # nothing was published since
    mv, _, status, _, avail, _ = _ring_memory(dev, vq)
    if status != RING_OK:
        return False
    num = int(s["num"])
    view = SignalView(new_idx=new, old_idx=old,
                      used_event=_U16.unpack_from(mv, avail + 4 + 2 * num)[0],
                      event_idx=bool(s["event_idx"]),
                      avail_flags=_U16.unpack_from(mv, avail)[0])
    overrides.last_idx[vring.index] = new
    want = reference_should_signal(view)
    try:
        got = bool(overrides.should_signal(view))
    except Exception as exc:  # the learner's bug: recorded, no signal
        overrides._error("should_signal", exc)
        got = False
    with overrides.lock:
        overrides.decisions.append((vring.index, got, want))
    return got


def _capacity(mv, regions, s, desc, head) -> int:
    descs = int(s["descs"])
    cur, total = chain_start_py(desc, int(s["num"]), head), 0
    while True:
        status, _, _, length, cur = chain_next_py(mv, regions, s, cur, True)
        if status != RING_OK:
            break
        total += length
    s["descs"] = descs                           # a look, not a service
    return total if status == CHAIN_END else -1


def rx_burst_placed(dev, vq, arena, hdr_len: int, overrides: RingOverrides, *,
                    log=None) -> int:
    """Deliver the arena's frames into RX buffers as the learner's place_frame says;
    returns how many frames were done. What is written is logged in `log` (a
    DirtyLog, while logging is on), the used ring is published and the kit's call
    decision taken, as the kernels do."""
    if not vq.num or arena.count == 0:
        return 0
    bitmap = _NO_LOG if log is None else getattr(log, "bitmap", log)
    s = vq.state[0]
    mv, regions, status, desc, avail, used = _ring_memory(dev, vq)
    if status != RING_OK:
        return 0
    status, ready = avail_ready_py(mv, s, avail)
    if status != RING_OK:
        return 0
    frames = memoryview(arena.buf)
    last, used_idx, mask = int(s["last_avail_idx"]), int(s["used_idx"]), int(s["num"]) - 1
    taken = done = nbytes = 0
    while done < arena.count:
        src, size = int(arena.offsets[done]), int(arena.lengths[done])
        heads, sizes = [], []
        for k in range(ready - taken):
            st, head = avail_head_py(mv, s, avail, last + taken + k)
            if st != RING_OK:
                break
            heads.append(head)
            sizes.append(_capacity(mv, regions, s, desc, head))
        if vq.broken:                             # the guest broke a rule in a chain
            break
        want = reference_place_frame(size, hdr_len, sizes)
        try:
            got = overrides.place_frame(size, hdr_len, list(sizes))
            got = None if got is None else (int(got[0]), [int(n) for n in got[1]])
        except Exception as exc:  # the learner's bug: recorded, the frame waits
            overrides._error("place_frame", exc)
            got = None
        with overrides.lock:
            overrides.placements.append((size, got, want))
        if got is None or not got[1] or len(got[1]) > len(heads):
            break                                 # wait for more buffers
        nbuf, lengths = got
        pos, nb, pending = 0, [0, 0], []
        for head, n in zip(heads, lengths):
            end = min(pos + max(n, 0), hdr_len + size)
            st, pos, written = rx_fill_chain_py(mv, frames, regions, bitmap, s, desc, head,
                                                src, end, pos, hdr_len, nb)
            pending.append((head, written))
            if st != RING_OK:
                break
        if vq.broken:
            break
        if hdr_len >= NUM_BUFFERS_OFFSET + 2 and nb[1]:
            mv[nb[0]], mv[nb[1]] = nbuf & 0xFF, (nbuf >> 8) & 0xFF
        for c, (head, written) in enumerate(pending):
            put_used_elem_py(mv, used, (used_idx + taken + c) & mask, head, written)
        taken += len(pending)
        nbytes += size
        done += 1
    s["frames"] += done
    s["bytes"] += nbytes
    publish_used_py(mv, bitmap, s, avail, used, taken)
    if vq.broken:                                 # as Virtqueue.rx_burst: the ring's error
        err = vq.error
        err.frames = done
        raise err
    return done
