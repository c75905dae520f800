"""nbgrader's cell format, read and written with nbformat alone.

A cell takes part in grading through ``cell.metadata.nbgrader`` (schema
version 3), exactly as nbgrader writes it:

    solution  the learner writes this cell      (``### BEGIN SOLUTION`` region)
    grade     the cell earns ``points``          (a test cell, or a markdown answer)
    locked    the learner must not change it    (set-up and test cells)
    grade_id  the cell's name, unique in the notebook; the grader matches
              a submission to its source by it

The kit reads and writes these itself so that nothing here needs nbgrader
installed; nbgrader accepts the same notebooks (a test holds that).
"""
from __future__ import annotations

from ..errors import VhostlabError

import re
from pathlib import Path

import nbformat
from nbformat import NotebookNode

SCHEMA_VERSION = 3
NB_VERSION = 4

BEGIN_SOLUTION = "### BEGIN SOLUTION"
END_SOLUTION = "### END SOLUTION"
BEGIN_HIDDEN_TESTS = "### BEGIN HIDDEN TESTS"
END_HIDDEN_TESTS = "### END HIDDEN TESTS"
CODE_STUB = "# YOUR CODE HERE\nraise NotImplementedError()"
TEXT_STUB = "YOUR ANSWER HERE"

GRADE_ID_RE = re.compile(r"^[a-zA-Z0-9_\-]+$")


class NotebookFormatError(VhostlabError, ValueError):
    """A source notebook breaks nbgrader's rules (named cell, rule, value)."""


def meta(cell: NotebookNode) -> dict:
    """The cell's ``nbgrader`` metadata, or an empty dict."""
    return cell.get("metadata", {}).get("nbgrader", {}) or {}


def grade_id(cell: NotebookNode) -> str | None:
    return meta(cell).get("grade_id")


def is_solution(cell: NotebookNode) -> bool:
    return bool(meta(cell).get("solution"))


def is_grade(cell: NotebookNode) -> bool:
    return bool(meta(cell).get("grade"))


def points(cell: NotebookNode) -> float:
    return float(meta(cell).get("points", 0) or 0)


def nbgrader_meta(*, grade_id: str, grade: bool = False, solution: bool = False,
                  locked: bool = False, points: float | None = None) -> dict:
    """Metadata for one cell in nbgrader's schema version 3."""
    m = {"grade": grade, "grade_id": grade_id, "locked": locked,
         "schema_version": SCHEMA_VERSION, "solution": solution}
    if grade:
        m["points"] = points if points is not None else 1
    return m


def read(path: str | Path) -> NotebookNode:
    return nbformat.read(str(path), as_version=NB_VERSION)


def reads(data: bytes | str) -> NotebookNode:
    """A notebook from its file's bytes (a grading task carries them by value)."""
    text = data.decode("utf-8") if isinstance(data, bytes) else data
    return nbformat.reads(text, as_version=NB_VERSION)


def dumps(nb: NotebookNode) -> str:
    """The notebook in nbformat's canonical layout (what `write` puts on disk)."""
    text = nbformat.writes(nb)
    return text if text.endswith("\n") else text + "\n"


def write(nb: NotebookNode, path: str | Path) -> None:
    """Write in nbformat's canonical layout, so a rewrite changes no byte."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dumps(nb), encoding="utf-8")


def validate_source(nb: NotebookNode, name: str = "notebook") -> None:
    """Check nbgrader's rules on a source notebook; raise NotebookFormatError.

    The rules are nbgrader's own: valid and unique grade ids, numeric points
    on grade cells, markdown answers both grade and solution, solution and
    hidden-test regions only in cells marked for them, regions closed.
    """
    seen: set[str] = set()
    for index, cell in enumerate(nb.cells):
        m = meta(cell)
        where = f"{name}: cell {index}"
        if m.get("grade") or m.get("solution"):
            gid = m.get("grade_id", "")
            if not GRADE_ID_RE.match(gid or ""):
                raise NotebookFormatError(f"{where}: grade_id {gid!r} is not [a-zA-Z0-9_-]+")
            if gid in seen:
                raise NotebookFormatError(f"{where}: grade_id {gid!r} is used twice")
            seen.add(gid)
        if m.get("grade"):
            try:
                float(m.get("points", ""))
            except (TypeError, ValueError):
                raise NotebookFormatError(
                    f"{where}: points {m.get('points')!r} is not a number") from None
        if cell.cell_type == "markdown" and bool(m.get("grade")) != bool(m.get("solution")):
            raise NotebookFormatError(
                f"{where}: a markdown answer must be both grade and solution")
        _check_regions(cell, where)


def _check_regions(cell: NotebookNode, where: str) -> None:
    lines = [line.strip() for line in cell.source.split("\n")]
    for begin, end, allowed, what in (
            (BEGIN_SOLUTION, END_SOLUTION, is_solution(cell), "solution"),
            (BEGIN_HIDDEN_TESTS, END_HIDDEN_TESTS, is_grade(cell), "grade")):
        depth = 0
        for line in lines:
            if line == begin:
                if depth:
                    raise NotebookFormatError(f"{where}: nested {begin!r}")
                depth = 1
            elif line == end:
                if not depth:
                    raise NotebookFormatError(f"{where}: {end!r} without {begin!r}")
                depth = 0
        if depth:
            raise NotebookFormatError(f"{where}: {begin!r} is never closed")
        if begin in lines and not allowed:
            raise NotebookFormatError(f"{where}: {begin!r} in a cell not marked {what}")
