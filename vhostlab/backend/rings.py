"""The device's rings: from vhost-user messages to the ring layer, and the datapath.

Control side (called by the handlers): memory tables, the dirty log and
SET_VRING_NUM/ADDR/BASE become `vhostlab.ring.Virtqueue` objects over the
mapped guest memory. SET_VRING_ADDR speaks in front-end virtual addresses
(QEMU's `userspace_addr` space); they are translated to GPAs here, and again
whenever the memory table changes (libvhost-user's map_ring does the same).

Data side (called by the server on a kick, or on every turn in poll mode):

    TX ring  `vring_tx_burst` copies guest frames into an arena (virtio-net
             header stripped), the wire takes them; a disabled ring's frames
             are taken and dropped ("must process and discard any TX
             packets", vhost-user.rst "Ring states").
    RX ring  frames for the guest (loopback wire, `inject`) wait in a bounded
             backlog per queue pair; `vring_rx_burst` copies them into the
             buffers the guest posted, whenever the ring is started and
             enabled and has buffers.

After a burst the call eventfd is signalled if the kernel decided the driver
wants an interrupt (VRING_AVAIL_F_NO_INTERRUPT, or EVENT_IDX's used_event).
While VHOST_F_LOG_ALL is on the kernels mark every page they write, and the
used ring at log_guest_addr when VHOST_VRING_F_LOG is set.

A guest that breaks a rule breaks only its ring: the ring layer raises a
RingError, the ring stays broken (no further access), the error is logged,
counted, and signalled on the err eventfd; every other ring runs on.
"""
from __future__ import annotations

import logging
import os

import numpy as np

from vhostlab.backend.device import (RX_BACKLOG_BYTES, RX_BACKLOG_FRAMES, VhostUserNetDevice,
                                     Vring)
from vhostlab.backend.errors import RequestError
from vhostlab.backend.overrides import decide_call, rx_burst_placed
from vhostlab.dirtylog import DirtyLog, DirtyLogError
from vhostlab.memory import GuestMemory, GuestMemoryError, UnmappedAddressError
from vhostlab.protocol import VHOST_LOG_PAGE, Feature, LogArea, Message, VringAddr
from vhostlab.ring import (FrameArena, RingError, Virtqueue, vring_avail_size,
                           vring_desc_size, vring_used_size)

logger = logging.getLogger("vhostlab.backend")

# What the ring layer implements, so the device may offer it.
RING_FEATURES = int(Feature.VIRTIO_RING_F_EVENT_IDX | Feature.VIRTIO_RING_F_INDIRECT_DESC
                    | Feature.VIRTIO_NET_F_MRG_RXBUF)
TX_BURST = 256                     # chains per TX burst
TX_ARENA_BYTES = 1 << 20           # holds a 64 KiB GSO frame many times over
# One service's weight, as Linux's vhost-net (drivers/vhost/net.c): after this many
# bytes or frames, or descriptors walked, the ring is serviced again on the next turn
# of the loop (at once, without waiting for a kick), so that other rings, the
# socket and stop() get their turn in between.
VHOST_NET_WEIGHT = 0x80000         # bytes
VHOST_NET_PKT_WEIGHT = 256         # frames
VHOST_NET_DESC_WEIGHT = 0x20000    # descriptors (Linux caps chains at UIO_MAXIOV instead)
MAX_GSO_FRAME = 65535              # the largest frame a TX chain may carry, MTU permitting


def _arena(dev: VhostUserNetDevice) -> FrameArena:
    """The device's TX arena (one per device: two back-ends in one process, as in the
    migration labs, run in two threads)."""
    if dev.tx_arena is None:
        dev.tx_arena = FrameArena(TX_ARENA_BYTES, TX_BURST)
    return dev.tx_arena


# -- control: memory, log, ring configuration --------------------------------------
def apply_features(dev: VhostUserNetDevice) -> None:
    """SET_FEATURES changed EVENT_IDX or the header size: tell every ring."""
    for vring in dev.vrings:
        if vring.ring is not None:
            vring.ring.set_event_idx(dev.has_feature(Feature.VIRTIO_RING_F_EVENT_IDX))


