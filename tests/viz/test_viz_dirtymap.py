"""The dirty-bitmap view and the rings at the switch-over, from real migrations.

The built-in migration runs here; a real QEMU's runs where one is installed
(``requires_qemu``). The view is checked as the browser test will read it:
root ``data-view="dirty-bitmap"``, one ``<img data-role="dirty-map">``, the
dirty colours in the legend and exactly those colours in the PNG's cells.
"""
from __future__ import annotations

import base64
import re

import numpy as np
import pytest

from vhostlab.dirtylog import DirtyRound
from vhostlab.frontend import BuiltinMigration
from vhostlab.viz import CallTimelineView, DirtyBitmapView, DirtyRoundPlayer, VirtqueueView
from vhostlab.viz import decode_png
from vhostlab.viz.calls import inferred_timeline
from vhostlab.viz.dirtymap import DIRTY_COLOURS, FILL, render
from vhostlab.protocol import TO_BACKEND, TO_FRONTEND

BANDS = ("RX ring", "TX ring", "RX buffers", "TX buffers")


def _png(html: str) -> np.ndarray:
    found = re.search(r"<img data-role='dirty-map' src='data:image/png;base64,([^']+)'", html)
    assert found, "no dirty-map image"
    return decode_png(base64.b64decode(found.group(1)))[..., :3]


def dirty_fraction(html: str) -> float:
    img = _png(html)
    colours = re.findall(r"data-dirty-color='(#[0-9a-f]{6})'", html)
    assert sorted(colours) == sorted(DIRTY_COLOURS)
    mask = np.zeros(img.shape[:2], bool)
    for c in colours:
        mask |= (img == [int(c[i:i + 2], 16) for i in (1, 3, 5)]).all(-1)
    return float(mask.mean())


@pytest.fixture(scope="module")
def builtin_runs():
    runs = {}
    for broken in (False, True):
        mig = BuiltinMigration(ram_size=32 << 20, break_logging=broken)
        mig.run()
        runs[broken] = mig
    return runs


def test_rounds_hold_what_the_log_syncs_took(builtin_runs):
    mig = builtin_runs[False]
    rounds = mig.dirty_rounds
    assert rounds[-1].final_sync and not any(r.final_sync for r in rounds[:-1])
    # Round k+1 of the RAM copy is the k-th sync: the same log pages, the same guest pages.
    for dr, snap in zip(rounds, mig.snapshots[1:]):
        assert dr.log_pages.tolist() == DirtyRound.bitmap_pages(snap.log_bitmap).tolist()
        assert dr.guest_pages.tolist() == DirtyRound.bitmap_pages(snap.guest_bitmap).tolist()
    logged = set().union(*(r.log_pages.tolist() for r in rounds))
    assert len(logged) > 0 and not rounds[-1].mismatched


def test_broken_run_shows_mismatched_pages_at_the_frames_buffers(builtin_runs):
    mig = builtin_runs[True]
    final = mig.dirty_rounds[-1]
    assert all(r.log_pages.size == 0 for r in mig.dirty_rounds)
    assert final.mismatched_pages.tolist() == sorted(mig.pages_mismatched.tolist())
    rx = next(b for b in final.bands if b.name == "RX buffers")
    in_rx = [m for m in final.mismatched if rx.first_page <= m.page < rx.first_page + rx.n_pages]
    assert in_rx and all(m.frames and all(f.startswith("RX #") for f in m.frames) for m in in_rx)
    html = DirtyBitmapView(final, mig.dirty_rounds).to_html()
    assert "differ at the destination" in html and in_rx[0].frames[0] in html


def test_view_shape_cells_and_bands(builtin_runs):
    rounds = builtin_runs[False].dirty_rounds
    html = DirtyBitmapView(rounds[0], rounds).to_html()
    assert "data-view='dirty-bitmap'" in html
    for name in BANDS:
        assert name in html
    assert dirty_fraction(html) > 0
    png, blocks = render(rounds[0], rounds)
    img = decode_png(png)[..., :3]
    # A dirty page is a FILL x FILL square of one colour (at least 4x4 px).
    colour = np.array([int(DIRTY_COLOURS_KEY[i:i + 2], 16) for i in (1, 3, 5)])
    ys, xs = np.nonzero((img == colour).all(-1))
    assert ys.size and FILL >= 4
    y0, x0 = ys.min(), xs[ys == ys.min()].min()
    assert (img[y0:y0 + FILL, x0:x0 + FILL] == colour).all()


