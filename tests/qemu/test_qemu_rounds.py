"""RoundTracker on query-migrate answers, without QEMU.

One recorded run (tests/qemu/data: what the tracker was fed during a real
migration, QEMU 7.2), replayed; and sequences built from the query-migrate
fields the tracker reads (QAPI MigrationInfo / MigrationStats: status,
ram.dirty-sync-count, transferred, remaining, normal, duplicate,
dirty-pages-rate, downtime-bytes).
"""
from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest

from vhostlab.qemu import PrecopyRound
from vhostlab.qemu.rounds import MigrateReading, RoundTracker

RECORDED = pathlib.Path(__file__).parent / "data" / "query_migrate_qemu_7.2.json"


def _bitmap(size: int, pages) -> bytes:
    bits = np.zeros(size * 8, np.uint8)
    bits[list(pages)] = 1
    return np.packbits(bits, bitorder="little").tobytes()


def replay(feed) -> RoundTracker:
    """Feed a recorded sequence to a new tracker, in order."""
    t = RoundTracker()
    for item in feed:
        if "log" in item:
            t.log_read(_bitmap(item["log"]["size"], item["log"]["pages"]))
        elif "guest" in item:
            t.guest_did(**item["guest"])
        else:
            t.query_migrate(item["query_migrate"], item["at"])
    return t


def answer(status: str, syncs: int, transferred: int, remaining: int, normal: int = 0,
           duplicate: int = 0, **more) -> dict:
    """A query-migrate answer with the fields the tracker reads."""
    ram = {"dirty-sync-count": syncs, "transferred": transferred, "remaining": remaining,
           "normal": normal, "duplicate": duplicate, "dirty-pages-rate": 0, **more}
    return {"status": status, "ram": ram}


@pytest.fixture(scope="module")
def recorded():
    return json.loads(RECORDED.read_text())


# -- the recorded run ------------------------------------------------------------
def test_recorded_run_makes_one_round_per_seen_sync(recorded):
    rounds = replay(recorded["feed"]).rounds
    assert [r.round for r in rounds] == [1, 2, 3, 4, 5]
    assert [r.syncs for r in rounds] == [(1,), (2,), (3,), (4,), (5, 6, 7)]
    assert [r.status for r in rounds] == ["active"] * 4 + ["completed"]
    assert all(isinstance(r, PrecopyRound) for r in rounds)


def test_recorded_rounds_share_out_every_byte_and_page_qemu_sent(recorded):
    rounds = replay(recorded["feed"]).rounds
    last = MigrateReading.of([i for i in recorded["feed"] if "query_migrate" in i][-1]
                             ["query_migrate"])
    assert sum(r.bytes_sent for r in rounds) == last.transferred
    assert sum(r.pages_sent for r in rounds) == last.pages
    assert sum(r.zero_pages for r in rounds) == last.zero_pages
    # Round 1 sends the zero pages of the never-touched RAM.
    assert rounds[0].zero_pages == last.zero_pages


def test_recorded_round_counts_run_between_the_readings_that_saw_the_syncs(recorded):
    answers = [(i["at"], MigrateReading.of(i["query_migrate"]))
               for i in recorded["feed"] if "query_migrate" in i]
    first_seen = {}
    for at, r in answers:
        first_seen.setdefault(r.dirty_sync_count, (at, r))
    rounds = replay(recorded["feed"]).rounds
    for n in (2, 3):        # rounds 2 and 3: from the reading of sync n to that of n + 1
        (at, start), (_, end) = first_seen[n], first_seen[n + 1]
        r = rounds[n - 1]
        assert r.time == round(at, 4)
        assert r.transferred == start.transferred and r.remaining == start.remaining
        assert r.bytes_sent == end.transferred - start.transferred
        assert r.remaining_after == end.remaining


def test_recorded_log_readings_are_ored_until_the_sync(recorded):
    """Each round's log bitmap is the union of the readings since the previous round."""
    expected, pages = [], set()
    t = RoundTracker()
    for item in recorded["feed"]:
        if "log" in item:
            pages |= set(item["log"]["pages"])
        elif "query_migrate" in item and t.query_migrate(item["query_migrate"], item["at"]):
            expected.append(sorted(pages))
            pages = set()
    got = [r.logged_pages().tolist() for r in replay(recorded["feed"]).rounds]
    assert got == expected
    assert [r.pages_logged for r in replay(recorded["feed"]).rounds] == [len(p) for p in expected]


def test_recorded_guest_activity_goes_to_the_round_that_opens_next(recorded):
    rounds = replay(recorded["feed"]).rounds
    total = sum(i["guest"].get("bytes_written", 0) for i in recorded["feed"] if "guest" in i)
    tx = sum(i["guest"].get("tx_frames", 0) for i in recorded["feed"] if "guest" in i)
    assert rounds[0].guest_bytes_written == 0       # nothing before the first sync
    assert sum(r.guest_bytes_written for r in rounds) == total
    assert sum(r.tx_frames for r in rounds) == tx


