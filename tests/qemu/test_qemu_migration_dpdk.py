"""A real QEMU migrating between two DPDK back-ends (testpmd), each behind a recording relay.

The guest transmits the kit's self-checking frames, DPDK writes each back into
its RX buffers, and the guest reads the ones left there during the migration
from the destination's RAM, byte for byte. The relay's traces give
GET_VRING_BASE and SET_VRING_BASE; the shared log, mapped through the relay,
gives the dirty rounds. With ``break_logging`` the source relay hides
VHOST_F_LOG_ALL from DPDK, and the same check must fail.
"""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from vhostlab.protocol import HEADER_SIZE, TO_BACKEND, LogArea, Message, Request
from vhostlab.qemu import MigrationConfig, QemuMigration, vring_bases
from vhostlab.backend.observe import ObservedDevice
from vhostlab.qemu import QemuError
from vhostlab.qemu.dpdk_side import QemuDpdkMigration, RelayObserver
from vhostlab.qemu.migration_model import MigrationResult

LOG_ALL = 1 << 26
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def peers(requires_qemu, requires_dpdk) -> str:
    return requires_qemu


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    with open(f"/proc/{pid}/stat") as f:       # a zombie not yet reaped is gone too
        return f.read().rsplit(")", 1)[1].split()[0] == "Z"


class _Pids:
    """on_progress: the QEMU and testpmd pids, once both hosts are up."""

    def __init__(self) -> None:
        self.migration: QemuMigration | None = None
        self.pids: list[int] = []

    def __call__(self, ev) -> None:
        if ev.kind == "phase" and ev.data == "warm-up" and not self.pids:
            m = self.migration
            self.pids = [p for h in (m.src, m.dst)
                         for p in (h.qemu.pid, h.server.dpdk.pid)]


def _run(qemu: str, **kwargs):
    pids = _Pids()
    m = QemuMigration(MigrationConfig(qemu=qemu, backend="dpdk", **kwargs), keep=True,
                      on_progress=pids)
    pids.migration = m
    try:
        result = m.run()
        traces = m.src.trace(), m.dst.trace()
    finally:
        m.close()
    assert len(pids.pids) == 4 and all(_gone(p) for p in pids.pids)   # nothing left running
    return m, result, traces


@pytest.mark.slow
def test_qemu_migrates_between_two_dpdk_back_ends(peers):
    m, result, (src, dst) = _run(peers)
    assert isinstance(m, QemuDpdkMigration)
    assert result.error is None, (result.error, result.notes)
    assert result.status == "completed" and result.integrity == "ok"
    frames = result.from_guest
    assert frames["sent"] > 0 and frames["delivered"] == frames["sent"]
    assert frames["lost"] == frames["corrupted"] == frames["duplicated"] == 0
    # DPDK wrote frames into RX buffers during the migration; the guest read
    # every one from the destination's RAM.
    v = result.verify
    assert v.rx_expected > 0 and v.rx_found == v.rx_intact == v.rx_expected
    # The front-end's view: the rounds read DPDK's marks in the shared log.
    assert result.pages_logged > 0
    assert sum(r.pages_logged for r in result.rounds) > 0
    assert m.dirty_rounds[-1].final_sync and m.dirty_rounds[-1].mismatched_pages.size == 0
    # last_avail_idx from the source's GET_VRING_BASE to the destination's SET_VRING_BASE.
    got, given = vring_bases(src, "GET_VRING_BASE"), vring_bases(dst, "SET_VRING_BASE")
    assert sorted(got) == [0, 1] and got == given and all(got.values())
    assert any(r.request == "SET_FEATURES" and r.direction == TO_BACKEND
               and r.fields["payload"]["value"] & LOG_ALL for r in src)
    # testpmd's own totals: every frame the source DPDK took, it wrote back.
    t = result.dpdk_totals["source"]
    assert t["rx_packets"] == t["tx_packets"] > 0 and t["tx_dropped"] == 0
    summary = result.summary()
    assert summary["backend"] == "dpdk" and "rx_injection" in summary["unavailable"]


@pytest.mark.slow
def test_dpdk_that_never_logs_loses_frames(peers):
    m, result, (src, _dst) = _run(peers, break_logging=True)
    assert result.status == "completed" and result.integrity == "corrupted"
    frames = result.from_guest
    assert frames["lost"] > 0
    # The disagreement is in the trace: DPDK was never asked to log.
    assert m.src.observer.rewritten and all(sent & LOG_ALL and not passed & LOG_ALL
                                            for sent, passed in m.src.observer.rewritten)
    assert not any(r.request == "SET_FEATURES" and r.direction == TO_BACKEND
                   and r.fields["payload"]["value"] & LOG_ALL for r in src)
    # ... and so is what QEMU sent: the relay keeps it beside what it passed on.
    assert any(r.request == "SET_FEATURES" and r.fields["rewritten_from"]["value"] & LOG_ALL
               for r in src if "rewritten_from" in r.fields)
    assert not any(n.startswith("narration:") for n in result.notes), result.notes
    assert result.pages_logged == 0
    bad = m.dirty_rounds[-1].mismatched
    assert bad and any(page.frames for page in bad)      # pages whose frames never came


