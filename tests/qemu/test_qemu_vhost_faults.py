"""Faults around a migration with real QEMUs and vhostlab back-ends.

- QEMU killed in the middle of a migration: the back-ends survive, release
  everything the dead QEMU gave them, and serve the next QEMU.
- The back-end restarted under a running QEMU with ``reconnect=``: QEMU
  comes back to it and traffic resumes.
- A destination that never comes up (nobody listens; or killed before it
  accepts; or killed mid-stream): the source reports a failed migration
  with QEMU's reason, nothing hangs, and the guest runs on at the source.
"""
from __future__ import annotations

import os
import signal
import tempfile
import time

import pytest

from vhostlab.qemu import (FrameLedger, GuestDirtier, MigrationConfig, QemuMigration,
                           VhostUserHost)
from vhostlab.qemu.traffic import FROM_GUEST, TO_GUEST, is_rarp
from vhostlab.protocol import TO_BACKEND

pytestmark = pytest.mark.qemu

MiB = 1 << 20
LOG_ALL = 1 << 26


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def memfd_mappings() -> int:
    """Mappings of memfds (QEMU's guest RAM, the vhost log) in this process."""
    with open("/proc/self/maps") as f:
        return sum("memfd:" in line for line in f)


def frames_both_ways(host: VhostUserHost, n: int = 6) -> None:
    """``n`` frames each way through ``host``'s back-end, checked byte for byte."""
    guest = host.guest
    inbound = [FrameLedger(TO_GUEST).make(100 + 50 * i) for i in range(n)]
    outbound = [FrameLedger(FROM_GUEST).make(200 + 30 * i) for i in range(n)]
    host.wire.take()
    guest.receive()                    # what the guest had not read yet is not part of this
    host.server.inject(inbound)
    got = []
    for _ in range(50):
        got += guest.receive(timeout=0.2)
        if len(got) >= n:
            break
    assert got == inbound
    base = host.counters()["guest_tx_frames"]
    guest.transmit(outbound)
    assert host.server.wait_for(lambda s: s.counters["guest_tx_frames"] >= base + n, 10)
    assert [f for f in host.wire.take() if not is_rarp(f)] == outbound


@pytest.fixture
def hosts(requires_qemu):
    made: list[VhostUserHost] = []

    def make(name: str, **kwargs) -> VhostUserHost:
        h = VhostUserHost(name, ram_size=64 * MiB, qemu=requires_qemu, **kwargs)
        made.append(h)
        return h

    yield make
    for h in made:
        h.close()


def test_qemu_killed_mid_migration_backends_survive(hosts):
    src, dst = hosts("source"), hosts("destination", incoming=True)
    src.start_backend()
    dst.start_backend()
    fds, maps = open_fds(), memfd_mappings()           # baseline: back-ends, no QEMU
    src.start_qemu()
    dst.start_qemu()
    guest = src.init_guest()
    guest.post_rx_buffers()
    dirtier = GuestDirtier(guest, 512 << 10, 3 * MiB)
    dirtier.fill()
    qmp = src.qemu.qmp
    qmp.migrate_set_parameters(max_bandwidth=MiB, downtime_limit=1)
    qmp.migrate(dst.migration_uri)
    deadline = time.monotonic() + 30
    while qmp.query_migrate().get("ram", {}).get("dirty-sync-count", 0) < 2:  # logging is on
        assert time.monotonic() < deadline
        dirtier.catch_up()
        time.sleep(0.02)
    assert src.server.snapshot(trace=False).logging
    assert memfd_mappings() > maps
    os.kill(src.qemu.pid, signal.SIGKILL)
    assert src.qemu.wait(10) == -signal.SIGKILL
    dst.qemu.wait(30)                                  # the incoming stream broke: it exits
    for host in (src, dst):
        assert host.server.wait_for(lambda s: not s.connected and not s.memory, 10)
        snap = host.server.snapshot(trace=False)
        assert snap.log is None and not any(v.started for v in snap.vrings)
        host.close_qemu()
    assert (open_fds(), memfd_mappings()) == (fds, maps)

    # The source back-end serves the next QEMU as if nothing happened.
    src.start_qemu()
    src.init_guest().post_rx_buffers()
    frames_both_ways(src)
    src.close_qemu()
    assert src.server.wait_for(lambda s: not s.connected, 10)
    assert (open_fds(), memfd_mappings()) == (fds, maps)
    assert src.server.running and dst.server.running


