"""One handler per vhost-user request, dispatched from one table keyed by request id.

Every handler has the same signature, `handler(dev, msg, fds) -> reply payload | None`,
and starts with the same checks through the helpers below: feature gate
(`_gate`), queue index (`_vring`), fd count (`_fd_count`), payload type
(`_payload`). A refused request raises `RequestError` naming the request,
the field, the value and the limit; `dispatch` returns it in a
`HandlerResult`, and `BackendConnection.answer` (vhostlab.protocol) decides
how the request is answered.

The handlers keep the vhost-user rules; what is virtio-net (config space,
MTU, RARP, the datapath) is the device's `net` (`net_device.NetDevice`), as
rust-vmm's VhostUserHandler calls its VhostUserBackend.

Fds: `fds` is an `FdBag`; a handler `take`s the fds it keeps, and every
fd not taken is closed after the handler returns, whether it succeeded
or not (DPDK CVE-2019-14818 leaked them on error paths). Memory and log
fds are only peeked at: mapped, then closed, as libvhost-user does. The
fd count is a per-request check here (as DPDK's validate_msg_fds()), so a
request with the wrong fds and need_reply gets a failure status.

Semantics follow the spec, QEMU's subprojects/libvhost-user/libvhost-user.c
and DPDK's lib/vhost/vhost_user.c, with the index checks libvhost-user
forgets in a few handlers. Where they differ the choice is said in place
(RESET_OWNER, SET_FEATURES on running rings, GET_QUEUE_NUM in queue pairs).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Mapping

from vhostlab.backend import rings
from vhostlab.backend.device import VhostUserNetDevice, Vring, set_nonblocking
from vhostlab.backend.errors import RequestError
from vhostlab.backend.net_device import NET_CONFIG, NET_CONFIG_MAC
from vhostlab.backend.transport import close_fds, describe_fd, is_eventfd
from vhostlab.memory import GuestMemory, GuestMemoryError, GuestMemoryRegion
from vhostlab.protocol import (ConfigSpace, Feature, LogArea, MemoryTable, Message,
                               ProtocolFeature, Request, SingleMemoryRegion, U64, VringAddr,
                               VringState, expected_fds)
from vhostlab.protocol.constants import LIBVHOST_USER_MAX_RAM_SLOTS

log = logging.getLogger("vhostlab.backend")

# SET_CONFIG flags (vhost-user.rst "Virtio device config space").
VHOST_SET_CONFIG_TYPE_FRONTEND = 0
VHOST_SET_CONFIG_TYPE_MIGRATION = 1


class FdBag:
    """The fds that came with one message; whatever a handler does not take is closed."""

    def __init__(self, fds: tuple[int, ...]):
        self._fds = list(fds)
        self._kept: set[int] = set()

    def __len__(self) -> int:
        return len(self._fds)

    def take(self, i: int = 0) -> int:
        fd = self._fds[i]
        self._kept.add(i)
        return fd

    def peek(self, i: int = 0) -> int:
        return self._fds[i]

    def close_rest(self) -> None:
        close_fds(fd for i, fd in enumerate(self._fds) if i not in self._kept)
        self._fds, self._kept = [], set()


Handler = Callable[[VhostUserNetDevice, Message, FdBag], object]


# -- shared checks -------------------------------------------------------------------
def _refuse(msg: Message, field: str, value: object, limit: object, why: str = "") -> RequestError:
    return RequestError(msg.request.name, field, value, limit, why)


def _payload(msg: Message, kind: type):
    if not isinstance(msg.payload, kind):
        raise _refuse(msg, "payload", type(msg.payload).__name__, kind.__name__)
    return msg.payload


def _fd_count(msg: Message, fds: FdBag, low: int, high: int | None = None) -> None:
    high = low if high is None else high
    if not low <= len(fds) <= high:
        wanted = f"exactly {low}" if low == high else f"{low} to {high}"
        raise _refuse(msg, "fds", len(fds), low if low == high else f"{low}..{high}",
                      f"expected {wanted} fd(s), got {len(fds)}")


def _gate(dev: VhostUserNetDevice, msg: Message, bit: ProtocolFeature) -> None:
    """The feature gate: the request is legal only once `bit` is negotiated."""
    if not dev.has_protocol_feature(bit):
        offered = "offered but not negotiated" if dev.offered_protocol_features & bit \
            else "not offered by this net back-end"
        raise _refuse(msg, "protocol_features", dev.protocol_features, f"needs {bit.name}",
                      f"{bit.name} is {offered}")


def _gate_offered(dev: VhostUserNetDevice, msg: Message, bit: ProtocolFeature) -> None:
    """The gate the spec sets for GET_QUEUE_NUM, SEND_RARP, NET_SET_MTU and
    RESET_DEVICE: `bit` "is present in VHOST_USER_GET_PROTOCOL_FEATURES" (set
    by the back-end), whether or not the front-end acknowledged it."""
    if not dev.offered_protocol_features & bit:
        raise _refuse(msg, "protocol_features", dev.offered_protocol_features,
                      f"offers {bit.name}", f"{bit.name} is not offered by this net back-end")


def _vring(dev: VhostUserNetDevice, msg: Message, index: int) -> Vring:
    """The queue index check every per-ring handler starts with."""
    if not 0 <= index < len(dev.vrings):
        raise _refuse(msg, "index", index, f"< {len(dev.vrings)} "
                      f"({dev.queue_pairs} queue pair(s))")
    return dev.vrings[index]


def _eventfd(msg: Message, fds: FdBag) -> int:
    fd = fds.peek(0)
    if not is_eventfd(fd):
        raise _refuse(msg, "fd", describe_fd(fd), "an eventfd")
    set_nonblocking(fd)
    return fds.take(0)


def _vring_file(dev: VhostUserNetDevice, msg: Message, fds: FdBag) -> tuple[Vring, int]:
    """SET_VRING_KICK/CALL/ERR: "Bits (0-7) of the payload contain the vring index.
    Bit 8 is the invalid FD flag." Returns the vring and the eventfd (-1: none)."""
    word = _payload(msg, U64)
    vring = _vring(dev, msg, word.vring_index)
    _fd_count(msg, fds, 0 if word.vring_nofd else 1)
    return vring, (-1 if word.vring_nofd else _eventfd(msg, fds))


