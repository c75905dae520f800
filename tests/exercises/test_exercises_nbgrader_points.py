"""nbgrader's own generate_assignment, autograde and export give a class of
submissions (right, wrong, delegating, released, per-student faults) exactly
the points `vhostlab grade` gives them. Needs the `[nbgrader]` extra; runs
every notebook twice, so it takes a few minutes."""
from __future__ import annotations

import csv
import os
import shutil
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from vhostlab.exercises import ex_broken_migration as bm
from vhostlab.exercises import notebook as nbg
from vhostlab.exercises.grade import Limits, grade_class

pytest.importorskip("nbgrader", reason="nbgrader is not installed; pip install -e '.[nbgrader]'")

ROOT = Path(__file__).resolve().parents[2]
SOURCE = ROOT / "labs" / "exercises" / "source"
RELEASE = ROOT / "labs" / "exercises" / "release"
ASSIGNMENTS = ("vhost_message", "log_base", "broken_migration")


def _source(name):
    return nbg.read(SOURCE / name / f"{name}.ipynb")


def _with(name, **cells):
    nb = _source(name)
    for cell in nb.cells:
        if nbg.grade_id(cell) in cells:
            cell.source = cells.pop(nbg.grade_id(cell))
    assert not cells
    return nb


def _students_with_different_faults():
    names = [f"s{i:02d}" for i in range(60)]
    a = names[0]
    return a, next(n for n in names if bm.fault_for(n) != bm.fault_for(a))


def _class():
    """student -> {assignment: notebook}."""
    a, b = _students_with_different_faults()
    # b hands in a's answers, computed in a's notebook and pasted in as values
    run_a = bm.broken_run(a)
    pages = sorted(bm._bad_pages(run_a))
    pasted = dict(
        lost_frames=f"lost_frames = {bm._frames(run_a)!r}",
        bad_page=f"bad_page = {pages[0] if pages else None!r}",
        first_wrong_message=f"first_wrong_message = {bm._wrong_message(run_a)!r}")
    return {
        a: {n: _source(n) for n in ASSIGNMENTS},                 # right, own fault
        b: {"broken_migration": _with("broken_migration", **pasted),
            "vhost_message": _with("vhost_message", parse_header=(
                "from vhostlab.protocol import peek_header\n"
                "def parse_header(data):\n    return tuple(peek_header(data))"))},
        "fresh": {n: nbg.read(RELEASE / n / f"{n}.ipynb") for n in ASSIGNMENTS},
        "racy": {"log_base": _with("log_base", vhost_log_sync=(
            "def vhost_log_sync(log64):\n    pages = []\n"
            "    for w in range(len(log64)):\n        bits = int(log64[w])\n"
            "        log64[w] = 0\n"
            "        pages += [w * 64 + b for b in range(64) if bits >> b & 1]\n"
            "    return pages"))},
    }


def _nbgrader_points(course: Path, students) -> dict:
    from nbgrader.apps import NbGraderAPI
    from traitlets.config import Config

    config = Config()
    config.CourseDirectory.root = str(course)
    config.CourseDirectory.db_url = f"sqlite:///{course / 'gradebook.db'}"
    config.Exchange.root = str(course / "exchange")
    config.ExecutePreprocessor.timeout = 300
    api = NbGraderAPI(config=config)
    from nbgrader.api import Gradebook
    with Gradebook(config.CourseDirectory.db_url) as gb:
        for s in students:
            gb.update_or_create_student(s)
    for name in ASSIGNMENTS:
        result = api.generate_assignment(name, force=True)
        assert result["success"], result.get("error", "") + result.get("log", "")
    for s in students:
        for name in ASSIGNMENTS:
            if (course / "submitted" / s / name).is_dir():
                result = api.autograde(name, s, force=True)
                assert result["success"], result.get("error", "") + result.get("log", "")
    from nbgrader.apps import NbGraderApp  # noqa: F401 (export goes through the app)
    from nbgrader.plugins import CsvExportPlugin
    out = course / "grades.csv"
    with Gradebook(config.CourseDirectory.db_url) as gb:
        CsvExportPlugin(to=str(out)).export(gb)
    points = {}
    with open(out) as f:
        for row in csv.DictReader(f):
            if (course / "submitted" / row["student_id"] / row["assignment"]).is_dir():
                points[(row["student_id"], row["assignment"])] = float(row["score"])
    return points


def test_nbgrader_and_vhostlab_grade_give_the_same_points(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    monkeypatch.delenv("VHOSTLAB_STUDENT", raising=False)
    course = tmp_path / "course"
    for name in ASSIGNMENTS:
        shutil.copytree(SOURCE / name, course / "source" / name)
    klass = _class()
    for student, books in klass.items():
        for name, nb in books.items():
            nbg.write(nb, course / "submitted" / student / name / f"{name}.ipynb")
    # vhostlab grade reads the same submitted/ folder before nbgrader touches it
    copy = tmp_path / "submitted"
    shutil.copytree(course / "submitted", copy)
    rows = grade_class(copy, SOURCE, tmp_path / "ours" / "grades.csv",
                       Limits(cell_timeout=180, notebook_timeout=600), jobs=1,
                       only=set(ASSIGNMENTS))
    ours: dict = defaultdict(float)
    for r in rows:
        if r.status != "not_submitted":
            ours[(r.student, r.exercise)] += r.points
    theirs = _nbgrader_points(course, sorted(klass))
    assert theirs == dict(ours), (theirs, dict(ours))

    a, b = _students_with_different_faults()
    full = {n: sum(nbg.points(c) for c in _source(n).cells if nbg.is_grade(c)
                   and c.cell_type == "code") for n in ASSIGNMENTS}
    assert all(ours[(a, n)] == full[n] for n in ASSIGNMENTS)      # right, own fault
    assert all(ours[("fresh", n)] == 0 for n in ASSIGNMENTS)
    assert ours[(b, "vhost_message")] == full["vhost_message"] - 2  # Task 1 delegated
    assert ours[(b, "broken_migration")] < full["broken_migration"]  # a's answers, b's fault
    assert ours[("racy", "log_base")] == full["log_base"] - 2
