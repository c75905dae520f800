"""One packed virtqueue as the device (back-end) sees it: the ring seam's "packed".

:class:`PackedVirtqueue` is :class:`.virtqueue.Virtqueue` with the packed
ring's state record (VRING_PACKED_STATE_DTYPE: the wrap counters beside the
positions), its kernels (``packed_tx``, ``packed_rx``) and its map check
(``packed_chain.packed_map_ring``); what differs in the vhost-user messages
is here::

    SET_VRING_NUM   any size from 1 to 32768 (2.8: no power of 2 needed)
    SET_VRING_ADDR  desc: the descriptor ring, avail: the driver event
                    suppression area, used: the device event suppression area
    SET_VRING_BASE  32 bits: last_avail_idx, its wrap counter, last_used_idx,
                    its wrap counter (packed_layout.parse_packed_vring_base)
    GET_VRING_BASE  the same 32 bits back, as QEMU's vhost_virtqueue_stop reads them

A front-end that sends only the low 16 bits (DPDK's virtio-user sends
avail wrap 1 and nothing above: 0x8000) gets what DPDK's own
vhost_user_set_vring_base does: the used position taken equal to the avail
one, true of a stopped ring that returned every chain it took. A non-zero
upper half is taken as given (QEMU's virtio_queue_packed_set_last_avail_idx).

There is no used index in guest memory: ``sync_used_idx`` has nothing to
read, as QEMU's virtio_queue_packed_update_used_idx. Interrupts follow the
driver's event suppression area (ENABLE, DISABLE, and DESC with EVENT_IDX);
the device's own area is kept at ENABLE, so the driver kicks for every
chain it makes available.
"""
from __future__ import annotations

import numpy as np

from .errors import RingConfigError
from .packed_chain import packed_map_ring_py
from .packed_layout import (VRING_PACKED_MAX_SIZE, VRING_PACKED_STATE_DTYPE, packed_area_sizes,
                            packed_vring_base, packed_vring_position)
from .packed_rx import vring_packed_rx_burst, vring_packed_rx_burst_py
from .packed_tx import vring_packed_tx_burst, vring_packed_tx_burst_py
from .virtqueue import Virtqueue, _Field

__all__ = ["PackedVirtqueue"]


class PackedVirtqueue(Virtqueue):
    """The device-side state and operations of one packed virtqueue."""

    state_dtype = VRING_PACKED_STATE_DTYPE
    _kernels = {"numba": (vring_packed_tx_burst, vring_packed_rx_burst),
                "python": (vring_packed_tx_burst_py, vring_packed_rx_burst_py)}
    _map_ring = staticmethod(packed_map_ring_py)
    ring_format = "packed"

    @staticmethod
    def area_sizes(num: int) -> tuple[int, int, int]:
        """Bytes of the descriptor ring, the driver and the device event areas."""
        return packed_area_sizes(num)

    def reset(self) -> None:
        """Forget everything; both wrap counters start at 1 (2.8.1)."""
        super().reset()
        self.state[0]["avail_wrap_counter"] = self.state[0]["used_wrap_counter"] = 1

    #: SET_VRING_NUM's rule for a packed ring (virtio 2.8: any size).
    NUM_RULE = f"1 to {VRING_PACKED_MAX_SIZE}"

    def set_num(self, num: int) -> None:
        """SET_VRING_NUM: the queue size, from 1 to 32768 (any, 2.8)."""
        if not (isinstance(num, (int, np.integer)) and 1 <= num <= VRING_PACKED_MAX_SIZE):
            raise RingConfigError(
                f"queue {self.index}: SET_VRING_NUM num = {num}: a packed ring holds 1 to "
                f"{VRING_PACKED_MAX_SIZE} descriptors", queue=self.index, field="num",
                value=num, limit=VRING_PACKED_MAX_SIZE)
        self.state[0]["num"] = num

    def set_base(self, num: int) -> None:
        """SET_VRING_BASE: positions and wrap counters (see the module docstring)."""
        if not 0 <= num <= 0xFFFFFFFF:
            raise RingConfigError(
                f"queue {self.index}: SET_VRING_BASE num = {num:#x}: a packed ring's base "
                "is 32 bits", queue=self.index, field="num", value=num, limit=0xFFFFFFFF)
        base = packed_vring_position(num)
        used_idx, used_wrap = base.last_used_idx, base.used_wrap_counter
        size = self.num
        for name, idx in (("last_avail_idx", base.last_avail_idx), ("last_used_idx", used_idx)):
            if size and idx >= size:
                raise RingConfigError(
                    f"queue {self.index}: SET_VRING_BASE num = {num:#x}: {name} = {idx} "
                    f"must be < the queue size {size}", queue=self.index, field="num",
                    value=num, limit=size)
        s = self.state[0]
        s["last_avail_idx"], s["avail_wrap_counter"] = base.last_avail_idx, \
            base.avail_wrap_counter
        s["used_idx"], s["used_wrap_counter"] = used_idx, used_wrap
        s["signalled_used_valid"] = s["call_pending"] = s["avail_pending"] = 0

    def get_base(self) -> int:
        """GET_VRING_BASE: the 32-bit packed vring base (both positions and wrap counters)."""
        s = self.state[0]
        return packed_vring_base(int(s["last_avail_idx"]), int(s["avail_wrap_counter"]),
                                 int(s["used_idx"]), int(s["used_wrap_counter"]))

    def sync_used_idx(self, memory) -> None:
        """Nothing to read: a packed ring keeps no used index in guest memory."""


for _name in ("avail_wrap_counter", "used_wrap_counter"):
    setattr(PackedVirtqueue, _name, _Field(_name))
del _name