def _check_shape(msg: Message, fds: FdBag) -> None:
    """The checks every request gets before its handler: payload type and fd count
    as the protocol table says (the parser checked them too; a Message built in a
    notebook and handed to `dispatch` did not come through the parser)."""
    allowed = msg.spec.payload
    if not any(msg.payload is None if kind is None else isinstance(msg.payload, kind)
               for kind in allowed):
        names = " or ".join("none" if k is None else k.__name__ for k in allowed)
        raise _refuse(msg, "payload", type(msg.payload).__name__, names)
    low, high = expected_fds(msg.spec.fds, msg.payload)
    _fd_count(msg, fds, low, high)


def _not_for_net(dev: VhostUserNetDevice, msg: Message, fds: FdBag, owner: str) -> None:
    raise _refuse(msg, "request", int(msg.request), "net device requests",
                  f"{msg.request.name} belongs to {owner}; this is a vhost-user-net back-end")


def _refuse_stopped_only(msg: Message, vring: Vring) -> None:
    if vring.started:
        raise _refuse(msg, "index", vring.index, "a stopped ring",
                      "ring is started; stop it with GET_VRING_BASE first")


# -- features and ownership ----------------------------------------------------------
def get_features(dev, msg, fds):
    return U64(dev.offered_features)


def set_features(dev, msg, fds):
    value = _payload(msg, U64).value
    extra = value & ~dev.offered_features
    if extra:
        raise _refuse(msg, "u64", value, hex(dev.offered_features),
                      f"bits {hex(extra)} were not offered")
    changed = (dev.features ^ value) & ~int(Feature.VHOST_F_LOG_ALL)
    started = [v.index for v in dev.vrings if v.started]
    if changed and started:
        # As DPDK's vhost_user_set_features: while rings run only VHOST_F_LOG_ALL
        # may change (live migration turns it on and off); anything else, such
        # as the net header size, would change under frames in flight.
        raise _refuse(msg, "u64", value, "only bit 26 (VHOST_F_LOG_ALL) may change",
                      f"bits {hex(changed)} changed while vrings {started} are started; "
                      "stop them with GET_VRING_BASE first")
    dev.features = value
    if not value & Feature.VHOST_USER_F_PROTOCOL_FEATURES:
        # "If VHOST_USER_F_PROTOCOL_FEATURES has not been negotiated, the ring
        # starts directly in the enabled state."
        for vring in dev.vrings:
            vring.enable(True)
    rings.apply_features(dev)
    return None


