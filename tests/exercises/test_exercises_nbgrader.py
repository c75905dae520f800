"""nbgrader itself accepts the instructor notebooks, and makes the same
student version as `vhostlab assign` (needs the optional `[nbgrader]` extra)."""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

from vhostlab.exercises import notebook as nbg
from vhostlab.exercises.assign import release_notebook
from vhostlab.exercises.ex_challenge import usable_qemu as _usable_qemu

nbgrader = pytest.importorskip(
    "nbgrader", reason="nbgrader is not installed; pip install -e '.[nbgrader]' to run this")

ROOT = Path(__file__).resolve().parents[2]
SOURCE = ROOT / "labs" / "exercises" / "source"
READY = sorted(p.parent.name for p in SOURCE.glob("*/*.ipynb"))
# the challenge is graded against a real QEMU only (test_exercises_challenge covers
# the rest, a missing QEMU included)
READY = [n for n in READY if n != "challenge" or _usable_qemu()]


@pytest.mark.parametrize("name", READY)
def test_nbgrader_generate_assignment_accepts_the_source(name, tmp_path, monkeypatch):
    # nbgrader runs its gradebook migrations with the `alembic` command, which
    # sits beside this interpreter, not necessarily on PATH.
    monkeypatch.setenv("PATH", os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    from nbgrader.apps import NbGraderAPI
    from traitlets.config import Config

    shutil.copytree(SOURCE / name, tmp_path / "source" / name)
    config = Config()
    config.CourseDirectory.root = str(tmp_path)
    config.CourseDirectory.db_url = f"sqlite:///{tmp_path / 'gradebook.db'}"
    api = NbGraderAPI(config=config)
    generate = getattr(api, "generate_assignment", None) or api.assign
    result = generate(name, force=True)
    assert result["success"], result.get("error", "") + result.get("log", "")
    theirs = nbg.read(tmp_path / "release" / name / f"{name}.ipynb")
    ours = release_notebook(nbg.read(SOURCE / name / f"{name}.ipynb"))
    assert [(c.cell_type, c.source) for c in theirs.cells] == \
        [(c.cell_type, c.source) for c in ours.cells]
    for t, o in zip(theirs.cells, ours.cells):
        assert t.metadata.get("nbgrader", {}).get("grade_id") == nbg.grade_id(o)
