"""``VhostDev``: hw/virtio/vhost.c's calling sequences, step for step, in Python.

Theory of operation
-------------------
QEMU's generic vhost code never talks to a back-end directly; it calls the
VhostOps table (vhost_ops.py) in fixed sequences. This module keeps those
sequences and their names, so the built-in front-end's trace reads like a
real QEMU's:

* ``vhost_dev_init``: vhost_backend_init, vhost_set_owner, vhost_get_features,
  then vhost_virtqueue_init per ring (SET_VRING_CALL with a masked notifier).
* ``vhost_dev_start``: vhost_dev_set_features, vhost_set_mem_table, per ring
  vhost_virtqueue_start (SET_VRING_NUM, SET_VRING_BASE, SET_VRING_ADDR,
  SET_VRING_KICK, SET_VRING_CALL), then vhost_set_log_base when logging is on.
* ``vhost_log_global_start`` -> vhost_migration_log -> vhost_dev_log_resize
  (SET_LOG_BASE) -> vhost_dev_set_log -> vhost_dev_set_features (SET_FEATURES
  with VHOST_F_LOG_ALL) + vhost_virtqueue_set_addr (SET_VRING_ADDR with
  VHOST_VRING_F_LOG) per ring.
* ``vhost_dev_stop``: vhost_virtqueue_stop per ring (GET_VRING_BASE), then
  vhost_log_put(sync=True), whose vhost_log_sync is the last read of the log.
* ``vhost_log_sync``: read and clear the log with an atomic exchange per
  64-bit chunk (vhost_dev_sync_region) and hand the dirty pages on, as QEMU
  hands them to memory_region_set_dirty() for migration to copy again.

The device the rings belong to (QEMU's VirtIODevice) is any object with the
small interface ``VirtioDevice`` below; the built-in guest (guest.py) is one.
``timeline`` interleaves the vhost.c functions entered, the VhostOps called
(each with its nesting depth) and the messages sent and received, in the
order they happened.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np

from vhostlab.dirtylog import DirtyLog, vhost_get_log_size
from vhostlab.protocol import VHOST_VRING_F_LOG, Feature

from .optable import VhostOpsError
from .vhost_ops import VhostOps

__all__ = ["VhostDev", "VhostVirtqueue", "VirtioDevice", "TimelineEntry"]


class VirtioDevice(Protocol):
    """What vhost.c asks of the VirtIODevice (hw/virtio/virtio.c accessors)."""

    def virtio_queue_get_desc_addr(self, idx: int) -> int: ...
    def virtio_queue_get_avail_addr(self, idx: int) -> int: ...
    def virtio_queue_get_used_addr(self, idx: int) -> int: ...
    def virtio_queue_get_num(self, idx: int) -> int: ...
    def virtio_queue_get_desc_size(self, idx: int) -> int: ...
    def virtio_queue_get_avail_size(self, idx: int) -> int: ...
    def virtio_queue_get_used_size(self, idx: int) -> int: ...
    def virtio_queue_get_last_avail_idx(self, idx: int) -> int: ...
    def virtio_queue_set_last_avail_idx(self, idx: int, value: int) -> None: ...
    def host_notifier_fd(self, idx: int) -> int: ...
    def guest_notifier_fd(self, idx: int) -> int: ...
    @property
    def memory(self): ...          # a GuestMemory: regions, gpa_to_uva()
    @property
    def guest_features(self) -> int: ...


@dataclass
class VhostVirtqueue:
    """struct vhost_virtqueue: what vhost.c remembers of one ring."""

    index: int
    num: int = 0
    desc_phys: int = 0
    avail_phys: int = 0
    used_phys: int = 0
    used_size: int = 0
    desc: int = 0      # front-end virtual addresses (vhost_memory_map)
    avail: int = 0
    used: int = 0
    masked_notifier: int = -1   # an eventfd, as event_notifier_init() makes


@dataclass(frozen=True)
class TimelineEntry:
    """One step at nesting ``depth``: ``kind`` is "call" (a vhost.c function
    entered), "op" (a VhostOps op called), "message" (``record``, a TraceRecord)
    or "event" (a step named by the caller, with ``detail``)."""

    kind: str
    name: str
    depth: int = 0
    record: object = None
    detail: dict = field(default_factory=dict)


def vhost_fn(method):
    """Record entry into a vhost.c function in the timeline, nested by depth."""
    name = method.__name__

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        self.timeline.append(TimelineEntry("call", name, self._depth))
        self._depth += 1
        try:
            return method(self, *args, **kwargs)
        finally:
            self._depth -= 1

    return wrapper


class VhostDev:
    """struct vhost_dev with the functions of hw/virtio/vhost.c that drive it.

    ``dirty_sink`` receives the page numbers each vhost_log_sync finds dirty
    (QEMU: memory_region_set_dirty, i.e. the migration bitmap).
    """

    def __init__(self, ops: VhostOps, nvqs: int = 2, vq_index: int = 0,
                 dirty_sink: Callable[[np.ndarray], None] | None = None):
        self.vhost_ops = ops
        self.nvqs, self.vq_index = nvqs, vq_index
        self.vqs = [VhostVirtqueue(vq_index + i) for i in range(nvqs)]
        self.vdev: VirtioDevice | None = None
        self.features = 0
        self.acked_features = 0
        self.log: DirtyLog | None = None
        self.log_size = 0          # in VHOST_LOG_CHUNK units (u64 words), as QEMU
        self.log_enabled = False
        self.started = False
        self.migration_blocker: str | None = None
        self.dirty_sink = dirty_sink
        self.syncs = 0
        self.pages_logged = 0
        # Exercises' knobs: a function(log as u64 words) -> dirty pages that reads and
        # clears the log instead of DirtyLog.sync; whether SET_VRING_ADDR asks for
        # the used ring to be logged (VHOST_VRING_F_LOG) while logging is on.
        self.log_sync: Callable[[np.ndarray], object] | None = None
        self.log_used_ring = True
        self.timeline: list[TimelineEntry] = []
        self._depth = 0
        ops.channel.listeners.append(self._on_message)
        ops.op_hooks.append(self._on_op)

    def _on_message(self, record) -> None:
        self.timeline.append(TimelineEntry("message", record.request, self._depth, record))

    def _on_op(self, name: str, entering: bool) -> None:
        if entering:
            self.timeline.append(TimelineEntry("op", name, self._depth))
            self._depth += 1
        else:
            self._depth -= 1

    @property
    def ops_called(self) -> list[str]:
        """VhostOps called so far, in order (the ops' own list)."""
        return self.vhost_ops.ops_called

    def mark(self, name: str, **detail) -> None:
        """Add a named step of one's own (e.g. "migration round 2") to the timeline."""
        self.timeline.append(TimelineEntry("event", name, self._depth, None, detail))

    # -- init / cleanup -------------------------------------------------------
    @vhost_fn
    def vhost_dev_init(self) -> None:
        """Negotiate, claim the back-end, and give each ring a masked call notifier."""
        ops = self.vhost_ops
        ops.vhost_backend_init()
        ops.vhost_set_owner()
        self.features = ops.vhost_get_features()
        for vq in self.vqs:
            self.vhost_virtqueue_init(vq)
        if not self.features & Feature.VHOST_F_LOG_ALL:
            self.migration_blocker = "Migration disabled: vhost lacks VHOST_F_LOG_ALL feature."
        else:
            self.migration_blocker = ops.migration_blocker

    @vhost_fn
    def vhost_virtqueue_init(self, vq: VhostVirtqueue) -> None:
        """SET_VRING_CALL with a masked notifier until the guest's own is known."""
        vq.masked_notifier = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        idx = self.vhost_ops.vhost_get_vq_index(vq.index)
        self.vhost_ops.vhost_set_vring_call(idx, vq.masked_notifier)

    @vhost_fn
    def vhost_dev_cleanup(self) -> None:
        """Close the masked notifiers and the back-end connection; free the log."""
        if self.log is not None:
            self.vhost_log_put(False)
        for vq in self.vqs:
            if vq.masked_notifier >= 0:
                os.close(vq.masked_notifier)
                vq.masked_notifier = -1
        self.vhost_ops.vhost_backend_cleanup()

    # -- start ---------------------------------------------------------------
    @vhost_fn
    def vhost_dev_set_features(self, enable_log: bool) -> None:
        """SET_FEATURES with the acked features, plus VHOST_F_LOG_ALL when logging."""
        features = self.acked_features
        if enable_log:
            features |= int(Feature.VHOST_F_LOG_ALL)
        features &= ~int(Feature.VIRTIO_F_ACCESS_PLATFORM)   # no vIOMMU here
        self.vhost_ops.vhost_set_features(features)

    @vhost_fn
    def vhost_dev_start(self, vdev: VirtioDevice) -> None:
        """Start the device: features, memory table, every ring, then the log if on."""
        self.started = True
        self.vdev = vdev
        self.acked_features = vdev.guest_features & self.features
        try:
            self.vhost_dev_set_features(self.log_enabled)
            self.vhost_ops.vhost_set_mem_table(vdev.memory)
            for vq in self.vqs:
                self.vhost_virtqueue_start(vdev, vq, vq.index)
            if self.log_enabled:
                self.log_size = self.vhost_get_log_size()
                self.log = self.vhost_log_get(self.log_size)
                self.vhost_ops.vhost_set_log_base(self.log)
        except BaseException:
            # QEMU unwinds (fail_log/fail_vq/...): the device is not started.
            if self.log is not None:
                self.log.close()
                self.log, self.log_size = None, 0
            self.started = False
            raise

    @vhost_fn
    def vhost_virtqueue_start(self, vdev: VirtioDevice, vq: VhostVirtqueue, idx: int) -> None:
        """SET_VRING_NUM, SET_VRING_BASE, SET_VRING_ADDR, SET_VRING_KICK, SET_VRING_CALL."""
        ops = self.vhost_ops
        vhost_vq_index = ops.vhost_get_vq_index(idx)
        if vdev.virtio_queue_get_desc_addr(idx) == 0:
            return   # "Queue might not be ready for start"
        vq.num = vdev.virtio_queue_get_num(idx)
        ops.vhost_set_vring_num(vhost_vq_index, vq.num)
        ops.vhost_set_vring_base(vhost_vq_index, vdev.virtio_queue_get_last_avail_idx(idx))
        vq.desc_phys = vdev.virtio_queue_get_desc_addr(idx)
        vq.avail_phys = vdev.virtio_queue_get_avail_addr(idx)
        vq.used_phys = vdev.virtio_queue_get_used_addr(idx)
        vq.used_size = vdev.virtio_queue_get_used_size(idx)
        # vhost_memory_map(): the front-end's own mapping of each part.
        vq.desc = vdev.memory.gpa_to_uva(vq.desc_phys)
        vq.avail = vdev.memory.gpa_to_uva(vq.avail_phys)
        vq.used = vdev.memory.gpa_to_uva(vq.used_phys)
        self.vhost_virtqueue_set_addr(vq, vhost_vq_index, self.log_enabled)
        ops.vhost_set_vring_kick(vhost_vq_index, vdev.host_notifier_fd(idx))
        # vhost_virtqueue_mask(..., false): the guest notifier replaces the masked one.
        ops.vhost_set_vring_call(vhost_vq_index, vdev.guest_notifier_fd(idx))

    @vhost_fn
    def vhost_virtqueue_set_addr(self, vq: VhostVirtqueue, idx: int, enable_log: bool) -> None:
        """SET_VRING_ADDR: user addresses of the ring (packed: descriptor ring,
        driver area, device area), and log_guest_addr (:meth:`log_guest_addr`)."""
        self.vhost_ops.vhost_set_vring_addr(
            idx, desc_user_addr=vq.desc, used_user_addr=vq.used, avail_user_addr=vq.avail,
            log_guest_addr=self.log_guest_addr(vq),
            flags=VHOST_VRING_F_LOG if enable_log and self.log_used_ring else 0)

    def log_guest_addr(self, vq: VhostVirtqueue) -> int:
        """The GPA the back-end logs its ring writes against: the used ring's.

        A packed ring's device writes go to the descriptor ring, and DPDK logs
        them at log_guest_addr + the descriptor's offset (vhost_log_cache_used_vring),
        so for packed rings this is the descriptor ring's GPA. QEMU sends
        ``used_phys`` for both formats, which for a packed ring is the device
        event area: DPDK then marks the pages after the descriptors it wrote,
        and a migration loses them (with the built-in guest: 64 of 80 frames).
        """
        if self.acked_features & Feature.VIRTIO_F_RING_PACKED:
            return vq.desc_phys
        return vq.used_phys

    # -- stop ----------------------------------------------------------------
    @vhost_fn
    def vhost_dev_stop(self, vdev: VirtioDevice) -> dict[int, int]:
        """Stop every ring (GET_VRING_BASE), then vhost_log_put(sync=True).

        Returns {queue index: last_avail_idx} as the back-end reported it.
        """
        bases = {}
        for vq in self.vqs:
            base = self.vhost_virtqueue_stop(vdev, vq, vq.index)
            if base is not None:
                bases[vq.index] = base
        self.vhost_log_put(True)
        self.started = False
        self.vdev = None
        return bases

    @vhost_fn
    def vhost_virtqueue_stop(self, vdev: VirtioDevice, vq: VhostVirtqueue, idx: int):
        """GET_VRING_BASE, and keep the number: virtio_queue_set_last_avail_idx()."""
        vhost_vq_index = self.vhost_ops.vhost_get_vq_index(idx)
        if vdev.virtio_queue_get_desc_addr(idx) == 0:
            return None   # "Don't stop the virtqueue which might have not been started"
        base = self.vhost_ops.vhost_get_vring_base(vhost_vq_index)
        vdev.virtio_queue_set_last_avail_idx(idx, base)
        return base

    # -- vhost-net's wrapper (hw/net/vhost_net.c) ------------------------------
    @vhost_fn
    def vhost_net_start(self, vdev: VirtioDevice) -> None:
        """vhost_dev_start, then SET_VRING_ENABLE(1) (rings start disabled with
        VHOST_USER_F_PROTOCOL_FEATURES, vhost-user.rst "Ring states")."""
        self.vhost_dev_start(vdev)
        if self.features & Feature.VHOST_USER_F_PROTOCOL_FEATURES:
            self.vhost_ops.vhost_set_vring_enable(True)

    # -- dirty log -----------------------------------------------------------
    def vhost_get_log_size(self) -> int:
        """Log size in u64 chunks: enough bits for the highest guest page of any region."""
        return vhost_get_log_size(self.vdev.memory.regions)

    def vhost_log_get(self, size: int) -> DirtyLog:
        """A zeroed log of ``size`` u64 chunks; a memfd when the back-end needs shared memory."""
        if not self.vhost_ops.vhost_requires_shm_log():
            raise VhostOpsError("vhost_log_get: the back-end did not negotiate LOG_SHMFD, "
                                "so it cannot map a log (QEMU blocks migration)")
        return DirtyLog.allocate(size * 8)

    @vhost_fn
    def vhost_dev_log_resize(self, size: int) -> None:
        """A new log, SET_LOG_BASE to switch the back-end to it, then drop the old one."""
        log = self.vhost_log_get(size)
        # "inform backend of log switching, this must be done before
        # releasing the current log, to ensure no logging is lost"
        self.vhost_ops.vhost_set_log_base(log)
        self.vhost_log_put(True)
        self.log, self.log_size = log, size

    @vhost_fn
    def vhost_dev_set_log(self, enable_log: bool) -> None:
        """SET_FEATURES (+/- LOG_ALL), then SET_VRING_ADDR (+/- F_LOG) per ring."""
        self.vhost_dev_set_features(enable_log)
        for vq in self.vqs:
            idx = self.vhost_ops.vhost_get_vq_index(vq.index)
            if self.vdev.virtio_queue_get_desc_addr(idx) == 0:
                continue
            self.vhost_virtqueue_set_addr(vq, idx, enable_log)

    @vhost_fn
    def vhost_migration_log(self, enable: bool) -> None:
        """Turn dirty logging on (resize + set_log) or off (set_log + put)."""
        if enable == self.log_enabled:
            return
        if not self.started:
            self.log_enabled = enable
            return
        if enable:
            self.vhost_dev_log_resize(self.vhost_get_log_size())
            self.vhost_dev_set_log(True)
        else:
            self.vhost_dev_set_log(False)
            self.vhost_log_put(False)
        self.log_enabled = enable

    @vhost_fn
    def vhost_log_global_start(self) -> None:
        """Migration begins: the memory listener's log_global_start."""
        self.vhost_migration_log(True)

    @vhost_fn
    def vhost_log_global_stop(self) -> None:
        """Migration ended or was cancelled: the memory listener's log_global_stop."""
        self.vhost_migration_log(False)

    @vhost_fn
    def vhost_log_sync(self) -> np.ndarray:
        """Read and clear the log (vhost_dev_sync_region), hand the pages to ``dirty_sink``.

        Only pages inside guest RAM regions or a ring's used area count, as in
        vhost_sync_dirty_bitmap(). Returns the dirty page numbers (sorted).
        """
        if not self.log_enabled or not self.started or self.log is None:
            return np.zeros(0, dtype=np.uint64)
        if self.log_sync is None:
            pages = self.log.sync()   # vhost_dev_sync_region over the whole log
        else:
            pages = np.unique(np.asarray(self.log_sync(self.log.bitmap.view(np.uint64)),
                                         dtype=np.int64))
        self.syncs += 1
        pages = self._in_guest_ram(pages)
        self.pages_logged += int(pages.size)
        if self.dirty_sink is not None and pages.size:
            self.dirty_sink(pages)
        return pages

    def _in_guest_ram(self, pages: np.ndarray) -> np.ndarray:
        pages = np.asarray(pages, dtype=np.uint64)
        keep = np.zeros(pages.shape, dtype=bool)
        for r in self.vdev.memory.regions:
            first = r.guest_phys_addr // 4096
            last = (r.guest_phys_addr + r.memory_size - 1) // 4096
            keep |= (pages >= first) & (pages <= last)
        return pages[keep]

    @vhost_fn
    def vhost_log_put(self, sync: bool) -> None:
        """Drop the log; with ``sync`` read it one last time first (vhost_log_sync_range)."""
        log = self.log
        if log is None:
            return
        if self.log_size and sync:
            self.vhost_log_sync()
        self.log = None
        self.log_size = 0
        log.close()
