"""`vhostlab assign SOURCE_DIR RELEASE_DIR`: make the student versions.

What nbgrader's generate_assignment does to a notebook, done with nbformat:
a ``### BEGIN SOLUTION`` ... ``### END SOLUTION`` region becomes
``# YOUR CODE HERE`` / ``raise NotImplementedError()`` (a markdown answer
becomes ``YOUR ANSWER HERE``), a solution cell without a region is replaced
whole, ``### BEGIN HIDDEN TESTS`` ... ``### END HIDDEN TESTS`` regions are
removed, outputs and execution counts are cleared, and every cell keeps its
metadata (the grader finds the cells again by their ``grade_id``).

Layout: ``SOURCE_DIR/<exercise>/*.ipynb`` -> ``RELEASE_DIR/<exercise>/*.ipynb``.
Files next to the notebooks (data, images) are copied as they are.
"""
from __future__ import annotations

import argparse
import copy
import shutil
import sys
from pathlib import Path

from nbformat import NotebookNode

from vhostlab.command import standalone
from vhostlab.exercises import notebook as nbg


def _replace_region(source: str, begin: str, end: str, stub: list[str]) -> tuple[str, bool]:
    """Replace each begin..end region by `stub` (indented like `begin`)."""
    out: list[str] = []
    inside = found = False
    for line in source.split("\n"):
        if line.strip() == begin:
            inside = found = True
            indent = line[: line.find(begin)]
            out.extend(indent + s for s in stub)
        elif line.strip() == end:
            inside = False
        elif not inside:
            out.append(line)
    return "\n".join(out), found


def release_cell(cell: NotebookNode) -> NotebookNode:
    """The student's version of one source cell (a new cell; metadata kept)."""
    cell = copy.deepcopy(cell)
    if nbg.is_solution(cell):
        stub = nbg.CODE_STUB if cell.cell_type == "code" else nbg.TEXT_STUB
        source, found = _replace_region(cell.source, nbg.BEGIN_SOLUTION,
                                        nbg.END_SOLUTION, stub.split("\n"))
        cell.source = source if found else stub
    if nbg.is_grade(cell):
        cell.source, _ = _replace_region(cell.source, nbg.BEGIN_HIDDEN_TESTS,
                                         nbg.END_HIDDEN_TESTS, [])
    if cell.cell_type == "code":
        cell.outputs = []
        cell.execution_count = None
    return cell


def release_notebook(source: NotebookNode, name: str = "notebook") -> NotebookNode:
    """The student's version of a source notebook; raises NotebookFormatError."""
    nbg.validate_source(source, name)
    release = copy.deepcopy(source)
    release.cells = [release_cell(c) for c in source.cells]
    return release


def exercise_dirs(source_dir: Path) -> list[Path]:
    """Every ``<exercise>/`` under SOURCE_DIR that holds a notebook."""
    return sorted(d for d in Path(source_dir).iterdir()
                  if d.is_dir() and any(d.glob("*.ipynb")))


def assign_all(source_dir: str | Path, release_dir: str | Path) -> list[Path]:
    """Write the release of every exercise; return the notebooks written."""
    source_dir, release_dir = Path(source_dir), Path(release_dir)
    written: list[Path] = []
    for exercise in exercise_dirs(source_dir):
        for path in sorted(exercise.rglob("*")):
            if ".ipynb_checkpoints" in path.parts or path.is_dir():
                continue
            target = release_dir / path.relative_to(source_dir)
            target.parent.mkdir(parents=True, exist_ok=True)
            if path.suffix == ".ipynb":
                nbg.write(release_notebook(nbg.read(path), str(path.relative_to(source_dir))),
                          target)
                written.append(target)
            else:
                shutil.copyfile(path, target)
    return written


def stale_releases(source_dir: str | Path, release_dir: str | Path) -> list[str]:
    """Notebooks whose committed release differs from what assign makes."""
    source_dir, release_dir = Path(source_dir), Path(release_dir)
    stale = []
    for exercise in exercise_dirs(source_dir):
        for path in sorted(exercise.glob("*.ipynb")):
            rel = path.relative_to(source_dir)
            want = nbg.dumps(release_notebook(nbg.read(path), str(rel)))
            target = release_dir / rel
            if not target.exists() or target.read_text(encoding="utf-8") != want:
                stale.append(str(rel))
    return stale


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source_dir", metavar="SOURCE_DIR",
                        help="instructor notebooks: SOURCE_DIR/<exercise>/<exercise>.ipynb")
    parser.add_argument("release_dir", metavar="RELEASE_DIR",
                        help="where the student versions go (same layout)")
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 if RELEASE_DIR is not what assign makes")


def run(args: argparse.Namespace) -> int:
    source = Path(args.source_dir)
    if not source.is_dir():
        print(f"vhostlab assign: {source} is not a directory", file=sys.stderr)
        return 2
    try:
        if args.check:
            stale = stale_releases(source, args.release_dir)
            for rel in stale:
                print(f"out of date: {Path(args.release_dir) / rel}")
            return 1 if stale else 0
        for path in assign_all(source, args.release_dir):
            print(f"wrote {path}")
    except nbg.NotebookFormatError as exc:
        print(f"vhostlab assign: {exc}", file=sys.stderr)
        return 1
    return 0


main = standalone("assign", __doc__, add_arguments, run)


if __name__ == "__main__":
    sys.exit(main())