def get_protocol_features(dev, msg, fds):
    return U64(dev.offered_protocol_features)


def set_protocol_features(dev, msg, fds):
    # Bits the back-end did not offer are refused before this runs, by the
    # connection (BackendConnection), which closes it: as DPDK's
    # vhost_user_set_protocol_features ("received invalid protocol features")
    # and rust-vmm's handler (Error::InvalidParam ends the connection) do;
    # libvhost-user takes the value as it comes.
    dev.protocol_features = _payload(msg, U64).value
    return None


def set_owner(dev, msg, fds):
    # "It marks the sender as the front-end that owns of the session."
    dev.owner = True
    return None


def reset_owner(dev, msg, fds):
    # Deprecated: "It is recommended that back-ends either ignore this message,
    # or use it to disable all rings." libvhost-user disables them; DPDK resets
    # the whole device, the reading the spec warns "would lead to bugs".
    for vring in dev.vrings:
        vring.enable(False)
    return None


def reset_device(dev, msg, fds):
    _gate_offered(dev, msg, ProtocolFeature.RESET_DEVICE)
    # "disable all rings and reset all internal device state to the initial
    # state ... The back-end retains ownership of the device." The memory
    # table and the log stay: they are the front-end's, not the device's
    # state. QEMU 10.0 sends RESET_DEVICE when the guest writes status 0 (7.2
    # sends none) and at the next DRIVER_OK only the rings again, never an
    # unchanged memory table; libvhost-user's vu_reset_device_exec only
    # disables the rings.
    dev.reset()
    return None


# -- memory --------------------------------------------------------------------------
def _memory_error(msg: Message, exc: GuestMemoryError) -> RequestError:
    return _refuse(msg, "region", type(exc).__name__, "a mappable region", str(exc))


def set_mem_table(dev, msg, fds):
    table = _payload(msg, MemoryTable)
    _fd_count(msg, fds, table.nregions)
    # GuestMemory maps each fd and keeps no fd: the bag closes them after.
    regions = [(GuestMemoryRegion(r.guest_phys_addr, r.memory_size, r.userspace_addr,
                                  r.mmap_offset), fds.peek(i))
               for i, r in enumerate(table.regions)]
    try:
        memory = GuestMemory.from_table(regions)
    except GuestMemoryError as exc:
        raise _memory_error(msg, exc) from None
    # Which files may shrink under us (no F_SEAL_SHRINK): those are guarded
    # against SIGBUS (vhostlab.sigbus); say so, for whoever reads the log.
    log.info("SET_MEM_TABLE: %d region(s), memfd seals %s", table.nregions,
             ["not a memfd" if s is None else hex(s) for s in memory.seals()])
    rings.replace_memory(dev, memory)
    return None


def get_max_mem_slots(dev, msg, fds):
    _gate(dev, msg, ProtocolFeature.CONFIGURE_MEM_SLOTS)
    return U64(LIBVHOST_USER_MAX_RAM_SLOTS)


def add_mem_reg(dev, msg, fds):
    _gate(dev, msg, ProtocolFeature.CONFIGURE_MEM_SLOTS)
    r = _payload(msg, SingleMemoryRegion).region
    _fd_count(msg, fds, 1)
    if dev.memory is None:
        rings.replace_memory(dev, GuestMemory())
    try:
        dev.memory.add_region(GuestMemoryRegion(r.guest_phys_addr, r.memory_size,
                                                r.userspace_addr, r.mmap_offset), fds.peek(0))
    except GuestMemoryError as exc:
        raise _memory_error(msg, exc) from None
    rings.remap(dev)
    return None


