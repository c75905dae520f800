"""The exercises the kit ships, by name, and `bind` for notebooks.

Each exercise lives in its own module (``ex_<name>.py``) that declares its
questions as data (checks.Question); modules load on first use, so a
notebook pays only for the layers its exercise touches.
"""
from __future__ import annotations

import importlib
from typing import Any, Mapping

from vhostlab.exercises.checks import BoundExercise, Exercise

__all__ = ["EXERCISES", "LAB_CHECKS", "load", "bind"]

EXERCISES = {
    "vhost_message": "vhostlab.exercises.ex_vhost_message",
    "descriptor_chain": "vhostlab.exercises.ex_descriptor_chain",
    "dirty_log": "vhostlab.exercises.ex_dirty_log",
    "vring_base": "vhostlab.exercises.ex_vring_base",
    "log_base": "vhostlab.exercises.ex_log_base",
    "broken_migration": "vhostlab.exercises.ex_broken_migration",
    "challenge": "vhostlab.exercises.ex_challenge",
}


# The self-checks at the end of each lab notebook (not graded): name -> (module, attribute).
LAB_CHECKS = {
    "lab00": ("vhostlab.exercises.lab_checks_a", "LAB00"),
    "lab01": ("vhostlab.exercises.lab_checks_a", "LAB01"),
    "lab02": ("vhostlab.exercises.lab_checks_c", "LAB02"),
    "lab03": ("vhostlab.exercises.lab_checks_a", "LAB03"),
    "lab04": ("vhostlab.exercises.lab_checks_a", "LAB04"),
    "lab05": ("vhostlab.exercises.lab_checks_b", "LAB05"),
    "lab06": ("vhostlab.exercises.lab_checks_c", "LAB06"),
    "lab07": ("vhostlab.exercises.lab_checks_c", "LAB07"),
    "lab08": ("vhostlab.exercises.lab_checks_b", "LAB08"),
    "lab09": ("vhostlab.exercises.lab_checks_b", "LAB09"),
}


def load(name: str) -> Exercise:
    """The Exercise called `name` (graded, or a lab's self-check); KeyError names the ones
    that exist."""
    if name in LAB_CHECKS:
        module, attribute = LAB_CHECKS[name]
        return getattr(importlib.import_module(module), attribute)
    try:
        module = EXERCISES[name]
    except KeyError:
        known = sorted(EXERCISES) + sorted(LAB_CHECKS)
        raise KeyError(f"no exercise {name!r}; there are {known}") from None
    return importlib.import_module(module).EXERCISE


def bind(name: str, namespace: Mapping[str, Any]) -> BoundExercise:
    """Tie exercise `name` to a notebook's namespace: ``ex = bind(name, globals())``.

    ``ex.q1.check()`` then looks the learner's definitions up in that
    namespace each time it runs, so re-running a cell is enough.
    """
    return BoundExercise(load(name), namespace)