def replace_memory(dev: VhostUserNetDevice, memory: GuestMemory) -> None:
    """SET_MEM_TABLE: the new table replaces the old; rings are re-translated."""
    old, dev.memory = dev.memory, memory
    dev.memory_faults_seen = 0
    if old is not None:
        old.close()
    remap(dev)


def remap(dev: VhostUserNetDevice) -> None:
    """Translate every configured ring's addresses again after a memory change."""
    for vring in dev.vrings:
        if vring.addr is None or vring.ring is None:
            continue
        try:
            _map(dev, vring, vring.addr)
        except (GuestMemoryError, RingError, RequestError) as exc:
            _broken(dev, vring, f"vring {vring.index} after a memory table change: {exc}")


def replace_log(dev: VhostUserNetDevice, msg: Message, area: LogArea, fd: int) -> None:
    """SET_LOG_BASE: map the log QEMU shares (the fd stays the caller's).

    Refused, keeping the old log, if a ring that logs its used ring
    (VHOST_VRING_F_LOG) would fall outside the new one.
    """
    try:
        new = DirtyLog.from_fd(fd, area.mmap_size, area.mmap_offset)
    except DirtyLogError as exc:
        raise RequestError(msg.request.name, "mmap_size", area.mmap_size,
                           "a mappable log", str(exc)) from None
    try:
        for vring in dev.vrings:
            if vring.addr is not None and vring.addr.log_enabled:
                check_used_log(msg, vring.addr, vring.num, new.pages, "mmap_size")
    except RequestError:
        new.close()
        raise
    old, dev.log = dev.log, new
    if old is not None:
        old.close()


def check_used_log(msg: Message, addr: VringAddr, num: int, pages: int,
                   field: str = "log_guest_addr") -> None:
    """The used ring, logged at log_guest_addr, must lie inside a log of `pages` pages.

    vhost-user.rst "Migration": log_guest_addr "might be outside the legal
    guest physical address range ..., but the bit offset of the last byte of
    the ring must fall within the size supplied by VhostUserLog."
    """
    last_page = (addr.log_guest_addr + vring_used_size(num) - 1) // VHOST_LOG_PAGE
    if last_page >= pages:
        value = addr.log_guest_addr if field == "log_guest_addr" else pages // 8
        raise RequestError(
            msg.request.name, field, value, f"a log covering page {last_page}",
            f"vring {addr.index}'s used ring, logged at log_guest_addr "
            f"{addr.log_guest_addr:#x}, ends in page {last_page} but the log covers "
            f"pages 0..{pages - 1}")


def _translate(dev: VhostUserNetDevice, msg: Message | None, field: str, uaddr: int,
               size: int) -> int:
    try:
        return dev.memory.uva_to_gpa(uaddr, size)
    except UnmappedAddressError as exc:
        name = msg.request.name if msg is not None else "SET_VRING_ADDR"
        raise RequestError(name, field, uaddr, "a front-end address inside one region",
                           str(exc)) from None


def _map(dev: VhostUserNetDevice, vring: Vring, addr: VringAddr,
         msg: Message | None = None) -> None:
    num = vring.num
    desc = _translate(dev, msg, "desc_user_addr", addr.desc_user_addr, vring_desc_size(num))
    avail = _translate(dev, msg, "avail_user_addr", addr.avail_user_addr, vring_avail_size(num))
    used = _translate(dev, msg, "used_user_addr", addr.used_user_addr, vring_used_size(num))
    vq = vring.ring
    if vq is None:
        vq = Virtqueue(vring.index, "rx" if vring.is_rx else "tx")
        vq.set_num(num)
        vq.set_base(vring.base)
    vq.set_addr(desc, avail, used, addr.log_guest_addr, addr.flags, memory=dev.memory)
    # As libvhost-user and Linux vhost do: the used index is what the ring says.
    vq.state[0]["used_idx"] = int.from_bytes(dev.memory.read(used + 2, 2), "little")
    vq.set_event_idx(dev.has_feature(Feature.VIRTIO_RING_F_EVENT_IDX))
    vring.ring, vring.addr = vq, addr


