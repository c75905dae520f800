"""The end-of-lab self-checks: each question's solution passes, a known-wrong answer
fails with a message that teaches, nothing written is 'not attempted'; and the
prediction comparer answers all three ways without raising."""
from __future__ import annotations

import textwrap

import pytest

from vhostlab.exercises import LAB_CHECKS, Outcome, bind, compare_prediction, load

# (lab, question) -> a wrong answer a learner might write, and a word the message must say
WRONG = {
    ("lab00", "q1"): ('only_explained = {"inflight", "tcg"}', "really runs"),
    ("lab00", "q2"): ('def stop_sequence(v):\n    return ("GET_VRING_BASE", "SET_STATUS 0")',
                      "SET_STATUS"),
    ("lab01", "q1"): ("VHOST_GET_VRING_BASE = (1 << 30) | (8 << 16) | (0xAF << 8) | 0x12",
                      "_IOWR"),
    ("lab01", "q2"): ("VHOST_SET_LOG_BASE = (1 << 30) | (4 << 16) | (0xAF << 8) | 0x04",
                      "8 bytes"),
    ("lab01", "q3"): ('import struct\ndef set_vring_num_bytes(i, n):\n'
                      '    return struct.pack("<II", i, n)', "header"),
    ("lab02", "q1"): ("import struct\ndef reply_header(r, n):\n"
                      "    return struct.pack('<III', r, 0xd, n)", "0x5"),
    ("lab02", "q2"): ('blocker_function = "vhost_dev_init"', "VHOST_F_LOG_ALL"),
    ("lab02", "q3"): ("def expects_reply(r, ack, need, shmfd):\n"
                      "    return r.startswith('GET_') or (ack and need)", "SET_LOG_BASE"),
    ("lab06", "q1"): ("def log_bytes(ram):\n    return ram // 4096", "bit"),
    ("lab06", "q2"): ('logged = {"RX buffers", "TX buffers", "RX used ring", "TX used ring"}',
                      "only reads"),
    ("lab06", "q3"): ('log_base_sender = "vhost_dev_start"', "already on"),
    ("lab07", "q1"): ("def log_put_syncs(refcnt):\n    return True", "shared"),
    ("lab07", "q2"): ('lost_pages = "A"', "earlier syncs"),
    ("lab03", "q1"): ("def gpa_to_offset(regions, gpa, length):\n    return gpa", "GPA itself"),
    ("lab03", "q2"): ("def mem_table_payload_size(n):\n    return 32 * n", "nregions"),
    ("lab04", "q1"): ("def used_offset(num):\n    return 16 * num + 6 + 2 * num", "4096"),
    ("lab04", "q2"): ("def queue_size_ok(num):\n    return num & (num - 1) == 0", "0"),
    ("lab04", "q3"): ("def kick_payload(i, polling):\n    return i | (0x80 if polling else 0)",
                      "bit 8"),
    ("lab05", "q1"): ("def mark_pages(bitmap, gpa, length):\n"
                      "    bitmap[(gpa // 4096) // 8] |= 1 << ((gpa // 4096) % 8)", "page"),
    ("lab05", "q2"): ('loses_a_mark = "A"', "nothing lost"),
    ("lab08", "q1"): ('local_ops = {"vhost_get_vq_index", "vhost_net_set_backend"}',
                      "vhost_net_set_backend"),
    ("lab08", "q2"): ("def sends_rarp(guest_announce, rarp):\n    return rarp", "GUEST_ANNOUNCE"),
    ("lab08", "q3"): ('mtu_caller = "vhost_net_init"', "vhost_net_init"),
    ("lab09", "q1"): ("def threshold_pages(bw, ms):\n    return bw * ms / 4096", "milliseconds"),
    ("lab09", "q2"): ("def switches_over(pages, bw, ms):\n    return True", "incorrect"),
    ("lab09", "q3"): ('missing_field = "total-time"', "total-time"),
}

QUESTIONS = [(lab, q.name) for lab in LAB_CHECKS for q in load(lab).questions]


def _namespace(*sources: str) -> dict:
    ns: dict = {}
    for src in sources:
        exec(textwrap.dedent(src), ns)
    return ns


def _question(lab: str, name: str):
    return next(q for q in load(lab).questions if q.name == name)


def test_every_question_has_a_wrong_answer_here():
    assert set(QUESTIONS) == set(WRONG)


@pytest.mark.parametrize("lab,name", QUESTIONS)
def test_the_solution_passes(lab, name):
    ns = _namespace(_question(lab, name).solution)
    result = getattr(bind(lab, ns), name).check()
    assert result.outcome is Outcome.CORRECT, result.message


@pytest.mark.parametrize("lab,name", QUESTIONS)
def test_a_known_wrong_answer_fails_and_teaches(lab, name):
    code, word = WRONG[(lab, name)]
    result = getattr(bind(lab, _namespace(code)), name).check()
    assert result.outcome is Outcome.INCORRECT, result.message
    assert word.lower() in (str(result)).lower(), result.message
    solution = _question(lab, name).solution
    assert solution not in result.message       # the answer is not given away


@pytest.mark.parametrize("lab,name", QUESTIONS)
def test_nothing_written_is_not_attempted(lab, name):
    result = getattr(bind(lab, {}), name).check()
    assert result.outcome is Outcome.NOT_ATTEMPTED
    assert "write it in the cell above" in result.message


def test_a_stub_that_raises_is_not_attempted():
    ns = _namespace("def used_offset(num):\n    raise NotImplementedError")
    assert bind("lab04", ns).q1.check().outcome is Outcome.NOT_ATTEMPTED


def test_hints_and_solutions_are_there():
    for lab, name in QUESTIONS:
        q = getattr(bind(lab, {}), name)
        assert q.hint().number == 1 and q.question.hints
        assert q.solution().allowed


def test_compare_prediction_three_ways():
    untouched = compare_prediction(None, 3, explain="one fd per region.")
    assert untouched.outcome is Outcome.NOT_ATTEMPTED
    assert str(untouched).endswith("you did not predict; the answer was 3. one fd per region.")
    assert compare_prediction(3, 3).outcome is Outcome.CORRECT
    wrong = compare_prediction(1, 3)
    assert wrong.outcome is Outcome.INCORRECT and "you predicted 1" in wrong.message
    assert compare_prediction(" b ", "B").outcome is Outcome.CORRECT
    near = compare_prediction(90, 100, same=lambda p, a: a / 3 <= p <= a * 3)
    assert near.outcome is Outcome.CORRECT
    assert compare_prediction({2, 1}, {1, 2}).message.startswith("you predicted {1, 2}")
    assert compare_prediction("x", 5, same=lambda p, a: p > a).outcome is Outcome.INCORRECT
