"""Answers must be the learner's own; broken_migration differs per student; the
log_base checks catch a non-atomic sync, a looping one and a wrapping bound."""
from __future__ import annotations

import textwrap

import pytest

from vhostlab.exercises import bind, load
from vhostlab.exercises import ex_broken_migration as bm
from vhostlab.exercises.checks import Outcome
from vhostlab.exercises.ownwork import delegations


def _ns(name: str, *code: str) -> dict:
    ns: dict = {}
    exec(load(name).setup.replace("ex = bind", "_ = bind"), ns)
    for c in code:
        exec(textwrap.dedent(c), ns)
    return ns


def test_own_code_reaches_nothing_of_the_kit():
    for name in ("vhost_message", "descriptor_chain", "dirty_log", "vring_base", "log_base"):
        ex = load(name)
        ns = _ns(name, *(q.solution for q in ex.questions))
        for q in ex.questions:
            for t in q.targets:
                if callable(ns.get(t)):
                    assert delegations(ns[t], q.own_work or ()) == [], (name, t)


@pytest.mark.parametrize("code, reached", [
    ("def f(d):\n    return tuple(peek_header(d))", "vhostlab.protocol.message.peek_header"),
    ("import vhostlab\ndef f(d):\n    return vhostlab.protocol.parse_message(d)",
     "vhostlab.protocol.message.parse_message"),
    ("def f(d):\n    import vhostlab.protocol as p\n    return p.peek_header(d)",
     "vhostlab.protocol"),
    ("def f(d):\n    g = lambda x: peek_header(x)\n    return g(d)",
     "vhostlab.protocol.message.peek_header"),
    ("P = peek_header\ndef f(d, read=P):\n    return read(d)",
     "vhostlab.protocol.message.peek_header"),
    ("def helper(d):\n    return peek_header(d)\ndef f(d):\n    return helper(d)",
     "vhostlab.protocol.message.peek_header"),
])
def test_delegation_is_found_however_it_is_spelled(code, reached):
    ns = {"peek_header": __import__("vhostlab.protocol", fromlist=["x"]).peek_header}
    exec(code, ns)
    found = delegations(ns["f"])
    assert found and found[0].qualname.startswith(reached.rsplit(".", 1)[0]), found


def test_constants_enums_and_the_standard_library_are_not_delegation():
    ns = _ns("vhost_message", load("vhost_message").questions[0].solution)
    assert delegations(ns["parse_header"]) == []
    ns["g"] = eval("lambda d: Request(1) in VRING_STATE_REQUESTS and HEADER_SIZE", ns)
    assert delegations(ns["g"]) == []


def test_a_delegating_answer_is_incorrect_and_says_why():
    ns = _ns("vhost_message", "from vhostlab.protocol import peek_header\n"
             "def parse_header(data):\n    return tuple(peek_header(data))")
    result = bind("vhost_message", ns).q1.check()
    assert result.outcome is Outcome.INCORRECT
    assert "peek_header" in result.message and "scores 0" in result.message


def test_no_setup_cell_imports_a_reference_answer():
    from vhostlab.exercises.catalog import EXERCISES
    for name in EXERCISES:
        ns = _ns(name)
        offered = {k: v for k, v in ns.items() if not k.startswith("_")}
        for key, value in offered.items():
            qual = getattr(value, "__qualname__", "")
            assert qual not in ("peek_header", "parse_message", "vhost_log_write",
                                "vhost_log_write_py", "log_used", "log_used_py",
                                "vhost_dev_sync_region", "vhost_dev_sync_region_py"), (name, key)


def test_the_log_sync_race_catches_read_then_clear_and_looping_answers():
    from dataclasses import replace
    ex = load("log_base")
    race = next(q for q in ex.questions if q.name == "q2_race")
    ns = _ns("log_base", """
        def vhost_log_sync(log64):
            out = []
            for w in range(len(log64)):
                bits = int(log64[w]); log64[w] = 0
                out += [w * 64 + b for b in range(64) if bits >> b & 1]
            return out""")
    assert race.check(ns).outcome is Outcome.INCORRECT
    loops = _ns("log_base", "def vhost_log_sync(log64):\n    while True:\n        pass")
    result = replace(race, seconds=1.0).check(loops)
    assert result.outcome is Outcome.INCORRECT and "does it loop?" in result.message


def _students_with_different_faults() -> tuple[str, str]:
    names = [f"student{i}" for i in range(50)]
    first = names[0]
    second = next(n for n in names if bm.fault_for(n) != bm.fault_for(first))
    return first, second


def test_two_students_get_different_faults_and_each_is_graded_against_their_own(monkeypatch):
    a, b = _students_with_different_faults()
    runs = {s: bm.broken_run(s) for s in (a, b)}
    assert runs[a].fault != runs[b].fault
    assert all(r.summary["integrity"] != "ok" for r in runs.values())
    answers = {s: (bm._frames(r), sorted(bm._bad_pages(r)), bm._wrong_message(r))
               for s, r in runs.items()}
    assert answers[a] != answers[b]
    for me, other in ((a, b), (b, a)):
        monkeypatch.setenv("VHOSTLAB_STUDENT", me)
        frames, pages, seq = answers[me]
        ns = {"lost_frames": frames, "bad_page": pages[0] if pages else None,
              "first_wrong_message": seq}
        for q in ("q1", "q2", "q3"):
            assert getattr(bind("broken_migration", ns), q).check(), (me, q)
        o_frames, o_pages, o_seq = answers[other]
        theirs = {"lost_frames": o_frames, "bad_page": o_pages[0] if o_pages else None,
                  "first_wrong_message": o_seq}
        wrong = [q for q in ("q1", "q2", "q3")
                 if not getattr(bind("broken_migration", theirs), q).check()]
        assert wrong, f"{me} passed every question with {other}'s answers"


def test_every_fault_breaks_the_migration_with_evidence():
    for fault in bm.FAULTS:
        student = next(f"s{i}" for i in range(500) if bm.fault_for(f"s{i}") == fault)
        run = bm.broken_run(student)
        assert run.fault == fault and run.summary["integrity"] != "ok", fault
        assert bm._frames(run), fault
        expects_message = fault in ("wrong_vring_base", "f_log_not_sent")
        assert (bm._wrong_message(run) is not None) == expects_message, fault


def test_check_reveals_the_answer_only_after_the_instructors_number(monkeypatch):
    monkeypatch.setenv("VHOSTLAB_STUDENT", "student0")
    bm._TRIES.clear()
    ns = {"lost_frames": ["RX #99999"]}
    monkeypatch.setenv("VHOSTLAB_REVEAL_AFTER", "3")
    messages = [bind("broken_migration", ns).q1.check().message for _ in range(3)]
    assert not any("the answer for your run" in m for m in messages[:2])
    assert "the answer for your run" in messages[2]
    assert repr(bm._frames(bm.broken_run("student0"))[0]) in messages[2]
    bm._TRIES.clear()
    monkeypatch.setenv("VHOSTLAB_REVEAL_AFTER", "0")
    assert not any("the answer for your run" in bind("broken_migration", ns).q1.check().message
                   for _ in range(5))


def test_student_id_comes_from_the_grader_or_nbgrader_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("VHOSTLAB_STUDENT", "ada")
    assert bm.student_id() == "ada"
    monkeypatch.delenv("VHOSTLAB_STUDENT")
    folder = tmp_path / "autograded" / "grace" / "broken_migration"
    folder.mkdir(parents=True)
    monkeypatch.chdir(folder)
    assert bm.student_id() == "grace"