DIRTY_COLOURS_KEY = next(iter(DIRTY_COLOURS))          # the vhost log's colour


def test_player_starts_at_the_busiest_sync_and_has_a_static_twin(builtin_runs):
    rounds = builtin_runs[False].dirty_rounds
    player = DirtyRoundPlayer(rounds)
    assert player.to_html().count("data-view='dirty-bitmap'") == len(rounds)
    sizes = [r.log_pages.size + r.guest_pages.size for r in rounds]
    assert sizes[player.busiest()] == max(sizes)
    # A broken run opens where pages differ at the destination: what it is about.
    broken = builtin_runs[True].dirty_rounds
    opens = DirtyRoundPlayer(broken).busiest()
    assert broken[opens].mismatched and not any(r.mismatched for r in broken[opens + 1:])


def test_rings_at_the_switch_over_are_not_drained(builtin_runs):
    mig = builtin_runs[False]
    src, dst = mig.switchover.taken("source"), mig.switchover.taken("destination")
    assert [r.index for r in src] == [r.index for r in dst] == [0, 1]
    got = {r.fields["payload"]["index"]: r.fields["payload"]["num"]
           for r in mig.src.server.trace.records() if r.request == "GET_VRING_BASE"
           and r.direction == TO_FRONTEND}
    for s, d in zip(src, dst):
        assert s.last_avail_idx == got[s.index] == d.last_avail_idx
        assert s.num == mig.guest.queues[s.index].num          # read from the ring, not 256
        assert "data-view='virtqueue'" in VirtqueueView(s).to_html()
    assert len(src[0].in_flight) > 0


def test_inferred_nesting_of_a_qemu_like_trace():
    from vhostlab.backend.trace import MessageTrace

    trace = MessageTrace()

    def rec(req, d=TO_BACKEND, **payload):
        trace.record(d, req, {"payload": payload}, b"")
    # QEMU 7.2's shape: start-up, logging on at migrate, SET_STATUS 0 before the stop.
    for req in ("GET_FEATURES", "SET_OWNER"):
        rec(req)
    rec("SET_FEATURES", value=1)
    for req in ("SET_MEM_TABLE", "SET_VRING_NUM", "SET_VRING_BASE", "SET_VRING_ADDR",
                "SET_VRING_KICK", "SET_VRING_CALL", "SET_VRING_ENABLE"):
        rec(req, index=0)
    rec("SET_LOG_BASE")
    rec("SET_LOG_BASE", TO_FRONTEND)
    rec("SET_FEATURES", value=1 << 26)
    rec("SET_VRING_ADDR", index=0, flags=1)
    rec("SET_STATUS", value=0)
    rec("GET_VRING_BASE", index=0)
    rec("GET_VRING_BASE", index=1)
    entries = inferred_timeline(trace.records())
    calls = [(e["depth"], e["name"]) for e in entries if e["kind"] == "call"]
    assert (0, "vhost_dev_init") in calls
    assert (0, "vhost_net_start") in calls and (1, "vhost_dev_start") in calls
    assert (2, "vhost_virtqueue_start") in calls
    assert (0, "vhost_log_global_start") in calls and (3, "vhost_dev_log_resize") in calls
    assert (3, "vhost_dev_set_features") in calls and (4, "vhost_set_features") in calls
    assert (1, "vhost_dev_stop") in calls and (2, "vhost_dev_start") in calls  # (dev, false)
    assert (2, "vhost_virtqueue_stop") in calls and (3, "vhost_get_vring_base") in calls
    assert entries[-1]["kind"] == "event" and "vhost_log_put" in entries[-1]["name"]
    assert entries[-1]["depth"] == 2                            # inside vhost_dev_stop
    html = CallTimelineView.inferred(trace.records()).to_html()
    assert "Inferred" in html and "data-view='call-timeline'" in html


def test_real_qemu_dirty_cells_cover_two_percent(requires_qemu):
    from vhostlab.qemu.migration import MigrationConfig, QemuMigration

    mig = QemuMigration(MigrationConfig(ram_size=128 << 20))
    result = mig.run()
    assert result.integrity == "ok", result.error
    rounds = mig.dirty_rounds
    assert rounds[-1].final_sync
    player = DirtyRoundPlayer(rounds)
    html = player.view(player.busiest()).to_html()
    assert dirty_fraction(html) >= 0.02
    for name in (*BANDS, "guest working set"):
        assert name in html
    queue = mig.switchover.taken("source")[0].num
    assert queue in (256, 1024)               # whatever the QEMU gave, read from it