def set_addr(dev: VhostUserNetDevice, msg: Message, vring: Vring, addr: VringAddr) -> None:
    """SET_VRING_ADDR: translate desc/avail/used (front-end addresses) and map the ring.

    Also on a started ring: QEMU turns VHOST_VRING_F_LOG on and off this way
    while the ring runs, and Linux vhost, DPDK and libvhost-user all accept
    new addresses there too (re-translated and checked like the first ones).
    """
    if vring.num == 0:
        raise RequestError(msg.request.name, "index", vring.index, "a ring with a size",
                           "SET_VRING_NUM must come first")
    if dev.memory is None:
        raise RequestError(msg.request.name, "desc_user_addr", addr.desc_user_addr,
                           "a memory table", "no SET_MEM_TABLE yet")
    if addr.log_enabled and dev.log is not None and not dev.log.closed:
        # The log may come later (QEMU's vhost_dev_start sends it last); once
        # there is one, a ring that logs must fit in it.
        check_used_log(msg, addr, vring.num, dev.log.pages)
    try:
        _map(dev, vring, addr, msg)
    except RingError as exc:
        raise RequestError(msg.request.name, exc.field or "addr", exc.value, exc.limit,
                           str(exc)) from None


def set_base(dev: VhostUserNetDevice, vring: Vring, num: int) -> None:
    """SET_VRING_BASE: the next avail entry to take; a broken ring starts afresh.

    Only last_avail_idx comes with the message: "The device is supposed to
    read the next index in the Used Ring from the respective vring structure
    in guest memory" (vhost-user.rst, SET_VRING_BASE). SET_VRING_ADDR reads
    it; a ring already mapped reads it again here.
    """
    vring.base = num
    if vring.ring is not None and vring.ring.broken:
        vring.ring, vring.error = None, None
    vq = vring.ring
    if vq is None:
        return
    vq.set_base(num)
    if dev.memory is not None and not dev.memory.closed:
        try:
            vq.state[0]["used_idx"] = int.from_bytes(dev.memory.read(vq.used + 2, 2), "little")
        except GuestMemoryError as exc:
            _broken(dev, vring, f"vring {vring.index}: used ring unreadable: {exc}")


def check_shrunk(dev: VhostUserNetDevice) -> None:
    """Report (once) a front-end that shrank the file behind guest memory or the log.

    The SIGBUS guard (vhostlab.sigbus) kept the process alive and put zero
    pages where the file's pages were; what the rings read there is
    meaningless, so every ring stops until the front-end configures it again,
    and a shrunk log is dropped until the next SET_LOG_BASE.
    """
    memory = dev.memory
    if memory is not None and not memory.closed and \
            memory.sigbus_faults != dev.memory_faults_seen:
        dev.memory_faults_seen = memory.sigbus_faults
        text = (f"guest memory shrank under {memory.shrunk_region()}: the front-end "
                "truncated the file behind it after SET_MEM_TABLE/ADD_MEM_REG "
                "(mmap_offset + memory_size now lie past its end); every ring stopped")
        dev.error(text)
        for vring in dev.vrings:
            if vring.started:
                vring.started = False
                vring.error = text
                if vring.err_fd >= 0:
                    _signal(vring.err_fd)
    if dev.log is not None and dev.log.shrunk:
        dev.error(f"SET_LOG_BASE: the dirty log shrank under the back-end (the front-end "
                  f"truncated its file below mmap_size {dev.log.size:#x}); logging stopped "
                  "until the next SET_LOG_BASE")
        dev.log.close()
        dev.log = None


def start(dev: VhostUserNetDevice, vring: Vring) -> None:
    """A ring just started or was enabled: serve what is already waiting."""
    if vring.started:
        service(dev, vring)


# -- data ----------------------------------------------------------------------------
def _runnable(dev: VhostUserNetDevice, vring: Vring) -> bool:
    vq = vring.ring
    return (vring.started and vq is not None and not vq.broken and dev.memory is not None
            and not dev.memory.closed)


def _log(dev: VhostUserNetDevice):
    return dev.log if dev.logging else None


def _broken(dev: VhostUserNetDevice, vring: Vring, text: str) -> None:
    vring.error = text
    dev.error(text)
    if vring.err_fd >= 0:                   # SET_VRING_ERR: "signal when error occurs"
        _signal(vring.err_fd)


def _signal(fd: int) -> None:
    try:
        os.eventfd_write(fd, 1)
    except BlockingIOError:
        pass                                # the counter is saturated: already signalled


