"""A real QEMU as the vhost front-end: launcher, qtest guest driver, QMP.

QEMU runs with TCG and a halt firmware (no guest OS, no KVM); the test
process plays the guest's virtio-net driver over qtest and steers QEMU over
QMP. See :mod:`.launcher` for the command line and the clean-up rules
(:mod:`.find` finds QEMU, :mod:`.netdev` says what the NIC is plugged into),
:mod:`.guest` for the driver, :mod:`.qmp` for how QMP works inside a notebook.

Typical use::

    from vhostlab.qemu import QemuInstance, vhost_user_netdev

    with QemuInstance(vhost_user_netdev("/path/to/backend.sock")) as q:
        guest = q.guest()                  # legacy virtio-net, DRIVER_OK
        guest.post_rx_buffers()
        guest.transmit([frame])
        q.qmp.query_status()

With vhostlab back-ends (:mod:`.host`), a live migration between two QEMUs
with traffic and integrity checks (:mod:`.migration`, its data in
:mod:`.migration_model`, its pre-copy rounds in :mod:`.rounds`, the checks in
:mod:`.verify`), and the narrated ``vhostlab demo --frontend qemu`` (:mod:`.demo`)::

    from vhostlab.qemu import MigrationConfig, QemuMigration

    m = QemuMigration(MigrationConfig()).start()   # background thread
    m.progress()                                   # rounds, events, phase
    result = m.wait(60)
    result.summary()["integrity"]                  # "ok"

``MigrationConfig(backend="dpdk")`` migrates between two DPDK back-ends
instead, each a testpmd behind a recording relay (:mod:`.dpdk_side`).
"""
from .errors import (
    GuestDriverError,
    QemuError,
    QemuExitedError,
    QemuNotFoundError,
    QemuStartError,
    QmpCommandError,
    QmpConnectionError,
    QmpError,
    QTestConnectionError,
    QTestError,
)
from .guest import (
    DEFAULT_FEATURES,
    RX_QUEUE,
    SUPPORTED_FEATURES,
    TX_QUEUE,
    VIRTIO_F_ANY_LAYOUT,
    VIRTIO_F_NOTIFY_ON_EMPTY,
    VIRTIO_NET_F_MAC,
    VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_F_STATUS,
    VIRTIO_RING_F_EVENT_IDX,
    QTestVirtioNetGuest,
    QTestRingSnapshot,
    UsedElem,
)
from .host import MESSAGE_OPS, VhostUserHost, ops_called, process_peak_rss, vring_bases
from .launcher import (
    DEFAULT_MAC,
    DEFAULT_RAM_SIZE,
    NetdevSpec,
    QemuInfo,
    QemuInstance,
    dgram_netdev,
    find_qemu,
    halt_firmware,
    require_qemu,
    sweep_stale_workdirs,
    udp_socket_netdev,
    vhost_user_netdev,
)
from .migration import (
    MigrationConfig,
    MigrationFailedError,
    MigrationProgress,
    MigrationResult,
    PrecopyRound,
    ProgressEvent,
    QemuMigration,
    migrate,
)
from .qmp import QMP, QmpEvent
from .qtest import QTest, QTestServer
from .traffic import FROM_GUEST, TO_GUEST, CaptureWire, FrameLedger, GuestDirtier, frame_tag
from .verify import VerifyReport, check_handoff, verify_destination
from .dpdk_side import DpdkHost, QemuDpdkMigration, RelayObserver

__all__ = [
    # launcher
    "QemuInstance", "QemuInfo", "find_qemu", "require_qemu", "halt_firmware",
    "NetdevSpec", "vhost_user_netdev", "dgram_netdev", "udp_socket_netdev",
    "sweep_stale_workdirs", "DEFAULT_RAM_SIZE", "DEFAULT_MAC",
    # control channels
    "QTest", "QTestServer", "QMP", "QmpEvent",
    # guest driver
    "QTestVirtioNetGuest", "QTestRingSnapshot", "UsedElem",
    "RX_QUEUE", "TX_QUEUE", "DEFAULT_FEATURES", "SUPPORTED_FEATURES",
    "VIRTIO_NET_F_MAC", "VIRTIO_NET_F_MRG_RXBUF", "VIRTIO_NET_F_STATUS",
    "VIRTIO_RING_F_EVENT_IDX", "VIRTIO_F_NOTIFY_ON_EMPTY", "VIRTIO_F_ANY_LAYOUT",
    # QEMU with vhostlab back-ends, live migration
    "VhostUserHost", "MESSAGE_OPS", "ops_called", "vring_bases", "process_peak_rss",
    "FrameLedger", "CaptureWire", "GuestDirtier", "frame_tag", "TO_GUEST", "FROM_GUEST",
    "MigrationConfig", "QemuMigration", "MigrationResult", "MigrationProgress",
    "ProgressEvent", "PrecopyRound", "MigrationFailedError", "migrate",
    "VerifyReport", "verify_destination", "check_handoff",
    # QEMU with DPDK back-ends
    "DpdkHost", "QemuDpdkMigration", "RelayObserver",
    # errors
    "QemuError", "QemuNotFoundError", "QemuStartError", "QemuExitedError",
    "QTestError", "QTestConnectionError", "QmpError", "QmpCommandError",
    "QmpConnectionError", "GuestDriverError",
]
