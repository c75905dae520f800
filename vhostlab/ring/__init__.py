"""Split virtqueues: layout, state, the TX/RX kernels and the driver side.

Modules, bottom up:

    atomics    acquire/release/atomic-or/xchg/fence as numba intrinsics
    layout     the split ring in memory, VRING_STATE_DTYPE, vring_need_event
    errors     status codes and the RingError family
    log        vhost_log_write: marking the dirty log (used by the kernels)
    chain      the descriptor-chain walker and used-ring publishing
    cache      keeps the kernels' numba cache in step with all their sources
    tx, rx     the burst kernels: vring_tx_burst, vring_rx_burst
    arena      FrameArena, the frames a burst moves
    virtqueue  Virtqueue: the device side of a split ring (libvhost-user's VuVirtq)
    packed_layout, packed_chain, packed_tx, packed_rx, packed_virtqueue
               the packed ring (2.8): layout and vring base, chain walk, the
               kernels vring_packed_tx_burst / vring_packed_rx_burst, PackedVirtqueue
    format     the ring seam: DeviceRing (what a back-end calls), RingState,
               RING_FORMATS / make_ring ("split": Virtqueue, "packed": PackedVirtqueue)
    driver     VirtqueueDriver: the guest side (both guests'), over a RingMemory
    packed_driver  PackedVirtqueueDriver: the guest side of a packed ring
    warm       load_kernels: every format's kernels compiled before a device serves

Every numba kernel ``f`` has a plain-Python twin ``f_py`` with the same
signature and the same results; tests hold them equal, the labs show the
twins, ``vhostlab bench`` races them. Kernels compile on first call and are
cached on disk (numba ``cache=True``).
"""
from . import layout as _layout
from .arena import MAX_FRAME_SIZE, FrameArena
from .atomics import (atomic_or, atomic_or_py, atomic_xchg, atomic_xchg_py, borrow, borrow_py,
                      fence_seq_cst, keep_alive,
                      fence_seq_cst_py, load_acquire, load_acquire_py, load_relaxed,
                      load_relaxed_py, smp_load_acquire, smp_mb, smp_store_release,
                      store_release, store_release_py)
from .driver import (GuestDriverError, MappedRingMemory, RingDriver, RingMemory, UsedElem,
                     VirtqueueDriver, write_runs)
from .errors import (E_ARENA, E_AVAIL_IDX, E_BUF_ADDR, E_CHAIN_LEN, E_CHAIN_SHORT, E_DIRECTION,
                     E_FRAME_TOO_BIG, E_HEAD, E_INDIRECT_ALIGN, E_INDIRECT_LEN,
                     E_INDIRECT_NESTED, E_INDIRECT_NEXT, E_LOG_RANGE, E_LOOP, E_NEXT,
                     E_PACKED_FLAGS, E_PACKED_ID, E_RING_ADDR, E_RING_ALIGN, E_RING_NUM,
                     E_ZERO_LEN, RING_OK, ERRORS, AvailIndexError, BufferAddressError,
                     ChainLengthError, DescriptorDirectionError, DescriptorFlagsError,
                     DescriptorIndexError, DescriptorLoopError,
                     IndirectDescriptorError, RingAddressError, RingConfigError, RingError,
                     RingLogError, ZeroLengthBufferError, ring_error)
from .layout import (INDIRECT_MAX_ENTRIES, MAX_HDR_LEN, VHOST_VRING_F_LOG, VRING_AVAIL_ALIGN,
                     VRING_DESC_ALIGN, VRING_DESC_SIZE, VRING_USED_ALIGN,
                     VIRTIO_NET_HDR_LEN, VIRTIO_NET_HDR_MRG_LEN, VIRTQUEUE_MAX_SIZE,
                     VRING_AVAIL_F_NO_INTERRUPT, VRING_DESC_DTYPE, VRING_DESC_F_INDIRECT,
                     VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, VRING_STATE_DTYPE, VringCopy,
                     VRING_USED_ELEM_DTYPE, VRING_USED_F_NO_NOTIFY, VringLayout, VringViews,
                     vring_avail_size, vring_desc_size, vring_layout, vring_need_event,
                     vring_need_event_py, vring_size, vring_used_size, vring_views)
from .packed_driver import PackedVirtqueueDriver
from .format import RING_FORMATS, DeviceRing, RingState, make_ring, ring_format
from .log import (VHOST_LOG_PAGE, vhost_log_write, vhost_log_write_count,
                  vhost_log_write_count_py, vhost_log_write_py)
from .packed_rx import vring_packed_rx_burst, vring_packed_rx_burst_py
from .packed_tx import vring_packed_tx_burst, vring_packed_tx_burst_py
from .packed_virtqueue import PackedVirtqueue
from .rx import vring_rx_burst, vring_rx_burst_py
from .tx import vring_tx_burst, vring_tx_burst_py
from .virtqueue import Virtqueue

__all__ = [
    *_layout.__all__,
    # device side, driver side, frames
    "Virtqueue", "PackedVirtqueue", "VirtqueueDriver", "PackedVirtqueueDriver", "UsedElem",
    "RingMemory", "MappedRingMemory", "RingDriver", "write_runs",
    "GuestDriverError", "FrameArena", "MAX_FRAME_SIZE",
    "DeviceRing", "RingState", "RING_FORMATS", "make_ring", "ring_format",
    # kernels and twins
    "vring_tx_burst", "vring_tx_burst_py", "vring_rx_burst", "vring_rx_burst_py",
    "vring_packed_tx_burst", "vring_packed_tx_burst_py", "vring_packed_rx_burst",
    "vring_packed_rx_burst_py",
    "vhost_log_write", "vhost_log_write_py", "vhost_log_write_count",
    "vhost_log_write_count_py", "VHOST_LOG_PAGE",
    # atomics
    "load_acquire", "load_acquire_py", "store_release", "store_release_py",
    "load_relaxed", "load_relaxed_py", "atomic_or", "atomic_or_py", "atomic_xchg",
    "atomic_xchg_py", "fence_seq_cst", "fence_seq_cst_py", "borrow", "borrow_py",
    "keep_alive", "smp_load_acquire", "smp_store_release", "smp_mb",
    # status codes and errors
    "RING_OK", "E_AVAIL_IDX", "E_HEAD", "E_NEXT", "E_LOOP", "E_INDIRECT_NESTED",
    "E_INDIRECT_NEXT", "E_INDIRECT_LEN", "E_INDIRECT_ALIGN", "E_ZERO_LEN", "E_BUF_ADDR",
    "E_CHAIN_LEN", "E_CHAIN_SHORT", "E_FRAME_TOO_BIG", "E_DIRECTION", "E_RING_NUM",
    "E_RING_ADDR", "E_RING_ALIGN", "E_LOG_RANGE", "E_ARENA", "E_PACKED_FLAGS",
    "E_PACKED_ID", "ERRORS", "RingError", "DescriptorFlagsError",
    "AvailIndexError", "DescriptorIndexError",
    "DescriptorLoopError", "IndirectDescriptorError", "ZeroLengthBufferError",
    "BufferAddressError", "ChainLengthError", "DescriptorDirectionError",
    "RingConfigError", "RingAddressError", "RingLogError", "ring_error",
]