def rem_mem_reg(dev, msg, fds):
    _gate(dev, msg, ProtocolFeature.CONFIGURE_MEM_SLOTS)
    r = _payload(msg, SingleMemoryRegion).region
    # "No file descriptors SHOULD be passed ... If a file descriptor is passed,
    # the back-end MUST close it without using it otherwise." (the bag does)
    _fd_count(msg, fds, 0, 1)
    if dev.memory is None:
        raise _refuse(msg, "guest_phys_addr", r.guest_phys_addr, "a mapped region",
                      "no memory is mapped")
    try:
        dev.memory.remove_region(GuestMemoryRegion(r.guest_phys_addr, r.memory_size,
                                                   r.userspace_addr, r.mmap_offset))
    except GuestMemoryError as exc:
        raise _memory_error(msg, exc) from None
    finally:
        rings.remap(dev)
    return None


# -- dirty log -----------------------------------------------------------------------
def set_log_base(dev, msg, fds):
    # Without LOG_SHMFD the log would be QEMU's private memory; QEMU blocks
    # migration then and never sends this.
    _gate(dev, msg, ProtocolFeature.LOG_SHMFD)
    area = _payload(msg, LogArea)
    _fd_count(msg, fds, 1)
    # Mapped, then the fd is closed with the bag, as libvhost-user does after mmap.
    rings.replace_log(dev, msg, area, fds.peek(0))
    # With LOG_SHMFD, QEMU waits for a reply (vhost_user_set_log_base): the
    # server sends u64 0 for success. QEMU does not look at the value, so a
    # refusal is never sent as a reply here: the server closes the connection.
    return None


def set_log_fd(dev, msg, fds):
    _fd_count(msg, fds, 1)
    fd = _eventfd(msg, fds)
    close_fds([dev.log_call_fd] if dev.log_call_fd >= 0 else [])
    dev.log_call_fd = fd
    return None


# -- vrings --------------------------------------------------------------------------
def set_vring_num(dev, msg, fds):
    state = _payload(msg, VringState)
    vring = _vring(dev, msg, state.index)
    _refuse_stopped_only(msg, vring)
    # virtio spec 2.7: "Queue Size value is always a power of 2", at most 32768;
    # 2.8 (packed): any size up to 32768. The ring format says which.
    rings.check_num(dev, msg, vring, state.num)
    vring.num, vring.ring = state.num, None
    vring.configure_afresh()
    return None


def set_vring_addr(dev, msg, fds):
    addr = _payload(msg, VringAddr)
    vring = _vring(dev, msg, addr.index)
    rings.set_addr(dev, msg, vring, addr)
    rings.start(dev, vring)          # a started ring may have waited for its addresses
    return None


def set_vring_base(dev, msg, fds):
    state = _payload(msg, VringState)
    vring = _vring(dev, msg, state.index)
    _refuse_stopped_only(msg, vring)
    # A split ring's base is a 16-bit index; a packed ring's carries both
    # positions and wrap counters in 32 bits (the ring format checks).
    rings.check_base(dev, msg, vring, state.num)
    rings.set_base(dev, vring, state.num)
    return None


def get_vring_base(dev, msg, fds):
    state = _payload(msg, VringState)
    vring = _vring(dev, msg, state.index)
    # "stop ring upon receiving VHOST_USER_GET_VRING_BASE"; a packed ring's
    # base carries its wrap counters (vhostlab.ring.packed_layout).
    base = vring.vring_base
    dev.stop_vring(vring)
    return VringState(vring.index, base)


def set_vring_kick(dev, msg, fds):
    vring, fd = _vring_file(dev, msg, fds)
    dev.replace_kick_fd(vring, fd)
    # "The back-end must start ring upon receiving a kick"; with no fd
    # ("polling should be used instead") the server polls the ring.
    vring.start()
    if dev.features and not dev.has_feature(Feature.VHOST_USER_F_PROTOCOL_FEATURES):
        # "If VHOST_USER_F_PROTOCOL_FEATURES has not been negotiated, the ring
        # starts directly in the enabled state" (DPDK applies it here too).
        vring.enable(True)
    if fd >= 0:
        dev.watch(fd, vring)
    rings.start(dev, vring)
    return None


