"""The stepper's steps as data: each guest or QMP action and the requests it makes QEMU send.

QEMU cannot be asked to call one VhostOps entry, but every op it calls has a
cause the kit controls: a write of the guest's virtio-net driver (device
status, queue address, a kick, the features it acks) or a QMP command (stop,
cont, migrate, migrate_cancel, set_link). Each cause is one :class:`Step`:
its name, what it does, what a learner should expect, and the vhost-user
requests it makes QEMU send, release by release where they differ
(``by_version``). :class:`~vhostlab.qemu.stepper.QemuStepper` runs them on a
real QEMU; tests hold this data against real QEMU 5.2, 7.2 and 10.0.

:func:`coverage` turns the steps' data into the lab's "called by real QEMU
here, by which action" column without a QEMU, and :data:`NOT_CALLABLE_HERE`
says in one line why each remaining op of the seed's table cannot be made to
run on this machine.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

from vhostlab.backend import TraceRecord
from vhostlab.protocol import TO_BACKEND

from .inference import attribute_ops
from .launcher import CI_QEMU_RELEASES

__all__ = ["Step", "STEPS", "HOST_MTU", "SINK", "SLOW", "NOT_CALLABLE_HERE", "step_named",
           "coverage", "coverage_column"]

#: The device property the stepper starts QEMU with (the guest acks VIRTIO_NET_F_MTU).
HOST_MTU = 1400
#: Where "migrate to a sink" sends the migration stream (vhostlab.qemu.sink), and
#: how slowly (bytes/s): the migration stays in progress until the next step cancels it.
SINK = "unix:.../sink.sock"
SLOW = 16 << 10


# -- the steps as data ---------------------------------------------------------------
@dataclass(frozen=True)
class Step:
    """One action of the guest driver or of QMP, and what it makes QEMU send.

    ``messages`` are the front-end requests the step must cause, in order (other
    requests may sit between them); ``absent`` must not appear. ``by_version``
    holds ``(first_release, messages, absent, note)`` for releases that differ:
    the last entry whose release is not newer than the QEMU under test wins.
    """

    name: str
    kind: str                   # "guest", "qmp" or "host"
    action: str                 # what is done, in the guest's or QMP's words
    expect: str                 # what a learner should expect to see
    messages: tuple[str, ...] = ()
    absent: tuple[str, ...] = ()
    by_version: tuple[tuple[tuple[int, int], tuple[str, ...], tuple[str, ...], str], ...] = ()
    on: str = "source"          # the host whose QEMU acts

    def expected(self, version: Sequence[int] | None = None) -> tuple[tuple[str, ...],
                                                                        tuple[str, ...], str]:
        """``(messages, absent, note)`` for QEMU ``version`` (None: the step's defaults)."""
        found = (self.messages, self.absent, "")
        if version is not None:
            for since, msgs, absent, note in self.by_version:
                if tuple(version[:2]) >= since:
                    found = (msgs, absent, note)
        return found



# The requests seen from QEMU 5.2, 7.2 and 10.0 (CI's releases). The back-end offers
# CONFIGURE_MEM_SLOTS, so the memory table arrives as ADD_MEM_REG, one region each.
_INIT = ("GET_FEATURES", "GET_PROTOCOL_FEATURES", "SET_PROTOCOL_FEATURES", "GET_QUEUE_NUM",
         "GET_MAX_MEM_SLOTS", "SET_OWNER", "GET_FEATURES")
_RINGS = ("SET_VRING_NUM", "SET_VRING_BASE", "SET_VRING_ADDR", "SET_VRING_KICK",
          "SET_VRING_CALL") * 2
_ENABLE = ("SET_VRING_ENABLE", "SET_VRING_ENABLE")
_GVB = ("GET_VRING_BASE", "GET_VRING_BASE")
_STATUS_START = ("SET_FEATURES", "GET_STATUS", "SET_STATUS")
_V52, _V72, _V81, _V10 = (5, 0), (7, 2), (8, 1), (10, 0)


def _start_up(on: str = "source") -> dict:
    return dict(
        messages=(*_INIT, "SET_VRING_CALL", "SET_VRING_CALL"), on=on,
        by_version=(
            (_V52, (*_INIT, "SET_VRING_CALL", "SET_VRING_CALL"),
             ("SET_VRING_ERR", "SET_VRING_ENABLE"),
             "5.2 sends no SET_VRING_ERR and enables no ring at start-up"),
            (_V72, (*_INIT, "SET_VRING_CALL", "SET_VRING_ERR", "SET_VRING_CALL",
                    "SET_VRING_ERR", *_ENABLE), ("RESET_DEVICE",),
             "7.2 adds an error fd per ring (SET_VRING_ERR, an op newer than the seed's "
             "list) and enables both rings"),
            (_V10, (*_INIT, "SET_VRING_CALL", "SET_VRING_ERR", "SET_VRING_CALL",
                    "SET_VRING_ERR", "RESET_DEVICE", *_ENABLE), (),
             "10.0 also resets the back-end (RESET_DEVICE: vhost_reset_device) when "
             "virtio-net resets at machine start"),
        ))


def _dev_start(mem: bool, mtu: bool = True) -> dict:
    table = ("ADD_MEM_REG",) if mem else ()
    first = ("NET_SET_MTU",) if mtu else ()
    return dict(
        messages=(*first, "SET_FEATURES", *table, *_RINGS),
        absent=() if mem else ("ADD_MEM_REG", "SET_MEM_TABLE"),
        by_version=(
            (_V52, (*first, "SET_FEATURES", *table, *_RINGS, *_ENABLE), ("SET_STATUS",),
             "5.2: no STATUS protocol feature; the rings are enabled after they start"),
            (_V72, (*first, *_ENABLE, *_STATUS_START, *table, *_RINGS, "GET_STATUS",
                    "SET_STATUS"), (),
             "7.2 and later: the rings are enabled first; with protocol feature STATUS "
             "SET_FEATURES is followed by SET_STATUS FEATURES_OK and the start ends with "
             "SET_STATUS DRIVER_OK (vhost_dev_start, an op newer than the seed's list)"),
        ))


def _dev_stop(extra_72: tuple[str, ...] = (), extra_10: tuple[str, ...] = ()) -> dict:
    last = ("8.1 and later: SET_STATUS 0 (vhost_reset_status) comes AFTER the "
            "GET_VRING_BASEs, so the reset cannot lose the ring positions QEMU saves")
    newest = ((_V10, (*_GVB, "SET_STATUS", *extra_10), (),
               last + "; 10.0 then sends RESET_DEVICE (vhost_reset_device) and re-enables "
               "the rings"),) if extra_10 else ()
    return dict(
        messages=_GVB,
        by_version=(
            (_V52, _GVB, ("SET_STATUS",), "5.2: only GET_VRING_BASE per ring, as in the seed"),
            (_V72, ("SET_STATUS", *_GVB, *extra_72), ("RESET_DEVICE",),
             "7.2: SET_STATUS 0 (vhost_dev_start(dev, false)) comes BEFORE the "
             "GET_VRING_BASEs: the device is reset before QEMU asks where its rings stopped"),
            (_V81, (*_GVB, "SET_STATUS"), (), last),
            *newest,
        ))


_NOTHING = ("the guest's register write stays inside QEMU's virtio-net model: "
            "the vhost device is not started yet, so no message")

STEPS: tuple[Step, ...] = (
    Step("start QEMU", "host",
         f"start the back-end, then QEMU with -device virtio-net-pci,host_mtu={HOST_MTU} "
         "on a vhost-user netdev",
         "vhost_dev_init -> vhost_backend_init: features and protocol features are "
         "negotiated, SET_OWNER claims the back-end, then a call fd per ring",
         **_start_up()),
    Step("find the device", "guest",
         "PCI config: find 1af4:1000, program BAR0, enable I/O and bus mastering; "
         "then status 0 (the driver resets the device first)",
         "no message starts or stops a ring: the device was never started",
         absent=("GET_VRING_BASE", "SET_FEATURES"),
         by_version=((_V52, (), ("SET_VRING_ENABLE",), "5.2: nothing at all"),
                     (_V72, _ENABLE, (), "7.2: the reset re-enables both rings "
                      "(SET_VRING_ENABLE)"),
                     (_V10, ("RESET_DEVICE", *_ENABLE), (),
                      "10.0: the reset reaches the back-end as RESET_DEVICE, then both "
                      "rings are enabled")),
         ),
    Step("ACKNOWLEDGE", "guest", "outb BAR0+0x12 1 (status ACKNOWLEDGE)",
         "nothing: " + _NOTHING, absent=("SET_FEATURES", "SET_VRING_ENABLE")),
    Step("DRIVER", "guest", "outb BAR0+0x12 3 (status ACKNOWLEDGE|DRIVER)",
         "nothing: " + _NOTHING, absent=("SET_FEATURES", "SET_VRING_ENABLE")),
    Step("features", "guest",
         "inl BAR0+0x00 (host features), outl BAR0+0x04 MAC|MTU (the guest acks "
         "VIRTIO_NET_F_MTU)",
         "no SET_FEATURES yet (vhost_net_ack_features only records the acked bits; they "
         "reach the back-end at DRIVER_OK), but virtio_net_set_features -> "
         "virtio_net_set_queue_pairs attaches the queue pair: SET_VRING_ENABLE per ring",
         _ENABLE, absent=("SET_FEATURES",)),
    Step("FEATURES_OK", "guest", "none: the legacy interface has no FEATURES_OK",
         "nothing: FEATURES_OK (status 8) is virtio 1.0's; a legacy driver's features "
         "are final when it writes DRIVER_OK", absent=("SET_FEATURES", "SET_STATUS")),
    Step("queue addresses", "guest",
         "per queue: outw BAR0+0x0e Q (select), inw BAR0+0x0c (size), "
         "outl BAR0+0x08 PFN (ring address)",
         "nothing: QEMU notes the ring address; it sends it (as its own virtual "
         "address) in SET_VRING_ADDR at DRIVER_OK", absent=("SET_VRING_ADDR",),
         by_version=((_V52, (), ("SET_VRING_ADDR",),
                      "5.2 and 7.2: each legacy queue has 256 entries"),
                     (_V10, (), ("SET_VRING_ADDR",),
                      "10.0: each legacy queue has 1024 entries (256 up to 7.2); the size "
                      "comes from QEMU, so SET_VRING_NUM says 1024 at DRIVER_OK"))),
    Step("DRIVER_OK", "guest", "outb BAR0+0x12 7 (status DRIVER_OK)",
         "virtio_net_set_status -> vhost_net_set_mtu (NET_SET_MTU: the guest acked MTU) "
         "-> vhost_net_start -> vhost_dev_start: SET_FEATURES, the memory table "
         "(ADD_MEM_REG per region), and per ring NUM, BASE, ADDR, KICK, CALL; the rings "
         "are enabled", **_dev_start(mem=True)),
    Step("kick", "guest", "one frame on TX, then outw BAR0+0x10 1 (QUEUE_NOTIFY)",
         "no vhost-user message: the kick is a write to the ring's kick eventfd, "
         "straight from QEMU's ioeventfd to the back-end, which takes the frame",
         absent=("SET_VRING_KICK", "SET_FEATURES")),
    Step("set_link off", "qmp", "QMP set_link name=net0 up=false",
         "virtio_net_set_link_status -> virtio_net_vhost_status: the link is down, so "
         "vhost_net_stop -> vhost_dev_stop: GET_VRING_BASE per ring", **_dev_stop()),
    Step("set_link on", "qmp", "QMP set_link name=net0 up=true",
         "vhost_net_start again, as at DRIVER_OK (NET_SET_MTU included) but without the "
         "memory table: the back-end still has it", **_dev_start(mem=False)),
    Step("stop", "qmp", "QMP stop (the VM pauses)",
         "the VM state change stops the device: vhost_dev_stop -> GET_VRING_BASE per ring",
         **_dev_stop()),
    Step("cont", "qmp", "QMP cont (the VM runs again)",
         "vhost_dev_start again: NET_SET_MTU, features, every ring, enable; no memory table "
         "(with CONFIGURE_MEM_SLOTS QEMU sends only regions that changed: none)",
         **_dev_start(mem=False)),
    Step("migrate to a sink", "qmp",
         f"QMP migrate uri={SINK!r} at {SLOW // 1024} KiB/s, a socket nobody reads "
         "(the migration stays in progress, the VM running)",
         "vhost_log_global_start -> vhost_migration_log -> vhost_dev_set_log: SET_LOG_BASE "
         "(the log memfd), SET_FEATURES with VHOST_F_LOG_ALL, SET_VRING_ADDR with "
         "VHOST_VRING_F_LOG per ring",
         ("SET_LOG_BASE", "SET_FEATURES", "SET_VRING_ADDR", "SET_VRING_ADDR"),
         absent=("GET_VRING_BASE",)),
    Step("migrate_cancel", "qmp", "QMP migrate_cancel",
         "vhost_log_global_stop: SET_FEATURES without VHOST_F_LOG_ALL, SET_VRING_ADDR "
         "without VHOST_VRING_F_LOG (the log is dropped without a message)",
         ("SET_FEATURES", "SET_VRING_ADDR", "SET_VRING_ADDR"), absent=("GET_VRING_BASE",)),
    Step("start a destination", "host",
         "a second back-end, and a second QEMU with the same command line plus -incoming",
         "the destination's vhost_dev_init: the same start-up messages, on the second "
         "back-end", **_start_up("destination")),
    Step("migrate", "qmp", "QMP migrate to the destination (full speed)",
         "source: logging on, then at switch-over vhost_dev_stop (GET_VRING_BASE per "
         "ring); destination: vhost_dev_start with SET_VRING_BASE = the source's "
         "last_avail_idx, and vhost_migration_done: SEND_RARP (QEMU's announce rounds), "
         "because the guest did not ack VIRTIO_NET_F_GUEST_ANNOUNCE",
         ("SET_LOG_BASE", "SET_FEATURES", "SET_VRING_ADDR", "GET_VRING_BASE", "SET_VRING_BASE",
          "SEND_RARP")),
    Step("reset", "guest",
         "on the destination, the migrated driver writes outb BAR0+0x12 0 (status 0: "
         "device reset)",
         "virtio_net_set_status(0) -> vhost_net_stop -> vhost_dev_stop: GET_VRING_BASE "
         "per ring", on="destination",
         **_dev_stop(extra_10=("RESET_DEVICE", *_ENABLE), extra_72=_ENABLE)),
)


def step_named(name: str) -> Step:
    """The step called ``name`` (KeyError naming the steps when there is none)."""
    for s in STEPS:
        if s.name == name:
            return s
    raise KeyError(f"no step {name!r}; the steps are {[s.name for s in STEPS]}")


# -- coverage: which op which step makes QEMU call ------------------------------------------
#: Ops of the seed's table no step can make QEMU call here, and why (one line each).
NOT_CALLABLE_HERE: Mapping[str, str] = {
    "vhost_net_set_backend": "vhost-kernel only (an ioctl); this kernel has no vhost-net",
    "vhost_scsi_set_endpoint": "vhost-kernel scsi only; no vhost-scsi device here",
    "vhost_scsi_clear_endpoint": "vhost-kernel scsi only; no vhost-scsi device here",
    "vhost_scsi_get_abi_version": "vhost-kernel scsi only; no vhost-scsi device here",
    "vhost_set_vring_busyloop_timeout": "vhost-kernel only (user_ops leaves it NULL)",
    "vhost_vsock_set_guest_cid": "vhost-kernel vsock only; no vhost-vsock device here",
    "vhost_vsock_set_running": "vhost-kernel vsock only; no vhost-vsock device here",
    "vhost_crypto_create_session": "vhost-user-crypto devices only, not virtio-net",
    "vhost_crypto_close_session": "vhost-user-crypto devices only, not virtio-net",
    "vhost_send_device_iotlb_msg": "needs VIRTIO_F_IOMMU_PLATFORM and a vIOMMU; the legacy "
                                   "device without one never has an IOTLB",
    "vhost_set_iotlb_callback": "runs (a no-op for vhost-user) only with a vIOMMU, and sends "
                                "nothing",
    "vhost_set_vring_endian": "only a cross-endian legacy guest needs it (big-endian guest "
                              "on this little-endian host)",
    "vhost_get_config": "virtio-net reads vhost config only for vhost-vdpa peers",
    "vhost_set_config": "virtio-net writes vhost config only for vhost-vdpa peers",
    "vhost_reset_device": "QEMU 5.2 and 7.2 never reset a vhost-user-net back-end "
                          "(RESET_DEVICE); 10.0 does, at a device reset",
    "vhost_backend_cleanup": "called when QEMU drops the device, but sends no message",
    "vhost_backend_memslots_limit": "called at every memory change, but answered locally",
    "vhost_get_vq_index": "called for every ring, but answered locally",
    "vhost_requires_shm_log": "called when logging starts, but answered locally",
    "vhost_backend_can_merge": "called while building the memory table, but answered locally",
}


def coverage(version: Sequence[int] | None = (7, 2),
             steps: Sequence[Step] = STEPS) -> dict[str, list[str]]:
    """op -> the steps whose expected messages make QEMU ``version`` call it (from the data).

    The same attribution as a live run (:func:`attribute_ops`) applied to each
    step's expected requests, so the lab's column needs no QEMU; tests hold
    the expectations against real QEMUs.
    """
    out: dict[str, list[str]] = {}
    conn = {"source": 1, "destination": 2}
    owned: list[TraceRecord] = []
    for step in steps:
        msgs, _absent, _note = step.expected(version)
        records = [TraceRecord(len(owned) + i + 1, 0.0, conn[step.on], TO_BACKEND, m,
                               _recorded_fields(msgs, i), b"", 0)
                   for i, m in enumerate(msgs)]
        pairs = attribute_ops(owned + records)
        owned += records
        for _rec, op in pairs[len(pairs) - len(records):]:
            out.setdefault(op, [])
            if step.name not in out[op]:
                out[op].append(step.name)
    return out


def _recorded_fields(msgs: Sequence[str], i: int) -> dict:
    # The data names requests only: a SET_STATUS beside GET_VRING_BASE is the reset (0).
    if msgs[i] != "SET_STATUS":
        return {}
    near = msgs[max(i - 1, 0):i + 2]
    return {"payload": {"value": 0 if "GET_VRING_BASE" in near else 0xF}}


def coverage_column(seen: Mapping[str, Sequence[str]] | None = None,
                    version: Sequence[int] | None = None) -> dict[str, str]:
    """op -> "called by real QEMU here, by which action": the steps, or why not.

    ``seen`` is a live run's ``QemuStepper.ops_seen()``. Without it the column
    comes from the steps' recorded expectations (:func:`coverage`): for
    ``version``, or when that is None merged over the releases CI runs, with
    the releases named where they differ, e.g. ``"start QEMU (10.0)"``.
    """
    if seen is None and version is not None:
        seen = coverage(version)
    if seen is not None:
        out = {op: "yes: " + ", ".join(steps) for op, steps in seen.items()}
    else:
        per = {rel: coverage(rel) for rel in CI_QEMU_RELEASES}
        ops: dict[str, dict[str, list[str]]] = {}
        for rel, cov in per.items():
            for op, steps in cov.items():
                for st in steps:
                    ops.setdefault(op, {}).setdefault(st, []).append(".".join(map(str, rel)))
        out = {}
        for op, by_step in ops.items():
            order = [st.name for st in STEPS if st.name in by_step]
            parts = [name if len(by_step[name]) == len(per)
                     else f"{name} ({', '.join(by_step[name])})" for name in order]
            out[op] = "yes: " + ", ".join(parts)
    for op, why in NOT_CALLABLE_HERE.items():
        out.setdefault(op, "no: " + why)
    return out