def _call(dev: VhostUserNetDevice, vring: Vring) -> None:
    """Signal the call eventfd if the burst decided the driver wants an interrupt
    (or, when this device has an override, if the override decided so)."""
    hooks = dev.overrides
    if hooks is not None and hooks.should_signal is not None:
        need = decide_call(dev, vring, hooks)
    else:
        need = vring.ring.take_call()
    if need and vring.call_fd >= 0:
        _signal(vring.call_fd)
        dev.counters.calls += 1


def service(dev: VhostUserNetDevice, vring: Vring) -> bool:
    """Run the ring's bursts up to one service's weight; True if work is left.

    The caller services the ring again at once when True comes back (Linux's
    vhost_poll_queue after vhost_exceeds_weight): with EVENT_IDX the driver
    does not kick for chains it already published.
    """
    try:
        if vring.is_rx:
            return _service_rx(dev, vring.queue_pair)
        if not _runnable(dev, vring):
            return False
        return _service_tx(dev, vring)
    except Exception as exc:        # a bug must cost one ring, not the server
        logger.exception("vring %d failed", vring.index)
        vring.started = False
        _broken(dev, vring, f"vring {vring.index}: internal error: "
                            f"{exc.__class__.__name__}: {exc}")
        return False
    finally:
        check_shrunk(dev)


def poll_all(dev: VhostUserNetDevice) -> bool:
    """Service every started ring once (poll mode); True if any has work left."""
    more = False
    for vring in dev.vrings:
        if vring.started:
            more |= service(dev, vring)
    return more


def max_chain(dev: VhostUserNetDevice) -> int:
    """The longest TX chain taken as a frame: max(MTU, 65535) plus the header."""
    return max(dev.mtu, MAX_GSO_FRAME) + dev.hdr_len


def _weigh(vq) -> None:
    """Start a service: the descriptor weight counts from zero."""
    s = vq.state[0]
    s["descs"], s["desc_budget"] = 0, VHOST_NET_DESC_WEIGHT


def _count_logged(dev: VhostUserNetDevice, vq, logged0: int) -> None:
    dev.counters.pages_logged += int(vq.state[0]["logged"]) - logged0


def _service_tx(dev: VhostUserNetDevice, vring: Vring) -> bool:
    vq, arena, log, hdr_len = vring.ring, _arena(dev), _log(dev), dev.hdr_len
    state = vq.state[0]                 # the kernels' counters, read once a burst
    _weigh(vq)
    state["max_chain"] = max_chain(dev)
    logged0, oversized0 = int(state["logged"]), int(state["oversized"])
    frames = nbytes = 0
    error = None
    while True:
        bytes0 = int(state["bytes"])
        try:
            n = vq.tx_burst(dev.memory, arena, log=log, hdr_len=hdr_len, max_frames=TX_BURST)
        except RingError as exc:
            # Without its traceback: the frames it holds hold views of guest
            # memory, which would keep a closed memory table mapped until
            # the garbage collector finds the cycle through `error`.
            error, n = exc.with_traceback(None), exc.frames
        sent = int(state["bytes"]) - bytes0
        frames, nbytes = frames + n, nbytes + sent
        if n:
            dev.counters.guest_tx_frames += n
            dev.counters.guest_tx_bytes += sent
            if vring.enabled:
                dev.wire.send(arena, vring.queue_pair)
            else:
                dev.counters.dropped += n
        _call(dev, vring)
        if error is not None:
            _broken(dev, vring, str(error))
            break
        if not state["avail_pending"] or frames >= VHOST_NET_PKT_WEIGHT \
                or nbytes >= VHOST_NET_WEIGHT or state["descs"] >= state["desc_budget"]:
            break
    _count_logged(dev, vq, logged0)
    oversized = int(state["oversized"]) - oversized0
    if oversized:
        dev.counters.dropped += oversized
        dev.error(f"vring {vring.index}: {oversized} TX chain(s) over the limit of "
                  f"{int(state['max_chain'])} bytes (max(MTU {dev.mtu}, {MAX_GSO_FRAME}) + "
                  f"{hdr_len}-byte header) dropped; the last, head {int(state['oversized_head'])},"
                  f" was {int(state['oversized_len'])} bytes or more")
    return _leftover(dev, vring, error is None and bool(state["avail_pending"]))


