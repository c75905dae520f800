"""Graded exercises: self-checks in the notebook, nbgrader-style assign and grade.

    bind(name, globals())           the learner's ex.q1.check() / .hint() / .solution()
    release_notebook / assign_all   instructor source -> student version
    grade_class                     a class's submissions -> grades.csv + feedback/

The modules ``assign`` and ``grade`` hold the `vhostlab assign` and
`vhostlab grade` commands (``add_arguments(parser)``, ``run(args) -> int``).
The notebooks live in labs/exercises/source (instructor, with solutions) and
labs/exercises/release (what learners get, made by ``vhostlab assign``).

The instructor's tools load on first use: a learner's notebook imports only
the self-checks (nbformat, which they need, takes seconds to import).
"""
from importlib import import_module

from vhostlab.exercises.catalog import EXERCISES, LAB_CHECKS, bind, load
from vhostlab.exercises.checks import (BoundExercise, BoundQuestion, Case, Exercise, Hint,
                                       Mistake, Outcome, Question, Raises, Result, Solution,
                                       fixed)
from vhostlab.exercises.predict import compare_prediction

__all__ = [
    "EXERCISES", "LAB_CHECKS", "bind", "load", "compare_prediction",
    "assign_all", "release_notebook", "NotebookFormatError",
    "grade_class", "Limits", "Row",
    "BoundExercise", "BoundQuestion", "Case", "Exercise", "Hint", "Mistake", "Outcome",
    "Question", "Raises", "Result", "Solution", "fixed",
]

_LAZY = {
    "assign_all": "vhostlab.exercises.assign",
    "release_notebook": "vhostlab.exercises.assign",
    "NotebookFormatError": "vhostlab.exercises.notebook",
    "grade_class": "vhostlab.exercises.grade",
    "Limits": "vhostlab.exercises.grade",
    "Row": "vhostlab.exercises.grade",
}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'vhostlab.exercises' has no attribute {name!r}")
