"""Live migration between two real QEMUs, each with its own vhostlab back-end.

Frames flow both ways while QEMU copies RAM; the guest driver resumes on the
destination; every frame is checked byte for byte. With ``break_logging`` the
source back-end skips dirty logging, and the same check must fail.
"""
from __future__ import annotations

import time

import pytest

from vhostlab.qemu import MigrationConfig, QemuMigration
from vhostlab.qemu.demo import run_demo
from vhostlab.protocol import TO_BACKEND

pytestmark = [pytest.mark.qemu, pytest.mark.slow]

LOG_ALL = 1 << 26


def _in(trace, request):
    return [r for r in trace if r.request == request and r.direction == TO_BACKEND]


def _frames_intact(d: dict) -> bool:
    return d["sent"] > 0 and d["delivered"] == d["sent"] and \
        d["lost"] == d["corrupted"] == d["duplicated"] == 0


def test_migration_keeps_every_frame(requires_qemu):
    phases: list[str] = []
    migration = QemuMigration(MigrationConfig(qemu=requires_qemu), keep=True,
                              on_progress=lambda ev: ev.kind == "phase" and phases.append(ev.data))
    try:
        migration.start()
        counts = []
        while not migration.progress().done:           # what a lab's view would poll
            counts.append(migration.progress().dirty_sync_count)
            time.sleep(0.05)
        result = migration.wait(5)
        src_trace = migration.src.trace()
    finally:
        migration.close()
    assert result.error is None, result.error
    assert result.status == "completed" and result.integrity_ok
    assert phases == ["starting", "warm-up", "migrating", "quiescing", "switch-over",
                      "verifying", "after", "done"]
    assert migration.progress().phase == "done" and len(migration.progress().rounds) >= 3
    assert counts == sorted(counts)                    # the sync count only grows
    assert result.dirty_sync_count >= 3
    assert _frames_intact(result.to_guest) and _frames_intact(result.from_guest)

    # The RX frames the source back-end left in guest buffers were read from
    # the destination's RAM, every one intact.
    v = result.verify
    assert v.rx_expected > 0 and v.rx_found == v.rx_intact == v.rx_expected
    # last_avail_idx went from the source's GET_VRING_BASE to the destination's
    # SET_VRING_BASE, ring by ring.
    assert sorted(v.handoff) == [0, 1] and v.handoff_ok
    assert v.handoff[0]["get_vring_base"] > 0

    # The seed's three steps, in its order, on the source back-end's wire.
    seq = [r.seq for r in _in(src_trace, "SET_LOG_BASE")]
    log_all = [r.seq for r in _in(src_trace, "SET_FEATURES")
               if r.fields["payload"]["value"] & LOG_ALL]
    stop = [r.seq for r in _in(src_trace, "GET_VRING_BASE")]
    assert seq and log_all and len(stop) == 2
    assert seq[0] < log_all[0] < stop[0]
    ops = result.ops_called
    assert ops.index("vhost_set_log_base") < ops.index("vhost_get_vring_base")

    # The vhost log saw the back-end's writes, round by round.
    assert result.pages_logged > 0
    assert sum(r.pages_logged for r in result.rounds) > 0
    assert any(r.logged_pages().size for r in result.rounds)

    events = {(e["qemu"], e["event"]): e["timestamp"] for e in result.events}
    assert events[("source", "STOP")] <= events[("destination", "RESUME")]
    s = result.summary()
    assert s["downtime_ms"] is not None and s["total_time_ms"] >= s["downtime_ms"]
    assert s["resources"]["total_peak_rss_bytes"] > 0
    assert not migration.src._own.qemu.alive() and not migration.dst._own.qemu.alive()


def test_break_logging_loses_frames(requires_qemu):
    result = QemuMigration(MigrationConfig(qemu=requires_qemu, break_logging=True)).run()
    assert result.error is None, result.error
    assert result.status == "completed"                 # QEMU cannot tell ...
    assert result.pages_logged == 0
    assert not result.integrity_ok                       # ... but the guest can
    rx = result.to_guest
    assert rx["corrupted"] + rx["lost"] > 0
    assert result.verify.rx_intact < result.verify.rx_expected
    # The ring positions do not travel in the log: they still match.
    assert result.verify.handoff_ok
    assert result.summary()["integrity"] == "corrupted"


def test_demo_json_summary(requires_qemu, monkeypatch):
    monkeypatch.setenv("VHOSTLAB_QEMU", requires_qemu)
    lines: list[str] = []
    summary, code = run_demo(as_json=True, break_logging=False, out=lines.append)
    assert code == 0, "\n".join(lines)
    assert summary["frontend"] == "qemu" and summary["integrity"] == "ok"
    assert summary["migration"]["status"] == "completed"
    per_round = summary["migration"]["per_round"]
    assert summary["migration"]["rounds"] == len(per_round) and summary["dirty_sync_count"] >= 3
    assert [r["round"] for r in per_round] == list(range(1, len(per_round) + 1))
    assert [n for r in per_round for n in r["syncs"]] == \
        list(range(1, summary["dirty_sync_count"] + 1))
    assert [r["status"] for r in per_round] == ["active"] * (len(per_round) - 1) + ["completed"]
    assert sum(r["bytes_sent"] for r in per_round) == summary["migration"]["transferred"]
    assert summary["frames"]["lost"] == summary["frames"]["corrupted"] == 0
    assert summary["frames"]["sent"] == summary["frames"]["delivered"] > 0
    for d in summary["frames_by_direction"].values():
        assert d["sent"] == d["delivered"] > 0 and d["lost"] == d["corrupted"] == 0
    assert summary["vhost_log"]["pages_logged"] > 0
    assert summary["vhost_log"]["syncs"] == summary["dirty_sync_count"] + 1
    assert "vhost_set_log_base" in summary["ops_called"]
    assert summary["qemu_version"].count(".") == 2
    assert isinstance(summary["total_time_ms"], int) and isinstance(summary["downtime_ms"], int)
    assert not any(line.startswith("Seed step") for line in lines)   # JSON: no narration
    assert lines[-1] == "integrity: ok"


def test_demo_break_logging_narrates_and_exits_3(requires_qemu, monkeypatch):
    monkeypatch.setenv("VHOSTLAB_QEMU", requires_qemu)
    lines: list[str] = []
    summary, code = run_demo(as_json=False, break_logging=True, out=lines.append)
    assert code == 3, "\n".join(lines)
    assert summary["integrity"] == "corrupted" and summary["break_logging"]
    text = "\n".join(lines)
    steps = [text.index(f"Seed step {n}") for n in (1, 2, 3)]
    assert steps == sorted(steps)
    assert text.index("-> SET_LOG_BASE") > steps[0]
    assert text.index("<- GET_VRING_BASE") > steps[2]
    assert "vhost_log_put()" in text and lines[-1] == "integrity: corrupted"
