"""log_base's q3 with a real QEMU: the learner's SET_LOG_BASE in the source back-end of a
live migration between two QEMUs; without QEMU that case is not run (built-in only)."""
from __future__ import annotations

import textwrap

import pytest

from vhostlab.exercises import Outcome, bind, load
from vhostlab.exercises import ex_log_base as lb

# Maps the log privately: every mark the back-end makes stays in its own copy,
# so QEMU's syncs never see the pages the back-end wrote.
PRIVATE_MAP = '''
def set_log_base(fd, area):
    size, offset = int(area.mmap_size), int(area.mmap_offset)
    if size == 0 or size % 8 or offset > os.fstat(fd).st_size \\
            or size > os.fstat(fd).st_size - offset:
        raise ValueError("log does not fit")
    return np.frombuffer(mmap.mmap(fd, size, mmap.MAP_PRIVATE, offset=offset), np.uint8)
'''


def _namespace(*code: str) -> dict:
    ns: dict = {}
    exec(load("log_base").setup, ns)
    for c in code:
        exec(textwrap.dedent(c), ns)
    return ns


def _solutions(skip: str = "") -> list[str]:
    return [q.solution for q in load("log_base").questions if q.name != skip]


def test_reference_migrates_between_real_qemus_without_loss(requires_qemu):
    summary = lb.migrate_with_log_qemu(lb._REF_MAP, requires_qemu)
    assert summary["migration"]["status"] == "completed"
    assert summary["integrity"] == "ok", summary["frames"]
    assert summary["frames"]["sent"] > 0 and summary["frames"]["lost"] == 0
    # the learner's handler answered the source's SET_LOG_BASE (a log was mapped)
    assert summary["vhost_log"]["pages_logged"] > 0


def test_a_private_mapping_loses_frames_with_real_qemu(requires_qemu):
    summary = lb.migrate_with_log_qemu(lb._exec(PRIVATE_MAP), requires_qemu)
    assert summary["integrity"] != "ok"
    assert summary["frames"]["lost"] or summary["frames"]["corrupted"]


def test_q3_runs_the_real_qemu_case(requires_qemu, monkeypatch):
    ran = []
    real = lb.migrate_with_log_qemu
    monkeypatch.setattr(lb, "migrate_with_log_qemu",
                        lambda *a, **k: ran.append(a) or real(*a, **k))
    ns = _namespace(*_solutions())
    ok = bind("log_base", ns).q3.check()
    assert ok.outcome is Outcome.CORRECT, ok.message
    assert [a[0] for a in ran][-1] is ns["set_log_base"]   # the learner's, after the reference
    ns = _namespace(*_solutions(skip="q1"), PRIVATE_MAP)
    bad = bind("log_base", ns).q3.check()
    assert bad.outcome is Outcome.INCORRECT, bad.message


def test_without_qemu_q3_grades_on_the_builtin_front_end_alone(monkeypatch):
    monkeypatch.setattr(lb, "usable_qemu", lambda: None)
    monkeypatch.setattr(lb, "migrate_with_log_qemu",
                        lambda *a, **k: pytest.fail("no QEMU: must not be called"))
    ok = bind("log_base", _namespace(*_solutions())).q3.check()
    assert ok.outcome is Outcome.CORRECT, ok.message
