"""The device's rings: from vhost-user ring messages to the ring layer.

Memory tables, the dirty log and SET_VRING_NUM/ADDR/BASE become rings of the
ring layer (`vhostlab.ring.make_ring`, in the device's ring format) over the
mapped guest memory. SET_VRING_ADDR speaks in front-end virtual addresses
(QEMU's `userspace_addr` space); they are translated to GPAs here, and again
whenever the memory table changes (libvhost-user's map_ring does the same).

The datapath (the TX/RX service) is the virtio-net device's:
`net_device.NetDevice`. `service`, `poll_all`, `deliver` and `check_shrunk`
stay here as names for it.
"""
from __future__ import annotations

from vhostlab.backend.device import VhostUserNetDevice, Vring
from vhostlab.backend.errors import RequestError
from vhostlab.dirtylog import DirtyLog, DirtyLogError
from vhostlab.memory import GuestMemory, GuestMemoryError, UnmappedAddressError
from vhostlab.protocol import VHOST_LOG_PAGE, Feature, LogArea, Message, VringAddr
from vhostlab.ring import FrameArena, RingError, make_ring, ring_format

# -- control: memory, log, ring configuration --------------------------------------
def apply_features(dev: VhostUserNetDevice) -> None:
    """SET_FEATURES changed EVENT_IDX or the header size: tell every ring.

    The ring format follows the features: packed once VIRTIO_F_RING_PACKED is
    acked, else the device's other format (split). A ring already made in the
    other format is made again in the new one (from what the front-end said).
    """
    packed = dev.has_feature(Feature.VIRTIO_F_RING_PACKED)
    fmt = "packed" if packed else dev.unpacked_ring_format
    if fmt != dev.ring_format:
        dev.ring_format = fmt
        for vring in dev.vrings:
            if vring.ring is not None:
                vring.ring = None
                try:
                    _map(dev, vring, vring.addr)
                except (GuestMemoryError, RingError, RequestError) as exc:
                    dev.net.broken(vring, f"vring {vring.index} in the {fmt} format: {exc}")
    for vring in dev.vrings:
        if vring.ring is not None:
            vring.ring.set_event_idx(dev.has_feature(Feature.VIRTIO_RING_F_EVENT_IDX))


def _probe(dev: VhostUserNetDevice, msg: Message, vring: Vring, num: int | None,
           base: int | None) -> None:
    """Refuse a queue size or a base the device's ring format does not take
    (a fresh ring of that format is the judge)."""
    ring = make_ring(dev.ring_format, vring.index)
    if num is not None:
        try:
            ring.set_num(num)
        except RingError:
            # The rule in one line, as the spec states it for this format.
            raise RequestError(msg.request.name, "num", num, ring.NUM_RULE) from None
        return
    try:
        if vring.num:
            ring.set_num(vring.num)
        ring.set_base(base)
    except RingError as exc:
        raise RequestError(msg.request.name, "num", base, exc.limit,
                           f"{dev.ring_format} ring: {exc.reason or exc}") from None


def check_num(dev: VhostUserNetDevice, msg: Message, vring: Vring, num: int) -> None:
    """SET_VRING_NUM: a size the ring format takes (split: a power of 2)."""
    _probe(dev, msg, vring, num, None)


def check_base(dev: VhostUserNetDevice, msg: Message, vring: Vring, num: int) -> None:
    """SET_VRING_BASE: a base the ring format takes (split: 16 bits; packed:
    32 bits whose positions lie inside the ring)."""
    _probe(dev, msg, vring, None, num)


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
            dev.net.broken(vring, f"vring {vring.index} after a memory table change: {exc}")


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
                check_used_log(msg, vring.addr, vring.num, new.pages, "mmap_size",
                               dev.ring_format)
    except RequestError:
        new.close()
        raise
    old, dev.log = dev.log, new
    if old is not None:
        old.close()


def check_used_log(msg: Message, addr: VringAddr, num: int, pages: int,
                   field: str = "log_guest_addr", fmt: str = "split") -> None:
    """The used ring, logged at log_guest_addr, must lie inside a log of `pages` pages.

    vhost-user.rst "Migration": log_guest_addr "might be outside the legal
    guest physical address range ..., but the bit offset of the last byte of
    the ring must fall within the size supplied by VhostUserLog."
    """
    used_size = ring_format(fmt, addr.index).area_sizes(num)[2]
    last_page = (addr.log_guest_addr + used_size - 1) // VHOST_LOG_PAGE
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
    sizes = ring_format(dev.ring_format, vring.index).area_sizes(num)
    desc, avail, used = (_translate(dev, msg, f"{area}_user_addr", uaddr, size)
                         for area, uaddr, size in zip(
                             ("desc", "avail", "used"),
                             (addr.desc_user_addr, addr.avail_user_addr, addr.used_user_addr),
                             sizes))
    vq = vring.ring
    if vq is None:
        vq = make_ring(dev.ring_format, vring.index, "rx" if vring.is_rx else "tx")
        vq.set_num(num)
        vq.set_base(vring.base)
    vq.set_addr(desc, avail, used, addr.log_guest_addr, addr.flags, memory=dev.memory)
    # As libvhost-user and Linux vhost do: the used index is what the ring says.
    vq.sync_used_idx(dev.memory)
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
        check_used_log(msg, addr, vring.num, dev.log.pages, fmt=dev.ring_format)
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
    vring.configure_afresh()
    vq = vring.ring
    if vq is None:
        return
    vq.set_base(num)
    if dev.memory is not None and not dev.memory.closed:
        try:
            vq.sync_used_idx(dev.memory)
        except GuestMemoryError as exc:
            dev.net.broken(vring, f"vring {vring.index}: used ring unreadable: {exc}")


def start(dev: VhostUserNetDevice, vring: Vring) -> None:
    """A ring just started or was enabled: serve what is already waiting."""
    if vring.started:
        dev.net.service(vring)


# -- the datapath, by the names the server and the labs use ----------------------------
def service(dev: VhostUserNetDevice, vring: Vring) -> bool:
    return dev.net.service(vring)


def poll_all(dev: VhostUserNetDevice) -> bool:
    return dev.net.poll_all()


def deliver(dev: VhostUserNetDevice, arena: FrameArena, pair: int) -> None:
    dev.net.deliver(arena, pair)


def check_shrunk(dev: VhostUserNetDevice) -> None:
    dev.check_shrunk()
