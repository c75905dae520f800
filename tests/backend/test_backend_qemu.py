"""A real QEMU (FACTS.md recipe: TCG, halt firmware, memfd RAM, legacy virtio-net over
qtest) driving this back-end: start-up, frames both ways, a migration to a file."""
from __future__ import annotations

import struct
import time

import pytest

from test_backend_protocol import wait_until
from vhostlab.backend import BackendServer, read_pcap
from vhostlab.protocol import TO_BACKEND, TO_FRONTEND, Feature

MiB = 1 << 20


def frame(i: int, size: int) -> bytes:
    return (bytes.fromhex("525400123456") + bytes.fromhex("525400abcdef") + b"\x88\xb5"
            + struct.pack("!I", i) + bytes([i & 0xFF]) * (size - 18))


@pytest.fixture
def qemu_and_backend(requires_qemu, tmp_path):
    from vhostlab.qemu import QemuInstance, vhost_user_netdev
    d = tmp_path / "s"
    d.mkdir(mode=0o700)
    pcap = tmp_path / "wire.pcap"
    srv = BackendServer(str(d / "vu.sock"), wire=f"pcap:{pcap}").start()
    q = QemuInstance(vhost_user_netdev(srv.socket_path), ram_size=64 * MiB, qemu=requires_qemu)
    try:
        q.start()
        yield srv, q, pcap
    finally:
        q.close()
        srv.stop()
    assert not q.alive()


def test_qemu_start_up_frames_both_ways_and_migration_to_a_file(qemu_and_backend, tmp_path):
    srv, q, pcap = qemu_and_backend
    guest = q.guest()                                   # DRIVER_OK: vhost_dev_start
    assert wait_until(lambda: all(v.started and v.enabled for v in srv.snapshot().vrings), 20)
    snap = srv.snapshot()
    assert snap.connected and snap.peer_pid == q.pid
    assert snap.counters["errors"] == ()
    assert snap.hdr_len == guest.hdr_len               # 10: legacy without MRG_RXBUF
    assert sum(r.memory_size for r in snap.memory) > 60 * MiB
    for v, queue in zip(snap.vrings, (0, 1)):
        g = guest.queue_gpas(queue)
        assert (v.desc, v.avail, v.used, v.num) == (g.desc, g.avail, g.used, guest.queue_size(queue))

    # Frames the guest transmits are consumed, byte for byte.
    sent = [frame(i, 60 + 97 * i) for i in range(8)]
    guest.transmit(sent)
    assert wait_until(lambda: srv.snapshot().counters["guest_tx_frames"] == 8, 20)
    assert guest.wait_used(1, 8, 10) >= 8
    # Frames injected toward the guest reach its RX buffers, byte for byte.
    guest.post_rx_buffers()
    to_guest = [frame(100 + i, 64 + 50 * i) for i in range(6)]
    srv.inject(to_guest)
    got: list[bytes] = []
    assert wait_until(lambda: got.extend(guest.receive(timeout=0.1)) or len(got) >= 6, 20)
    assert got == to_guest

    # A live migration to a file: logging starts, the rings stop at switch-over.
    target = tmp_path / "vm.mig"
    q.qmp.migrate(f"exec:cat > {target}")
    assert wait_until(lambda: q.qmp.query_migrate().get("status") in ("completed", "failed"), 60)
    assert q.qmp.query_migrate()["status"] == "completed"
    assert target.stat().st_size > 0
    trace = srv.snapshot().trace
    incoming = [r for r in trace if r.direction == TO_BACKEND]
    names = [r.request for r in incoming]
    i_log = names.index("SET_LOG_BASE")
    assert next(r for r in incoming if r.request == "SET_LOG_BASE").nfds == 1
    log_reply = next(r for r in trace if r.direction == TO_FRONTEND and r.request == "SET_LOG_BASE")
    assert log_reply.fields["payload"]["value"] == 0
    log_all = [r for r in incoming[i_log:] if r.request == "SET_FEATURES"
               and r.fields["payload"]["value"] & Feature.VHOST_F_LOG_ALL]
    assert log_all, "QEMU turned VHOST_F_LOG_ALL on"
    assert [r.fields["payload"]["flags"] for r in incoming[i_log:]
            if r.request == "SET_VRING_ADDR"][:2] == [1, 1]
    bases = {r.fields["payload"]["index"]: r.fields["payload"]["num"] for r in trace
             if r.direction == TO_FRONTEND and r.request == "GET_VRING_BASE"}
    assert bases == {0: 6, 1: 8}        # one RX buffer per frame, 8 TX chains taken
    assert not any(v.started for v in srv.snapshot().vrings)
    assert read_pcap(str(pcap)) == sent
    time.sleep(0.1)
    assert srv.snapshot().counters["errors"] == ()
