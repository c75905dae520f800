"""QMP through vhostlab.qemu.QMP against a real QEMU, and the qtest client's edges."""
from __future__ import annotations

import os
import signal
import threading

import pytest

from vhostlab.qemu import (
    QemuInstance, QmpCommandError, QmpConnectionError, QTestConnectionError, QTestError,
)

pytestmark = pytest.mark.qemu


@pytest.fixture
def vm(requires_qemu):
    with QemuInstance(None, qemu=requires_qemu) as q:
        yield q


def test_query_status(vm):
    status = vm.qmp.query_status()
    assert status["status"] == "running" and status["running"] is True


def test_stop_cont_round_trip_with_events(vm):
    vm.qmp.stop()
    stop = vm.qmp.wait_event("STOP", timeout=10)
    assert vm.qmp.query_status()["status"] == "paused"
    vm.qmp.cont()
    resume = vm.qmp.wait_event("RESUME", timeout=10)
    assert vm.qmp.query_status()["running"] is True
    assert stop.timestamp <= resume.timestamp and stop.received <= resume.received
    with pytest.raises(QmpConnectionError, match="no QMP event STOP"):
        vm.qmp.wait_event("STOP", timeout=0.2)      # each event is handed out once


def test_migration_helpers_reach_qemu(vm):
    vm.qmp.migrate_set_capabilities(events=True)
    vm.qmp.migrate_set_parameters(max_bandwidth=2 << 20, downtime_limit=400)
    assert vm.qmp.execute("query-migrate-parameters")["max-bandwidth"] == 2 << 20
    caps = {c["capability"]: c["state"] for c in vm.qmp.execute("query-migrate-capabilities")}
    assert caps["events"] is True
    assert vm.qmp.query_migrate() == {}              # no migration yet


def test_refused_command_is_named(vm):
    with pytest.raises(QmpCommandError) as err:
        vm.qmp.execute("no-such-command")
    assert err.value.error_class == "CommandNotFound"
    assert "no-such-command" in str(err.value)


def test_qmp_from_worker_threads_at_once(vm):
    results, errors = [], []

    def work():
        try:
            for _ in range(5):
                results.append(vm.qmp.query_status()["status"])
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors and results == ["running"] * 20


def test_qmp_after_qemu_died_is_a_named_error(vm):
    os.kill(vm.pid, signal.SIGKILL)
    vm.wait(10)
    with pytest.raises(QmpConnectionError) as err:
        vm.qmp.query_status()
    assert "SIGKILL" in str(err.value)


def test_quit_ends_qemu(vm):
    vm.qmp.quit()
    assert vm.wait(10) == 0
    assert vm.qmp.wait_event("SHUTDOWN", timeout=10).data.get("reason") == "host-qmp-quit"


def test_qtest_memory_round_trip_and_failures(vm):
    qt = vm.qtest
    blob = os.urandom(200_000)                       # several b64write/b64read chunks
    qt.write(0x2000000, blob)
    assert qt.read(0x2000000, len(blob)) == blob
    qt.memset(0x2000000, 4096, 0xAB)
    assert qt.read(0x2000000, 4096) == b"\xab" * 4096
    qt.writeq(0x2001000, 0x1122334455667788)
    assert qt.readq(0x2001000) == 0x1122334455667788
    assert qt.readl(0x2001000) == 0x55667788
    assert qt.read(0x2001000, 0) == b""
    with pytest.raises(QTestError, match="irq_intercept_in"):
        qt.irq_intercept_in("/no/such/device")
    with pytest.raises(ValueError, match="does not fit"):
        qt.outb(0x80, 0x100)
    with pytest.raises(ValueError, match="out of range"):
        qt.inl(0xFFFE)
    assert qt.inb(0x80) is not None                  # the connection survived the failures


def test_hung_qemu_gives_timeouts_not_hangs(vm):
    vm.qtest.timeout = vm.qmp.timeout = 0.5
    os.kill(vm.pid, signal.SIGSTOP)
    try:
        with pytest.raises(QmpConnectionError, match="no answer within 0.5 s"):
            vm.qmp.query_status()
        with pytest.raises(QTestConnectionError, match="no answer within 0.5 s") as err:
            vm.qtest.inb(0x80)
        assert "still running" in str(err.value)
    finally:
        os.kill(vm.pid, signal.SIGCONT)
    with pytest.raises(QTestConnectionError):     # a timed-out connection stays closed
        vm.qtest.inb(0x80)