@pytest.mark.slow
def test_demo_json_against_dpdk(peers):
    out = subprocess.run([sys.executable, "-m", "vhostlab", "demo", "--frontend", "qemu",
                          "--backend", "dpdk", "--json"], capture_output=True, text=True,
                         timeout=600, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT), "VHOSTLAB_QEMU": peers})
    lines = out.stdout.strip().splitlines()
    assert out.returncode == 0 and len(lines) == 1, (out.stdout, out.stderr[-3000:])
    summary = json.loads(lines[0])
    schema = MigrationResult(config=MigrationConfig()).summary()
    assert set(schema) <= set(summary)                       # the schema, plus "backend"
    assert summary["frontend"] == "qemu" and summary["backend"] == "dpdk"
    assert summary["integrity"] == "ok" and summary["vhost_log"]["pages_logged"] > 0
    assert summary["frames"]["lost"] == summary["frames"]["corrupted"] == 0
    rx = summary["rx_check"]          # DPDK's unread RX frames, found whole at the destination
    assert rx["expected"] == rx["found"] == rx["intact"] > 0, rx


# -- without QEMU or DPDK ---------------------------------------------------------------
def test_kit_only_options_are_refused_with_dpdk():
    for option in ({"rx_at_stop": 8}, {"source_handlers": {1: 2}}):
        with pytest.raises(ValueError, match="DPDK"):
            MigrationConfig(backend="dpdk", **option)
    with pytest.raises(ValueError, match="backend='ovs'"):
        MigrationConfig(backend="ovs")


def _relay_observer(**options):
    """A RelayObserver on its own ObservedDevice, and a ``feed`` that hands each
    message to both in the relay's order (the device first)."""
    watch = RelayObserver(ObservedDevice("dpdk"), **options)

    def feed(direction, msg, fds):
        watch.device(direction, msg, fds)
        watch(direction, msg, fds)
    return watch, feed


def test_the_observer_hides_log_all_from_the_back_end_only_when_asked():
    msg = Message.make(Request.SET_FEATURES, LOG_ALL | (1 << 30))
    raw = msg.to_bytes()
    assert _relay_observer()[0].rewrite(TO_BACKEND, msg) is None
    observer, _ = _relay_observer(drop_log_all=True)
    passed = observer.rewrite(TO_BACKEND, msg)
    assert len(passed) == len(raw) and passed[:HEADER_SIZE] == raw[:HEADER_SIZE]
    assert struct.unpack_from("<Q", passed, HEADER_SIZE)[0] == 1 << 30
    assert observer.rewritten == [(LOG_ALL | (1 << 30), 1 << 30)]
    plain = Message.make(Request.SET_FEATURES, 1 << 30)
    assert observer.rewrite(TO_BACKEND, plain) is None       # nothing to hide


def test_the_observer_never_raises_into_the_relay():
    observer, feed = _relay_observer()
    bad_log = Message.make(Request.SET_LOG_BASE, LogArea(4096, 0), fds=[-1])
    feed(TO_BACKEND, bad_log, [-1])                           # no such fd: noted, not raised
    assert observer.device.log is None and observer.read_log() is None
    assert observer.errors and "SET_LOG_BASE" in observer.errors[0]
    with pytest.raises(QemuError, match="no SET_MEM_TABLE"):
        observer.read_ram(0, 16)


def test_skip_final_sync_throws_the_marks_away_as_each_ring_stops():
    """The relay's emulation of a skipped final sync: DPDK's marks leave the shared
    log as GET_VRING_BASE's answer passes, before QEMU can sync them."""
    from vhostlab.dirtylog import DirtyLog
    from vhostlab.protocol import TO_FRONTEND, VringState
    log = DirtyLog.allocate(64 << 20)
    try:
        watch, feed = _relay_observer(discard_at_stop=True)
        feed(TO_BACKEND, Message.make(Request.SET_LOG_BASE, LogArea(log.size, 0)), [log.fd])
        for page in (5, 300, 4000):          # DPDK's marks, made through its own mapping
            log.mark_page(page)
        feed(TO_FRONTEND, Message.make_reply(Request.GET_VRING_BASE, VringState(0, 16)), [])
        assert watch.discarded == {5, 300, 4000}
        assert log.popcount() == 0            # the final sync will find nothing
        assert watch.log_at_stop is not None and not any(watch.log_at_stop)
        assert watch.errors == []
        kept, feed_kept = _relay_observer()   # without the emulation nothing is taken
        feed_kept(TO_BACKEND, Message.make(Request.SET_LOG_BASE, LogArea(log.size, 0)), [log.fd])
        log.mark_page(7)
        feed_kept(TO_FRONTEND, Message.make_reply(Request.GET_VRING_BASE, VringState(0, 16)), [])
        assert kept.discarded == set() and log.popcount() == 1
        assert kept.read_log() is not None
        watch.device.close()
        kept.device.close()
    finally:
        log.close()
