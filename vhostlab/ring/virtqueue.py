"""One virtqueue as the device (back-end) sees it, like libvhost-user's VuVirtq.

A :class:`Virtqueue` holds the ring's state in a 1-element numpy record
(``state``, dtype VRING_STATE_DTYPE) that the kernels read and update, and
wraps the vhost-user ring messages and the two bursts::

    vq = Virtqueue(1, "tx")
    vq.set_num(256)                                  # SET_VRING_NUM
    vq.set_base(0)                                   # SET_VRING_BASE
    vq.set_addr(desc, avail, used, memory=memory)    # SET_VRING_ADDR (as GPAs)
    n = vq.tx_burst(memory, arena, hdr_len=12)       # after a kick
    if vq.take_call(): ...                           # signal the call eventfd
    base = vq.get_base()                             # GET_VRING_BASE

SET_VRING_ADDR carries the front-end's virtual addresses; translate them
first with ``GuestMemory.uva_to_gpa`` (``log_guest_addr`` already is a GPA).
Logging is on when a burst is given ``log`` (a DirtyLog or its bitmap): pass
it while VHOST_F_LOG_ALL is negotiated.

A guest that breaks a rule makes a burst raise a :class:`RingError` subclass;
the ring is then broken and every later burst raises the same error without
touching guest memory, until :meth:`reset`. Other rings are not affected.
"""
from __future__ import annotations

import numpy as np

from .arena import FrameArena
from .chain import map_ring_py
from .errors import E_ARENA, RING_OK, RingConfigError, RingError, ring_error
from .layout import (MAX_HDR_LEN, VIRTQUEUE_MAX_SIZE, VRING_STATE_DTYPE, vring_avail_size,
                     vring_desc_size, vring_used_size)
from .rx import vring_rx_burst, vring_rx_burst_py
from .tx import vring_tx_burst, vring_tx_burst_py

__all__ = ["Virtqueue"]

_NO_LOG = np.zeros(0, np.uint8)
_IMPLS = {"numba": (vring_tx_burst, vring_rx_burst),
          "python": (vring_tx_burst_py, vring_rx_burst_py)}


class _Field:
    """A read-only view of one field of the ring state."""

    def __init__(self, name: str):
        self.name = name

    def __get__(self, obj, owner=None):
        return self if obj is None else int(obj.state[0][self.name])


def _log_array(log) -> np.ndarray:
    if log is None:
        return _NO_LOG
    bitmap = getattr(log, "bitmap", log)
    if not (isinstance(bitmap, np.ndarray) and bitmap.dtype == np.uint8
            and bitmap.ndim == 1 and bitmap.flags.c_contiguous and bitmap.flags.writeable):
        raise TypeError("log must be a DirtyLog or a writable 1-D uint8 array")
    return bitmap