def deliver(dev: VhostUserNetDevice, arena: FrameArena, pair: int) -> None:
    """Queue frames for the guest's RX ring of `pair` and deliver what fits now.

    The backlog is bounded by frames (RX_BACKLOG_FRAMES) and by bytes
    (RX_BACKLOG_BYTES) per queue pair; what does not fit is dropped.
    """
    if arena.count == 0:
        return
    room = RX_BACKLOG_FRAMES - dev.backlog_frames[pair]
    room_bytes = RX_BACKLOG_BYTES - dev.backlog_bytes[pair]
    sizes = arena.lengths[:min(max(room, 0), arena.count)]
    fit = int(np.searchsorted(np.cumsum(sizes), room_bytes, side="right")) if sizes.size else 0
    if fit <= 0:
        dev.counters.dropped += arena.count
        return
    copy = _copy_arena(arena, fit)
    dev.counters.dropped += arena.count - copy.count
    dev.backlog[pair].append(copy)
    dev.backlog_frames[pair] += copy.count
    dev.backlog_bytes[pair] += copy.used_bytes
    vring = dev.vrings[2 * pair]
    if _runnable(dev, vring):
        _service_rx(dev, pair)


def _copy_arena(arena: FrameArena, count: int) -> FrameArena:
    """The first `count` frames of `arena`, packed into a new arena of their own."""
    sizes = arena.lengths[:count]
    out = FrameArena(max(1, int(sizes.sum())), max(1, count))
    pos = 0
    for k in range(count):
        start, size = int(arena.offsets[k]), int(sizes[k])
        out.buf[pos:pos + size] = arena.buf[start:start + size]
        out.offsets[k], out.lengths[k] = pos, size
        pos += size
    out.count = count
    return out


def _service_rx(dev: VhostUserNetDevice, pair: int) -> bool:
    backlog = dev.backlog[pair]
    if not backlog:
        return False
    vring = dev.vrings[2 * pair]
    if not vring.enabled or not _runnable(dev, vring):
        return False
    vq, log = vring.ring, _log(dev)
    state = vq.state[0]
    _weigh(vq)
    logged0 = int(state["logged"])
    mrg = dev.has_feature(Feature.VIRTIO_NET_F_MRG_RXBUF)
    frames = nbytes = 0
    more = False
    while backlog:
        arena = backlog[0]
        frames0, bytes0, dropped0 = vq.frames, vq.bytes, vq.dropped
        error = None
        try:
            if dev.overrides is not None and dev.overrides.place_frame is not None and mrg:
                done = rx_burst_placed(dev, vq, arena, dev.hdr_len, dev.overrides, log=log)
            else:
                done = vq.rx_burst(dev.memory, arena, log=log, hdr_len=dev.hdr_len,
                                   mrg_rxbuf=mrg)
        except RingError as exc:
            error, done = exc.with_traceback(None), exc.frames     # (see _service_tx)
        dev.counters.guest_rx_frames += vq.frames - frames0
        dev.counters.guest_rx_bytes += vq.bytes - bytes0
        dev.counters.dropped += vq.dropped - dropped0
        frames, nbytes = frames + done, nbytes + vq.bytes - bytes0
        _call(dev, vring)
        dev.backlog_frames[pair] -= done
        dev.backlog_bytes[pair] -= int(arena.lengths[:done].sum())
        if error is not None:
            arena.drop_front(done)
            _broken(dev, vring, str(error))
            break
        if done < arena.count:          # out of RX buffers, or the weight is spent:
            arena.drop_front(done)      # the rest waits (for a kick, or the next turn)
            more = state["descs"] >= state["desc_budget"]
            break
        backlog.popleft()
        if frames >= VHOST_NET_PKT_WEIGHT or nbytes >= VHOST_NET_WEIGHT \
                or state["descs"] >= state["desc_budget"]:
            more = bool(backlog)
            break
    _count_logged(dev, vq, logged0)
    return _leftover(dev, vring, bool(more))


def _leftover(dev: VhostUserNetDevice, vring: Vring, more: bool) -> bool:
    """Remember in ``dev.busy`` the rings a service left work on (the server
    services them again on its next turn, without waiting for a kick)."""
    more = more and _runnable(dev, vring)
    if more:
        dev.busy.add(vring.index)
    else:
        dev.busy.discard(vring.index)
    return more