def test_backend_restart_with_reconnect(hosts):
    host = hosts("vm", reconnect=1).start()
    host.init_guest().post_rx_buffers()
    frames_both_ways(host)
    host.stop_backend()                                 # QEMU's chardev sees EOF
    time.sleep(0.3)
    assert host.qemu.alive()
    host.start_backend()                                # same socket, fresh device
    assert host.server.wait_for(
        lambda s: s.connected and s.vrings and all(v.started and v.enabled for v in s.vrings),
        timeout=15)
    # QEMU could not ask the old back-end for its rings (GET_VRING_BASE failed),
    # so it restarts them at the used index the guest's memory shows.
    bases = [r.fields["payload"]["num"] for r in host.trace()
             if r.request == "SET_VRING_BASE" and r.direction == TO_BACKEND]
    assert bases == [6, 6]
    frames_both_ways(host)
    assert host.guest.ring_state(0).used_idx == 12


def _migration(requires_qemu, on_progress=None, **config) -> QemuMigration:
    config = MigrationConfig(qemu=requires_qemu, ram_size=64 * MiB, timeout=30, **config)
    holder: dict = {}
    m = QemuMigration(config, keep=True,
                      on_progress=(lambda ev: on_progress(holder["m"], ev)) if on_progress
                      else None)
    holder["m"] = m
    return m


def _source_runs_on(m: QemuMigration) -> None:
    """After a failed migration the source guest keeps running, logging off."""
    assert m.src.qemu.qmp.query_status()["status"] == "running"
    assert not m.src.server.snapshot(trace=False).logging
    frames_both_ways(m.src)


def test_destination_nobody_listens(requires_qemu):
    with tempfile.TemporaryDirectory() as empty:
        nowhere = os.path.join(empty, "nobody.sock")
        m = _migration(requires_qemu, destination_uri=f"unix:{nowhere}")
        try:
            result = m.run()
            assert result.status == "failed"
            assert "Failed to connect" in result.error and nowhere in result.error
            assert not result.integrity_ok and result.summary()["integrity"] == "not checked"
            _source_runs_on(m)
        finally:
            m.close()
    assert not m.src._own.qemu.alive()


def test_destination_killed_before_it_accepts(requires_qemu):
    def kill_destination(m, ev):
        if ev.kind == "phase" and ev.data == "migrating":   # just before QMP migrate
            os.kill(m.dst.qemu.pid, signal.SIGKILL)
            m.dst.qemu.wait(10)

    m = _migration(requires_qemu, kill_destination)
    try:
        result = m.run()
        assert result.status == "failed" and "Connection refused" in result.error
        _source_runs_on(m)
    finally:
        m.close()


def test_destination_killed_mid_migration(requires_qemu):
    killed = []

    def kill_destination(m, ev):
        if ev.kind == "round" and ev.data.dirty_sync_count >= 2 and not killed:
            os.kill(m.dst.qemu.pid, signal.SIGKILL)
            killed.append(ev.data)

    m = _migration(requires_qemu, kill_destination)
    try:
        result = m.run()
        assert killed and result.status == "failed"
        assert result.error.startswith("MigrationFailedError: migration failed:")
        # QEMU turned dirty logging on for the migration and off after it failed
        # (vhost_log_global_stop may come after query-migrate said failed: wait for it).
        assert m.src.server.wait_for(lambda s: not s.logging, timeout=20)
        features = [r.fields["payload"]["value"] for r in m.src.trace()
                    if r.request == "SET_FEATURES" and r.direction == TO_BACKEND]
        assert features[-2] & LOG_ALL and not features[-1] & LOG_ALL
        _source_runs_on(m)
    finally:
        m.close()