def set_vring_call(dev, msg, fds):
    vring, fd = _vring_file(dev, msg, fds)
    dev.replace_fd(vring, "call_fd", fd)
    return None


def set_vring_err(dev, msg, fds):
    vring, fd = _vring_file(dev, msg, fds)
    dev.replace_fd(vring, "err_fd", fd)
    return None


def set_vring_enable(dev, msg, fds):
    state = _payload(msg, VringState)
    vring = _vring(dev, msg, state.index)
    if state.num not in (0, 1):
        raise _refuse(msg, "num", state.num, "0 or 1")
    vring.enable(bool(state.num))
    if state.num:
        rings.start(dev, vring)
    return None


def set_vring_endian(dev, msg, fds):
    _gate(dev, msg, ProtocolFeature.CROSS_ENDIAN)
    state = _payload(msg, VringState)
    _vring(dev, msg, state.index)
    if state.num != 0:
        raise _refuse(msg, "num", state.num, "0 (little endian)",
                      "big-endian rings are not supported")
    return None


def vring_kick(dev, msg, fds):
    _gate(dev, msg, ProtocolFeature.INBAND_NOTIFICATIONS)
    _vring(dev, msg, _payload(msg, VringState).index)
    return None


def get_queue_num(dev, msg, fds):
    _gate_offered(dev, msg, ProtocolFeature.MQ)
    # vhost-user-net answers in queue pairs (QEMU compares it with queues=N).
    return U64(dev.queue_pairs)


# -- net specifics -------------------------------------------------------------------
def send_rarp(dev, msg, fds):
    _gate_offered(dev, msg, ProtocolFeature.RARP)
    # "The first 6 bytes of the payload contain the mac address of the guest"
    dev.net.send_rarp(_payload(msg, U64).value.to_bytes(8, "little")[:6])
    return None


def net_set_mtu(dev, msg, fds):
    _gate_offered(dev, msg, ProtocolFeature.NET_MTU)
    mtu = _payload(msg, U64).value
    # "the back-end must respond with zero in case the specified MTU is valid"
    _net_rule(msg, "u64", mtu, dev.net.check_mtu)
    dev.net.mtu = mtu
    return None


def _net_rule(msg: Message, field: str, value: object, check: Callable) -> None:
    """A rule of the net device (a ValueError from ``check``) refuses the request."""
    try:
        check(value)
    except ValueError as exc:
        raise _refuse(msg, field, value, str(exc)) from None


def _config_range(dev, msg, config: ConfigSpace) -> None:
    if config.offset + config.size > NET_CONFIG.size:
        raise _refuse(msg, "offset", config.offset, f"offset + size <= {NET_CONFIG.size}",
                      "beyond struct virtio_net_config")


def get_config(dev, msg, fds):
    _gate(dev, msg, ProtocolFeature.CONFIG)
    config = _payload(msg, ConfigSpace)
    _config_range(dev, msg, config)
    blob = dev.net.config_bytes()[config.offset: config.offset + config.size]
    return ConfigSpace(config.offset, config.size, config.flags, blob)


def set_config(dev, msg, fds):
    _gate(dev, msg, ProtocolFeature.CONFIG)
    config = _payload(msg, ConfigSpace)
    _config_range(dev, msg, config)
    if config.flags not in (VHOST_SET_CONFIG_TYPE_FRONTEND, VHOST_SET_CONFIG_TYPE_MIGRATION):
        raise _refuse(msg, "flags", config.flags, "0 (front-end) or 1 (migration)")
    end = config.offset + config.size
    # "back-ends MUST NOT accept SET_CONFIG for read-only configuration space
    # fields unless the live migration bit is set": only the MAC is writable.
    if config.flags == VHOST_SET_CONFIG_TYPE_FRONTEND and \
            not (NET_CONFIG_MAC[0] <= config.offset and end <= NET_CONFIG_MAC[1]):
        raise _refuse(msg, "offset", config.offset, "inside mac (bytes 0..6)",
                      "read-only field without the migration flag")
    blob = bytearray(dev.net.config_bytes())
    blob[config.offset:end] = config.payload
    _net_rule(msg, "mtu", NET_CONFIG.unpack(bytes(blob))[3], dev.net.check_mtu)
    dev.net.set_config_bytes(bytes(blob))
    return None


