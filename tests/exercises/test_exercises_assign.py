"""`vhostlab assign`: the committed release is exactly what assign makes,
and assign applies nbgrader's rules (stubs, hidden tests, outputs, metadata)."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

from vhostlab.exercises import assign as assign_mod
from vhostlab.exercises import notebook as nbg
from vhostlab.exercises.assign import assign_all, release_notebook, stale_releases

ROOT = Path(__file__).resolve().parents[2]
SOURCE = ROOT / "labs" / "exercises" / "source"
RELEASE = ROOT / "labs" / "exercises" / "release"
SOURCES = sorted(SOURCE.glob("*/*.ipynb"))


def test_there_are_exercises():
    assert {p.parent.name for p in SOURCES} >= {"vhost_message"}
    assert all(p.stem == p.parent.name for p in SOURCES)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.stem)
def test_release_is_byte_for_byte_what_assign_makes(path, tmp_path):
    assign_all(SOURCE, tmp_path)
    made = (tmp_path / path.relative_to(SOURCE)).read_bytes()
    committed = (RELEASE / path.relative_to(SOURCE)).read_bytes()
    assert made == committed, f"run: vhostlab assign {SOURCE} {RELEASE}"


def test_check_mode_finds_a_stale_release(tmp_path):
    assign_all(SOURCE, tmp_path)
    assert stale_releases(SOURCE, tmp_path) == []
    victim = next(tmp_path.glob("*/*.ipynb"))
    nb = nbg.read(victim)
    nb.cells[0].source += "\nedited"
    nbg.write(nb, victim)
    assert stale_releases(SOURCE, tmp_path) == [str(victim.relative_to(tmp_path))]
    assert assign_mod.main(["--check", str(SOURCE), str(tmp_path)]) == 1
    assert assign_mod.main([str(SOURCE), str(tmp_path)]) == 0
    assert assign_mod.main(["--check", str(SOURCE), str(tmp_path)]) == 0


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.stem)
def test_release_hides_solutions_and_hidden_tests(path):
    source, release = nbg.read(path), nbg.read(RELEASE / path.relative_to(SOURCE))
    assert len(source.cells) == len(release.cells)
    solutions = [c for c in source.cells if nbg.is_solution(c)]
    hidden = [c for c in source.cells if nbg.BEGIN_HIDDEN_TESTS in c.source]
    assert solutions and hidden, "every exercise has answers to write and hidden tests"
    for src, rel in zip(source.cells, release.cells):
        assert rel.metadata == src.metadata and rel.get("id") == src.get("id")
        assert nbg.BEGIN_SOLUTION not in rel.source and nbg.BEGIN_HIDDEN_TESTS not in rel.source
        if rel.cell_type == "code":
            assert rel.outputs == [] and rel.execution_count is None
        if nbg.is_solution(src) and src.cell_type == "code":
            assert "# YOUR CODE HERE\n" in rel.source and "raise NotImplementedError()" in rel.source
        if nbg.is_solution(src) and src.cell_type == "markdown":
            assert rel.source == nbg.TEXT_STUB
        if nbg.BEGIN_HIDDEN_TESTS in src.source:
            hidden_part = src.source.split(nbg.BEGIN_HIDDEN_TESTS)[1].split(nbg.END_HIDDEN_TESTS)[0]
            assert hidden_part.strip() and hidden_part.strip() not in rel.source
        if not nbg.is_solution(src) and nbg.BEGIN_HIDDEN_TESTS not in src.source:
            assert rel.source == src.source


def _cell(kind, source, **meta):
    cell = new_code_cell(source) if kind == "code" else new_markdown_cell(source)
    if meta:
        cell.metadata["nbgrader"] = nbg.nbgrader_meta(**meta)
    return cell


def test_release_rules_on_a_small_notebook():
    code = _cell("code", "def f(x):\n    ### BEGIN SOLUTION\n    return x\n    ### END SOLUTION",
                 grade_id="f", solution=True)
    code.outputs = [new_output("stream", name="stdout", text="hi")]
    code.execution_count = 3
    whole = _cell("code", "answer = 42", grade_id="whole", solution=True)
    text = _cell("markdown", "### BEGIN SOLUTION\nBecause.\n### END SOLUTION",
                 grade_id="why", solution=True, grade=True, points=0)
    test = _cell("code", "assert f(1) == 1\n### BEGIN HIDDEN TESTS\nassert f(2) == 2\n"
                 "### END HIDDEN TESTS", grade_id="t", grade=True, locked=True, points=2)
    source = new_notebook(cells=[code, whole, text, test])
    release = release_notebook(source)
    assert release.cells[0].source == "def f(x):\n    # YOUR CODE HERE\n    raise NotImplementedError()"
    assert release.cells[0].outputs == [] and release.cells[0].execution_count is None
    assert release.cells[1].source == nbg.CODE_STUB
    assert release.cells[2].source == "YOUR ANSWER HERE"
    assert release.cells[3].source == "assert f(1) == 1"
    assert release.cells[3].metadata == test.metadata
    assert source.cells[0].outputs, "the source itself is left alone"


@pytest.mark.parametrize("breakage, words", [
    ("duplicate", "used twice"),
    ("unclosed", "never closed"),
    ("region_outside", "not marked solution"),
    ("hidden_outside", "not marked grade"),
    ("markdown_ungraded", "both grade and solution"),
    ("bad_id", "grade_id"),
    ("bad_points", "points"),
])
def test_assign_refuses_a_broken_source(breakage, words):
    cells = {
        "duplicate": [_cell("code", "x = 1", grade_id="a", solution=True),
                      _cell("code", "y = 1", grade_id="a", solution=True)],
        "unclosed": [_cell("code", "### BEGIN SOLUTION\nx = 1", grade_id="a", solution=True)],
        "region_outside": [_cell("code", "### BEGIN SOLUTION\nx = 1\n### END SOLUTION")],
        "hidden_outside": [_cell("code", "### BEGIN HIDDEN TESTS\nx\n### END HIDDEN TESTS",
                                 grade_id="a", locked=True)],
        "markdown_ungraded": [_cell("markdown", "text", grade_id="a", solution=True)],
        "bad_id": [_cell("code", "x = 1", grade_id="a b", solution=True)],
        "bad_points": [_cell("code", "assert 1", grade_id="t", grade=True, points=1)],
    }[breakage]
    if breakage == "bad_points":
        cells[0].metadata.nbgrader["points"] = "many"
    with pytest.raises(nbg.NotebookFormatError, match=words):
        release_notebook(new_notebook(cells=copy.deepcopy(cells)))
