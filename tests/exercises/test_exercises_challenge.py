"""The challenge tier: EVENT_IDX and MRG_RXBUF decisions run inside a back-end that
serves a real QEMU. The source's answers pass, the release's are not attempted, the
plausible wrong answers (never signal, always signal, num_buffers always 1) lose,
an answer that calls the kit scores 0, and without QEMU nothing passes."""
from __future__ import annotations

import textwrap

import pytest

from vhostlab.exercises import Outcome, bind, load
from vhostlab.exercises import ex_challenge as ch

NEVER = "def should_signal(ring):\n    return False\n"
ALWAYS = "def should_signal(ring):\n    return True\n"
ONE_BUFFER = '''
def place_frame(frame_len, hdr_len, buffer_sizes):
    left, lengths = hdr_len + frame_len, []
    for size in buffer_sizes:
        if left == 0:
            break
        lengths.append(min(size, left))
        left -= lengths[-1]
    return None if left else (1, lengths)
'''
DELEGATING = '''
from vhostlab.ring.layout import vring_need_event_py
def vring_need_event(event_idx, new_idx, old_idx):
    return vring_need_event_py(event_idx, new_idx, old_idx)
'''


def _ns(*code: str) -> dict:
    ns: dict = {}
    exec(load("challenge").setup, ns)
    for c in code:
        exec(textwrap.dedent(c), ns)
    return ns


def _solutions() -> list[str]:
    return [q.solution for q in load("challenge").questions]


def test_solutions_pass_against_a_real_qemu(requires_qemu):
    ex = bind("challenge", _ns(*_solutions()))
    for q in (ex.q1, ex.q2):
        result = q.check()
        assert result.outcome is Outcome.CORRECT, result.message


def test_the_reference_decisions_on_a_real_qemu_suppress_and_deliver(requires_qemu):
    ns = _ns(*_solutions())
    out = ch.run_event_idx(ns["should_signal"], qemu=requires_qemu)
    # Every frame arrives; a stalled round (no interrupt seen in 4 s) happened once
    # under CI load on QEMU 5.2 with every decision right, so it is not asserted:
    # the decisions are, against the reference.
    assert out["received"] == out["sent"]
    assert 0 < out["reference_calls"] < out["decisions"]   # EVENT_IDX suppressed some
    assert out["missed"] == out["extra"] == 0
    mrg = ch.run_mrg_rxbuf(ns["place_frame"], qemu=requires_qemu)
    assert mrg == {"sent": len(ch.MRG_SIZES), "received": len(ch.MRG_SIZES),
                   "corrupted": 0, "guest_error": None, "errors": []}


def test_never_signalling_stalls_the_guest(requires_qemu):
    out = ch.run_event_idx(_ns(NEVER)["should_signal"], qemu=requires_qemu)
    assert out["stalled"] == out["rounds"] and out["calls"] == 0 and out["missed"] > 0
    ex = bind("challenge", _ns(*_solutions(), NEVER))
    result = ex.q1.check()
    assert result.outcome is Outcome.INCORRECT


def test_always_signalling_makes_more_calls_than_the_reference(requires_qemu):
    out = ch.run_event_idx(_ns(ALWAYS)["should_signal"], qemu=requires_qemu)
    assert out["calls"] > out["reference_calls"] and out["extra"] > 0 and not out["stalled"]
    # past the small cases too: the real QEMU case alone tells it apart
    ns = _ns(*_solutions())
    got = ch._run_signal((ns["vring_need_event"], _ns(ALWAYS)["should_signal"]), ("qemu",))
    assert got[0] == "wrong" and got[2] > 0
    assert "signalled" in ch._problem_a_says(got, None, ("qemu",))


def test_a_wrong_num_buffers_corrupts_frames_in_the_guest(requires_qemu):
    place = _ns(ONE_BUFFER)["place_frame"]
    out = ch.run_mrg_rxbuf(place, qemu=requires_qemu)
    assert out["corrupted"] > 0 or out["guest_error"]
    got = ch._run_place((place,), ("qemu",))
    assert got[0] == "corrupted"
    result = bind("challenge", _ns(*_solutions()[:1], ONE_BUFFER)).q2.check()
    assert result.outcome is Outcome.INCORRECT and "num_buffers" in result.message


def test_delegating_to_the_kit_scores_zero():
    ns = _ns(*_solutions(), DELEGATING)
    result = bind("challenge", ns).q1.check()
    assert result.outcome is Outcome.INCORRECT
    assert "vring_need_event_py" in result.message


def test_stubs_are_not_attempted():
    ns = _ns("def should_signal(ring):\n    raise NotImplementedError()\n",
             "def vring_need_event(e, n, o):\n    raise NotImplementedError()\n",
             "def place_frame(f, h, s):\n    raise NotImplementedError()\n")
    ex = bind("challenge", ns)
    assert ex.q1.check().outcome is Outcome.NOT_ATTEMPTED
    assert ex.q2.check().outcome is Outcome.NOT_ATTEMPTED


def test_without_qemu_nothing_passes(monkeypatch):
    monkeypatch.setattr(ch, "usable_qemu", lambda: None)
    ex = bind("challenge", _ns(*_solutions()))
    for q in (ex.q1, ex.q2):
        result = q.check()
        assert result.outcome is Outcome.INCORRECT
        assert "needs a real QEMU" in result.message
    with pytest.raises(RuntimeError, match="needs a real QEMU"):
        ch.needs_qemu()


def test_small_cases_name_the_mistake():
    ns = _ns(*_solutions(), "def vring_need_event(e, n, o):\n    return o <= e < n\n")
    result = bind("challenge", ns).q1.check()
    assert result.outcome is Outcome.INCORRECT and "0xFFFF" in result.message
