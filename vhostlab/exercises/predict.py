"""Predict, then run: compare a learner's written prediction with what happened.

A lab's prediction cell (tagged ``prediction``) asks for ``my_prediction =
...`` before the experiment; a cell after it calls::

    compare_prediction(my_prediction, actual, explain="why it is so")

and shows one of three answers: right, not what happened (with what did),
or, when the cell was run as given (``None``), "you did not predict; the
answer was ...". It never raises, so a notebook runs top to bottom untouched.
"""
from __future__ import annotations

from typing import Any, Callable

from vhostlab.exercises.checks import Outcome, Result

__all__ = ["compare_prediction", "NO_PREDICTION"]

NO_PREDICTION = (None, Ellipsis, "", "?")


def _show(value: Any) -> str:
    if isinstance(value, (set, frozenset)):
        return "{" + ", ".join(map(repr, sorted(value, key=repr))) + "}" if value else "set()"
    if isinstance(value, float):
        return f"{value:.3g}"
    return repr(value)


def _normal(value: Any) -> Any:
    return value.strip().upper() if isinstance(value, str) else value


def compare_prediction(my_prediction: Any, actual: Any, *, explain: str = "",
                       same: Callable[[Any, Any], bool] | None = None,
                       shown: str | None = None) -> Result:
    """Compare ``my_prediction`` with ``actual``; returns a Result that displays itself.

    ``same(prediction, actual)`` decides a match (default: equal, strings
    compared without case or surrounding spaces); ``shown`` replaces how the
    actual value is written; ``explain`` says why it came out so.
    """
    answer = shown if shown is not None else _show(actual)
    tail = f" {explain}" if explain else ""
    if any(my_prediction is v or (isinstance(v, str) and my_prediction == v)
           for v in NO_PREDICTION):
        return Result(Outcome.NOT_ATTEMPTED,
                      f"you did not predict; the answer was {answer}.{tail}", "prediction")
    try:
        right = (same(my_prediction, actual) if same is not None
                 else _normal(my_prediction) == _normal(actual))
    except Exception:
        right = False
    if right:
        return Result(Outcome.CORRECT, f"you predicted {_show(my_prediction)}, and so it "
                                       f"was: {answer}.{tail}", "prediction")
    return Result(Outcome.INCORRECT, f"you predicted {_show(my_prediction)}; what happened "
                                     f"was {answer}.{tail}", "prediction")