def set_status(dev, msg, fds):
    _gate(dev, msg, ProtocolFeature.STATUS)
    status = _payload(msg, U64).value
    if status > 0xFF:
        raise _refuse(msg, "u64", status, 0xFF, "the virtio device status is one byte")
    dev.status = status
    return None


def get_status(dev, msg, fds):
    _gate(dev, msg, ProtocolFeature.STATUS)
    return U64(dev.status)


# -- requests of other devices or features this back-end does not offer -------------
def _gated(bit: ProtocolFeature, name: str) -> Handler:
    """A request of a protocol feature this back-end does not offer: the gate refuses it."""
    def handler(dev, msg, fds):
        _gate(dev, msg, bit)
    handler.__name__ = handler.__qualname__ = name
    return handler


PF = ProtocolFeature
set_backend_req_fd = _gated(PF.BACKEND_REQ, "set_backend_req_fd")
get_shared_object = _gated(PF.SHARED_OBJECT, "get_shared_object")
set_device_state_fd = _gated(PF.DEVICE_STATE, "set_device_state_fd")
check_device_state = _gated(PF.DEVICE_STATE, "check_device_state")
postcopy_advise = _gated(PF.PAGEFAULT, "postcopy_advise")
postcopy_listen = _gated(PF.PAGEFAULT, "postcopy_listen")
postcopy_end = _gated(PF.PAGEFAULT, "postcopy_end")
get_inflight_fd = _gated(PF.INFLIGHT_SHMFD, "get_inflight_fd")
set_inflight_fd = _gated(PF.INFLIGHT_SHMFD, "set_inflight_fd")
del PF


def iotlb_msg(dev, msg, fds):
    # "This request should be send only when VIRTIO_F_IOMMU_PLATFORM feature
    # has been successfully negotiated."
    if not dev.has_feature(Feature.VIRTIO_F_ACCESS_PLATFORM):
        raise _refuse(msg, "features", dev.features, "needs VIRTIO_F_ACCESS_PLATFORM",
                      "no IOMMU: this back-end does not offer VIRTIO_F_ACCESS_PLATFORM")


def create_crypto_session(dev, msg, fds):
    _not_for_net(dev, msg, fds, "vhost-user-crypto devices")


def close_crypto_session(dev, msg, fds):
    _not_for_net(dev, msg, fds, "vhost-user-crypto devices")


def gpu_set_socket(dev, msg, fds):
    _not_for_net(dev, msg, fds, "vhost-user-gpu devices")


#: Every request's handler: the function above named after it (GET_FEATURES: get_features).
HANDLERS: dict[Request, Handler] = {request: globals()[request.name.lower()]
                                    for request in Request}


@dataclass(frozen=True)
class HandlerResult:
    """What handling one request produced: a reply payload, or the error that refused it."""

    payload: object = None
    error: RequestError | None = None


def dispatch(dev: VhostUserNetDevice, msg: Message,
             table: Mapping[Request, Handler] = HANDLERS) -> HandlerResult:
    """Run the request's handler from ``table``; close every fd it did not keep.

    ``table`` is :data:`HANDLERS` unless a server was given its own entries
    (an exercise puts a learner's GET_VRING_BASE in one server, not in all).
    """
    bag = FdBag(msg.fds)
    try:
        _check_shape(msg, bag)
        handler = table[msg.request]
        return HandlerResult(payload=handler(dev, msg, bag))
    except RequestError as exc:
        return HandlerResult(error=exc)
    except Exception as exc:         # a bug must cost one connection, not the server
        log.exception("%s handler failed", msg.request.name)
        return HandlerResult(error=RequestError(msg.request.name, "handler", type(exc).__name__,
                                          "no internal error", f"internal error: {exc}"))
    finally:
        bag.close_rest()