class Virtqueue:
    """The device-side state and operations of one split virtqueue."""

    # What a ring format brings (packed_virtqueue.PackedVirtqueue brings its own).
    ring_format = "split"
    state_dtype = VRING_STATE_DTYPE
    _kernels = _IMPLS
    _map_ring = staticmethod(map_ring_py)

    def __init__(self, index: int = 0, name: str = "") -> None:
        self.index = index
        self.name = name
        self.state = np.zeros(1, self.state_dtype)
        self.reset()

    # ------------------------------------------------------ vhost-user messages
    @staticmethod
    def area_sizes(num: int) -> tuple[int, int, int]:
        """Bytes of the descriptor table, the avail ring and the used ring."""
        return vring_desc_size(num), vring_avail_size(num), vring_used_size(num)

    def reset(self) -> None:
        """Forget everything (the ring is unconfigured and no longer broken)."""
        self.state[0] = 0
        self.state[0]["err_head"] = self.state[0]["err_table"] = -1

    #: SET_VRING_NUM's rule for this format, as a refusal states it (virtio 2.7).
    NUM_RULE = f"a power of 2 <= {VIRTQUEUE_MAX_SIZE}"

    def set_num(self, num: int) -> None:
        """SET_VRING_NUM: the queue size, a power of 2 from 1 to 32768."""
        if not (isinstance(num, (int, np.integer)) and 1 <= num <= VIRTQUEUE_MAX_SIZE
                and num & (num - 1) == 0):
            raise RingConfigError(
                f"queue {self.index}: SET_VRING_NUM num = {num}: must be a power of 2 "
                f"from 1 to {VIRTQUEUE_MAX_SIZE}", queue=self.index, field="num",
                value=num, limit=VIRTQUEUE_MAX_SIZE)
        self.state[0]["num"] = num

    def set_addr(self, desc: int, avail: int, used: int, log_guest_addr: int = 0,
                 flags: int = 0, *, memory=None) -> None:
        """SET_VRING_ADDR, with desc/avail/used already translated to GPAs.

        With ``memory`` the three areas are checked now (RingAddressError);
        they are checked again on every burst in any case.
        """
        s = self.state[0]
        for field, value in (("desc", desc), ("avail", avail), ("used", used),
                             ("log_guest_addr", log_guest_addr), ("flags", flags)):
            if not 0 <= value < 1 << 63:
                raise RingConfigError(
                    f"queue {self.index}: SET_VRING_ADDR {field} = {value:#x}: out of range",
                    queue=self.index, field=field, value=value, limit=1 << 63)
        if memory is not None:
            probe = self.state.copy()[0]     # check on a copy: do not break the ring
            probe["desc"], probe["avail"], probe["used"] = desc, avail, used
            probe["status"] = RING_OK
            _, table = memory.kernel_args()
            if self._map_ring(table.tolist(), probe)[0] != RING_OK:
                raise ring_error(probe, self.index, self.name)
        s["desc"], s["avail"], s["used"] = desc, avail, used
        s["log_guest_addr"], s["flags"] = log_guest_addr, flags

    def set_base(self, num: int) -> None:
        """SET_VRING_BASE: where the device resumes (last_avail_idx; the used
        index is taken to be the same, as every taken chain was returned)."""
        if not 0 <= num <= 0xFFFF:
            raise RingConfigError(
                f"queue {self.index}: SET_VRING_BASE num = {num}: a split ring's "
                "index is a u16", queue=self.index, field="num", value=num,
                limit=0xFFFF)
        s = self.state[0]
        s["last_avail_idx"] = s["used_idx"] = num
        s["signalled_used_valid"] = s["call_pending"] = s["avail_pending"] = 0

    def get_base(self) -> int:
        """GET_VRING_BASE: last_avail_idx (the back-end also stops the ring)."""
        return self.last_avail_idx

    def sync_used_idx(self, memory) -> None:
        """Take the used index from the used ring in guest memory, as libvhost-user
        and Linux vhost do (SET_VRING_BASE carries only last_avail_idx)."""
        self.state[0]["used_idx"] = int.from_bytes(memory.read(self.used + 2, 2), "little")

    def stop(self) -> None:
        """The back-end stopped the ring (GET_VRING_BASE): forget the last signalled
        used index, as DPDK and Linux's vhost_vq_init_access do, so that after a
        restart the first used buffer always interrupts."""
        self.state[0]["signalled_used_valid"] = 0

    def set_event_idx(self, enabled: bool) -> None:
        """Whether VIRTIO_RING_F_EVENT_IDX was negotiated (SET_FEATURES)."""
        self.state[0]["event_idx"] = int(bool(enabled))

    # ----------------------------------------------------------------- bursts
    def begin_service(self, desc_budget: int, max_chain: int | None = None) -> None:
        """Start one service: count descriptors from zero up to ``desc_budget``;
        TX chains longer than ``max_chain`` bytes are dropped (0: no limit)."""
        s = self.state[0]
        s["descs"], s["desc_budget"] = 0, desc_budget
        if max_chain is not None:
            s["max_chain"] = max_chain

    def service_spent(self) -> bool:
        """Whether this service walked its descriptor budget."""
        s = self.state[0]
        return bool(s["descs"] >= s["desc_budget"])

    def tx_burst(self, memory, arena: FrameArena, *, log=None, hdr_len: int = 0,
                 max_frames: int | None = None, impl: str = "numba") -> int:
        """Take guest TX frames into ``arena`` (cleared first); returns how many.

        ``hdr_len`` bytes of virtio-net header are stripped from each frame
        (0 keeps them). Raises a RingError subclass if the guest broke a rule
        (``err.frames`` frames were still taken).
        """
        arena.count = 0
        if not self.state[0]["num"]:
            return 0
        host, table = memory.kernel_args()
        status, n = self._kernels[impl][0](
            host, table, self.state, _log_array(log), arena.buf, arena.offsets,
            arena.lengths, hdr_len, arena.offsets.size if max_frames is None else max_frames)
        arena.count = n
        if status != RING_OK:
            self._raise(status, n, hdr_len)
        return n

    def rx_burst(self, memory, arena: FrameArena, *, log=None, hdr_len: int = 10,
                 mrg_rxbuf: bool = False, impl: str = "numba") -> int:
        """Write the arena's frames into guest RX buffers; returns how many
        were done (delivered, or dropped when too big without MRG_RXBUF).

        ``hdr_len``: the virtio-net header written before each frame (10, or
        12 with VERSION_1 or MRG_RXBUF; 0 for none).
        """
        if not self.state[0]["num"] or arena.count == 0:
            return 0
        host, table = memory.kernel_args()
        status, n = self._kernels[impl][1](
            host, table, self.state, _log_array(log), arena.buf, arena.offsets,
            arena.lengths, arena.count, hdr_len, 1 if mrg_rxbuf else 0)
        if status != RING_OK:
            self._raise(status, n, hdr_len)
        return n

    def take_call(self) -> bool:
        """True (once) when a burst decided the driver wants an interrupt."""
        pending = bool(self.state[0]["call_pending"])
        self.state[0]["call_pending"] = 0
        return pending

    # ------------------------------------------------------------------ state
    @property
    def broken(self) -> bool:
        return self.state[0]["status"] != RING_OK

    @property
    def error(self) -> RingError | None:
        """The error that broke the ring, or None."""
        return ring_error(self.state[0], self.index, self.name) if self.broken else None

    def _raise(self, status: int, n: int, hdr_len: int) -> None:
        if status == E_ARENA:
            raise ValueError(f"queue {self.index}: the frame arena is inconsistent (a frame "
                             f"outside its buffer) or hdr_len = {hdr_len} is not in "
                             f"0..{MAX_HDR_LEN}")
        err = ring_error(self.state[0], self.index, self.name)
        err.frames = n
        raise err

    def __repr__(self) -> str:
        name = f" ({self.name})" if self.name else ""
        broken = " broken" if self.broken else ""
        return (f"<{type(self).__name__} {self.index}{name} num={self.num} last_avail_idx="
                f"{self.last_avail_idx} used_idx={self.used_idx}{broken}>")


# Read-only views of the ring state's fields (the kernels' counters among them).
for _name in ("num", "desc", "avail", "used", "log_guest_addr", "flags", "last_avail_idx",
              "used_idx", "event_idx", "avail_pending", "frames", "bytes", "dropped",
              "logged", "oversized", "oversized_head", "oversized_len", "max_chain"):
    setattr(Virtqueue, _name, _Field(_name))
del _name

