"""The soak campaign, short: about 20,000 fuzzed messages and 20 fault cycles against
a `vhostlab serve` subprocess (`make soak` runs 10^6 and 200; the README has its figures)."""
from __future__ import annotations

from vhostlab.backend.soak import FAULTS, run


def test_short_soak_finds_no_crash_hang_unanswered_request_or_leak():
    result = run(messages=20_000, cycles=20, seed=15)
    assert result["messages"] >= 20_000 and result["cycles"] == 20, result
    assert len(FAULTS) * 2 <= 20                      # every kind of fault ran at least twice
    for key in ("crashes", "hangs", "unanswered", "wrong_replies", "unnamed_closes",
                "fd_leak", "mapping_leak"):
        assert result[key] == 0, result
    assert result["rss_growth_mib"] < 64, result
