"""Every instructor notebook runs top to bottom in a real kernel, learner-only
cells (self-checks, demos) included, without a single error."""
from __future__ import annotations

import copy
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from vhostlab.exercises import notebook as nbg
from vhostlab.exercises.ex_challenge import usable_qemu
from vhostlab.exercises.grade import Limits, run_notebook
from vhostlab.exercises.runner import SKIP_TAG

ROOT = Path(__file__).resolve().parents[2]
SOURCE = ROOT / "labs" / "exercises" / "source"
# the challenge runs against a real QEMU only (test_exercises_challenge covers the rest)
SOURCES = [p for p in sorted(SOURCE.glob("*/*.ipynb")) if p.stem != "challenge" or usable_qemu()]


def _run_everything(path: Path) -> list[str]:
    """Problems found running every code cell of `path` (none: an empty list)."""
    nb = copy.deepcopy(nbg.read(path))
    skipped = 0
    for cell in nb.cells:
        tags = cell.metadata.get("tags", [])
        if SKIP_TAG in tags:
            skipped += 1
            cell.metadata["tags"] = [t for t in tags if t != SKIP_TAG]
    problems = [] if skipped else ["no cell carries the grader-skip tag"]
    records, trouble = run_notebook(nb, Limits(cell_timeout=120, notebook_timeout=300))
    if trouble:
        problems.append(trouble)
    cells = [r for r in records if r.get("event") == "cell"]
    code = sum(c.cell_type == "code" and c.source.strip() != "" for c in nb.cells)
    if len(cells) != code:
        problems.append(f"{len(cells)} of {code} code cells ran")
    problems += [f"cell {r['index']}: {r['ename']}: {r['evalue']}" for r in cells
                 if r["status"] != "ok"]
    return problems


def test_instructor_notebooks_run_clean():
    assert len(SOURCES) == (7 if usable_qemu() else 6)
    with ThreadPoolExecutor(max_workers=2) as pool:
        found = dict(zip((p.stem for p in SOURCES), pool.map(_run_everything, SOURCES)))
    assert found == {name: [] for name in found}