def test_recorded_last_round_went_with_the_guest_stopped(recorded):
    rounds = replay(recorded["feed"]).rounds
    last, before = rounds[-1], rounds[-2]
    final = [i for i in recorded["feed"] if "query_migrate" in i][-1]["query_migrate"]
    assert last.remaining_after == 0
    assert last.downtime_bytes == final["ram"]["downtime-bytes"]
    assert before.remaining_after is None          # no reading saw the last sync in time
    assert "dirty syncs 5 to 7 came between two readings" in last.note
    assert "left after round 4" in last.note and "downtime-bytes" in last.note


# -- built from the schema ---------------------------------------------------------
def test_several_syncs_between_two_readings_make_one_round():
    t = RoundTracker()
    assert t.query_migrate({"status": "setup"}, 0.001) is None
    r1 = t.query_migrate(answer("active", 1, 1000, 9000, normal=1, duplicate=10), 0.02)
    assert r1.syncs == (1,) and r1.round == 1
    assert t.query_migrate(answer("active", 1, 5000, 8000, normal=2, duplicate=10), 0.04) is None
    r2 = t.query_migrate(answer("active", 4, 7000, 3000, normal=4, duplicate=12), 0.10)
    assert r2.syncs == (2, 3, 4) and r2.dirty_sync_count == 4 and r2.round == 2
    assert r2.note.startswith("dirty syncs 2 to 4 came between two readings of "
                              "query-migrate 60 ms apart")
    round1 = t.rounds[0]
    assert (round1.bytes_sent, round1.pages_sent, round1.zero_pages) == (7000, 16, 12)
    assert round1.remaining_after == 3000


def test_a_reading_without_a_new_sync_extends_the_open_round():
    t = RoundTracker()
    t.query_migrate(answer("active", 1, 100, 900, normal=1), 0.02)
    t.query_migrate(answer("active", 2, 200, 800, normal=2), 0.04)
    t.query_migrate(answer("active", 2, 450, 700, normal=5), 0.06)
    r = t.rounds[-1]
    assert (r.bytes_sent, r.pages_sent, r.remaining_after) == (250, 3, None)


def test_the_last_round_counts_from_the_reading_before_it():
    t = RoundTracker()
    t.query_migrate(answer("active", 1, 100, 900, normal=1), 0.02)
    t.query_migrate(answer("active", 2, 300, 700, normal=3), 0.04)
    t.query_migrate(answer("active", 2, 600, 650, normal=6), 0.06)     # before the last
    t.query_migrate(answer("completed", 3, 900, 0, normal=9, **{"downtime-bytes": 250}), 0.09)
    first, second, last = t.rounds
    assert second.remaining_after is None
    assert (second.bytes_sent, second.pages_sent) == (300, 3)          # 300 -> 600
    assert (last.bytes_sent, last.pages_sent) == (300, 3)              # 600 -> 900
    assert last.remaining_after == 0 and last.downtime_bytes == 250
    assert last.status == "completed" and second.status == "active"
    assert first.remaining_after == 700
    assert "left after round 2" in last.note and "250 bytes" in last.note
    assert t.ended


def test_a_migration_done_in_one_round_keeps_its_counts_from_migrate():
    t = RoundTracker()
    t.query_migrate(answer("completed", 1, 4096, 0, normal=1, duplicate=5), 0.03)
    (r,) = t.rounds
    assert (r.bytes_sent, r.pages_sent, r.zero_pages, r.remaining_after) == (4096, 6, 5, 0)
    assert r.downtime_bytes is None and "left after" not in r.note


def test_a_failed_migration_ends_the_rounds_without_a_last_round_note():
    t = RoundTracker()
    t.query_migrate(answer("active", 1, 100, 900), 0.02)
    t.query_migrate({"status": "failed", "error-desc": "destination gone"}, 0.05)
    (r,) = t.rounds
    assert t.ended and r.status == "failed" and r.remaining_after is None and r.note == ""
    assert r.bytes_sent == 100         # a failed answer has no "ram": the counts stay
    t.query_migrate({"status": "failed"}, 0.07)
    assert t.rounds == (r,)


def test_log_readings_of_a_new_size_start_over():
    t = RoundTracker()
    t.log_read(_bitmap(8, [1, 2]))
    t.log_read(_bitmap(8, [2, 9]))
    t.log_read(_bitmap(16, [100]))        # the log was resized (SET_LOG_BASE again)
    t.log_read(_bitmap(16, [3]))
    t.guest_did(bytes_written=4096, rx_frames=2)
    t.guest_did(tx_frames=1)
    r = t.query_migrate(answer("active", 1, 0, 0), 0.02)
    assert r.logged_pages().tolist() == [3, 100] and r.pages_logged == 2
    assert (r.guest_bytes_written, r.rx_frames, r.tx_frames) == (4096, 2, 1)
    r2 = t.query_migrate(answer("active", 2, 0, 0), 0.04)
    assert r2.pages_logged == 0 and r2.log_bitmap == b"" and r2.guest_bytes_written == 0


def test_summary_is_json_ready_without_the_bitmap(recorded):
    r = replay(recorded["feed"]).rounds[-1]
    s = r.summary()
    assert "log_bitmap" not in s and s["syncs"] == [5, 6, 7]
    json.dumps(s)
