"""Self-checks a learner runs inside the notebook: check(), hint(), solution().

Kaggle's learntools is the model. An exercise is data: for each question,
the names the learner defines, the cases to try (each builds its own real
input from the project's layers and knows the right outcome through a
reference), the hints in order, the solution, and messages for the usual
mistakes. Nothing here knows about a particular exercise.

In a notebook::

    from vhostlab.exercises import bind
    ex = bind("vhost_message", globals())
    ...
    ex.q1.check()      # correct / incorrect (with a message that teaches) / not attempted
    ex.q1.hint()       # the next hint; ex.q1.hint(2) for the second
    ex.q1.solution()   # when the instructor allows it

Test cells use ``ex.q1.assert_correct()``: it raises AssertionError with the
same message when the answer is wrong, NotImplementedError when it is not
attempted, so the grader scores it like any nbgrader test.

An instructor hides every solution with ``VHOSTLAB_SOLUTIONS=hide`` in the
environment, or per exercise/question with ``solution_allowed=False``.
"""
from __future__ import annotations

from ..errors import VhostlabError

import contextlib
import html
import os
import reprlib
import signal
import threading
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable, ContextManager, Iterator, Mapping

import numpy as np

__all__ = ["Outcome", "Result", "Raises", "Case", "Mistake", "Question", "Exercise",
           "BoundQuestion", "BoundExercise", "Hint", "Solution", "CheckTimeout", "fixed",
           "time_limit", "answered", "letter", "word", "name_set", "lower_name_set",
           "name_question", "letter_question"]


class Outcome(str, Enum):
    CORRECT = "correct"
    INCORRECT = "incorrect"
    NOT_ATTEMPTED = "not attempted"


_COLOURS = {Outcome.CORRECT: "#2e7d32", Outcome.INCORRECT: "#c62828",
            Outcome.NOT_ATTEMPTED: "#1565c0"}
_LABELS = {Outcome.CORRECT: "Correct", Outcome.INCORRECT: "Incorrect",
           Outcome.NOT_ATTEMPTED: "Not attempted yet"}


@dataclass(frozen=True)
class Result:
    """What check() found: an outcome and a message for the learner."""

    outcome: Outcome
    message: str
    question: str = ""

    def __bool__(self) -> bool:
        return self.outcome is Outcome.CORRECT

    def __str__(self) -> str:
        return f"{_LABELS[self.outcome]}: {self.message}"

    def __repr__(self) -> str:
        return str(self)

    def _repr_html_(self) -> str:
        colour = _COLOURS[self.outcome]
        return (f'<div style="border-left:4px solid {colour};padding:2px 8px">'
                f'<b style="color:{colour}">{_LABELS[self.outcome]}</b>: '
                f'{html.escape(self.message)}</div>')


@dataclass(frozen=True)
class Hint:
    text: str
    number: int
    total: int

    def __repr__(self) -> str:
        return f"Hint {self.number} of {self.total}: {self.text}"

    def _repr_html_(self) -> str:
        return (f'<div style="border-left:4px solid #f9a825;padding:2px 8px">'
                f'<b>Hint {self.number} of {self.total}</b>: {html.escape(self.text)}</div>')


@dataclass(frozen=True)
class Solution:
    text: str
    allowed: bool = True

    def __repr__(self) -> str:
        return self.text if self.allowed else f"Solution not available: {self.text}"

    def _repr_html_(self) -> str:
        if not self.allowed:
            return f"<div><b>Solution not available</b>: {html.escape(self.text)}</div>"
        return f"<div><b>Solution</b>:<pre>{html.escape(self.text)}</pre></div>"


@dataclass(frozen=True)
class Raises:
    """The right outcome is an exception of one of these types."""

    types: tuple[type[BaseException], ...]
    why: str = ""

    def __init__(self, *types: type[BaseException], why: str = "") -> None:
        object.__setattr__(self, "types", types)
        object.__setattr__(self, "why", why)

    @property
    def names(self) -> str:
        return " or ".join(t.__name__ for t in self.types)


class CheckTimeout(VhostlabError):
    """The learner's code ran past a case's time limit."""


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise CheckTimeout in the learner's code after `seconds` (SIGALRM).

    Works where signals do: the main thread on Unix (where notebook cells
    run). Elsewhere it limits nothing; the grader's cell time limit remains.
    """
    usable = (seconds > 0 and hasattr(signal, "setitimer")
              and threading.current_thread() is threading.main_thread())
    if not usable:
        yield
        return

    def _alarm(signum, frame):
        raise CheckTimeout(f"still running after {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@contextlib.contextmanager
def fixed(*args: Any) -> Iterator[tuple]:
    """A case input that needs no resources: the arguments as they are."""
    yield args


@dataclass(frozen=True)
class Case:
    """One trial of the learner's answer.

    ``setup()`` is a context manager yielding the arguments (a fresh memfd,
    ring or log each time; it releases them afterwards). ``expect`` is either
    Raises(...) or None, in which case the question's reference is run on a
    fresh setup to get the right outcome. ``describe`` names the input the
    way the learner should think of it; ``advice`` says where to look when
    this case fails, without the answer.
    """

    describe: str
    setup: Callable[[], ContextManager[tuple]]
    expect: Raises | None = None
    advice: str = ""


@dataclass(frozen=True)
class Mistake:
    """A known wrong outcome and what to tell the learner about it.

    ``when(got, want, args)`` is true for that mistake; ``say`` is the message,
    or a function of the same arguments that makes it.
    """

    when: Callable[[Any, Any, tuple], bool]
    say: str | Callable[[Any, Any, tuple], str]


def answered(value: Any, say: str | Callable[[Any, Any, tuple], str]) -> Mistake:
    """The mistake of answering exactly ``value``, and what to say about it."""
    return Mistake(lambda got, want, args: got == value, say)


# How value questions read what the learner wrote (``run=`` of a Question).
def letter(targets: tuple, args: tuple) -> Any:
    """A multiple-choice letter: ' b ' reads as 'B'."""
    value = targets[0]
    return value.strip().upper() if isinstance(value, str) else value


def word(targets: tuple, args: tuple) -> str:
    """A function's name: '"vhost_dev_init()"' reads as 'vhost_dev_init'."""
    return str(targets[0]).strip().strip('"').rstrip("()").strip()


def _names(value: Any, lower: bool) -> Any:
    if isinstance(value, str):
        value = {value}
    if not isinstance(value, (set, list, tuple, frozenset)):
        return value
    return {str(v).strip().lower() if lower else str(v).strip() for v in value}


def name_set(targets: tuple, args: tuple) -> Any:
    """A set of names (one name, a list or a tuple also do), each stripped."""
    return _names(targets[0], lower=False)


def lower_name_set(targets: tuple, args: tuple) -> Any:
    """As name_set, case aside: 'EVENT_IDX' matches 'event_idx'."""
    return _names(targets[0], lower=True)


def _same(got: Any, want: Any) -> bool:
    if isinstance(got, np.ndarray) or isinstance(want, np.ndarray):
        return bool(np.array_equal(np.asarray(got), np.asarray(want)))
    try:
        return bool(got == want)
    except Exception:
        return False


def _exc_text(exc: BaseException) -> str:
    """'struct.error: ...' / 'ValueError' -- the exception as a learner reads it."""
    kind = type(exc)
    name = kind.__name__ if kind.__module__ in ("builtins", "__main__") \
        else f"{kind.__module__.rsplit('.', 1)[-1]}.{kind.__name__}"
    return f"{name}: {exc}" if str(exc) else name


# Every name some question asks the learner to define (functions only).
_ANSWER_NAMES: set[str] = set()

_short = reprlib.Repr()
_short.maxstring, _short.maxother, _short.maxlist, _short.maxtuple = 200, 160, 8, 8


@dataclass(frozen=True)
class Question:
    """One question: what the learner defines and how it is checked.

    ``targets`` are the names the learner defines (functions or, with
    ``kind="value"``, a variable). ``run(targets, args)`` applies them to a
    case's arguments and returns what is observed (default: call the first
    target); ``reference`` gives the right observation for the same
    arguments (it receives the same kind of objects as ``run``).
    """

    name: str
    title: str
    targets: tuple[str, ...]
    cases: tuple[Case, ...]
    hints: tuple[str, ...]
    solution: str
    reference: Callable[..., Any] | None = None
    run: Callable[[tuple, tuple], Any] | None = None
    mistakes: tuple[Mistake, ...] = ()
    kind: str = "function"
    solution_allowed: bool = True
    correct_message: str = ""
    compare: Callable[[Any, Any], bool] = _same
    seconds: float = 10.0   # per case, for the learner's code
    # Names the learner may call from the kit (None: no own-work check). A
    # function that reaches any other kit code scores 0 (ownwork.py).
    own_work: tuple[str, ...] | None = None
    own_work_advice: str = ""

    def __post_init__(self) -> None:
        if self.kind == "function":
            _ANSWER_NAMES.update(self.targets)

    def observe(self, targets: tuple, args: tuple) -> Any:
        if self.run is not None:
            return self.run(targets, args)
        if self.kind == "value":
            return targets[0]
        return targets[0](*args)

    def references(self) -> tuple:
        ref = self.reference
        return ref if isinstance(ref, tuple) else (ref,)

    def check(self, namespace: Mapping[str, Any]) -> Result:
        """Try every case against the learner's definitions in `namespace`."""
        missing = [t for t in self.targets if t not in namespace]
        if missing:
            what = "variable" if self.kind == "value" else "function"
            return self._result(Outcome.NOT_ATTEMPTED,
                                f"there is no {what} `{missing[0]}` yet: write it in the "
                                "cell above and run that cell.")
        targets = tuple(namespace[t] for t in self.targets)
        borrowed = self._borrowed(targets, namespace)
        if borrowed is not None:
            return borrowed
        for case in self.cases:
            verdict = self._try(case, targets)
            if verdict is not None:
                return verdict
        return self._result(Outcome.CORRECT, self._correct_text())

    def _borrowed(self, targets: tuple, namespace: Mapping[str, Any]) -> Result | None:
        """INCORRECT when a target calls the kit's own answer (ownwork.py)."""
        if self.own_work is None or self.kind == "value":
            return None
        from vhostlab.exercises.ownwork import delegations, explain
        for name, fn in zip(self.targets, targets):
            if not callable(fn):
                continue
            # another question's answer is judged there, not again here
            found = delegations(fn, self.own_work,
                                not_followed=_ANSWER_NAMES - set(self.targets))
            if found:
                return self._result(Outcome.INCORRECT,
                                    explain(name, found, self.own_work_advice))
        return None

    def _correct_text(self) -> str:
        if self.correct_message:
            return self.correct_message
        if self.kind == "value":
            return f"{self._subject()} is right."
        n = len(self.cases)
        return f"{self._subject()} passed all {n} checks." if n > 1 \
            else f"{self._subject()} passed."

    def _subject(self) -> str:
        if self.kind == "value":
            return f"`{self.targets[0]}`"
        return ", ".join(f"`{t}`" for t in self.targets)

    def _result(self, outcome: Outcome, message: str) -> Result:
        return Result(outcome, message, self.name)

    def _try(self, case: Case, targets: tuple) -> Result | None:
        want = None
        if case.expect is None:
            with case.setup() as args:
                want = self.observe(self.references(), args)
        with case.setup() as args:
            try:
                with time_limit(self.seconds):
                    got = self.observe(targets, args)
            except CheckTimeout:
                return self._result(Outcome.INCORRECT, (
                    f"for {case.describe} your code was still running after "
                    f"{self.seconds:g} s: does it loop? {case.expect.why if case.expect else ''}"
                    f" {case.advice}").strip())
            except NotImplementedError:
                return self._result(Outcome.NOT_ATTEMPTED,
                                    f"{self._subject()} still raises NotImplementedError: "
                                    "replace the stub with your code.")
            except Exception as exc:  # the learner's code failed: say how, and go on teaching
                return self._raised(case, exc)
            return self._judge(case, got, want, args)

    def _raised(self, case: Case, exc: Exception) -> Result | None:
        if case.expect is not None and isinstance(exc, case.expect.types):
            return None
        text = _exc_text(exc)
        if case.expect is not None:
            msg = (f"for {case.describe} your code raised {_short.repr(text)[1:-1]}; "
                   f"it should raise {case.expect.names}. {case.expect.why}")
        else:
            msg = (f"for {case.describe} your code raised {_short.repr(text)[1:-1]}. "
                   f"{case.advice}")
        return self._result(Outcome.INCORRECT, msg.strip())

    def _judge(self, case: Case, got: Any, want: Any, args: tuple) -> Result | None:
        if case.expect is not None:
            return self._result(Outcome.INCORRECT, (
                f"for {case.describe} your code returned {_short.repr(got)} instead of "
                f"refusing it: it should raise {case.expect.names}. {case.expect.why}").strip())
        if self.compare(got, want):
            return None
        if got is None:
            return self._result(Outcome.INCORRECT,
                                f"your function returned None for {case.describe}; "
                                "did you forget `return`?")
        for mistake in self.mistakes:
            try:
                hit = mistake.when(got, want, args)
            except Exception:
                hit = False
            if hit:
                say = mistake.say(got, want, args) if callable(mistake.say) else mistake.say
                return self._result(Outcome.INCORRECT, f"for {case.describe}: {say}")
        return self._result(Outcome.INCORRECT, (
            f"for {case.describe} your code gave {_short.repr(got)}, which is not right. "
            f"{case.advice}").strip())


def name_question(name: str, title: str, target: str, answer: str, *,
                  wrong: Mapping[str, str], hints: tuple[str, ...],
                  run: Callable[[tuple, tuple], Any] = word,
                  describe: str = "your function name",
                  mistakes: tuple[Mistake, ...] = ()) -> Question:
    """A value question answered by one name (a function, a field, a letter).

    The learner sets the variable ``target``; ``run`` reads it. ``wrong`` maps
    the likely wrong names to what to tell the learner, tried after
    ``mistakes``; the solution assigns ``answer``.
    """
    return Question(name=name, title=title, targets=(target,), kind="value", reference=answer,
                    run=run, cases=(Case(describe, fixed),),
                    mistakes=mistakes + tuple(answered(w, say) for w, say in wrong.items()),
                    hints=hints, solution=f'{target} = "{answer}"')


def letter_question(name: str, title: str, target: str, answer: str, *,
                    choices: Mapping[str, str], wrong: Mapping[str, str],
                    hints: tuple[str, ...]) -> Question:
    """A multiple-choice question: the learner sets ``target`` to one letter of ``choices``."""
    *first, last = sorted(choices)
    return name_question(
        name, title, target, answer, wrong=wrong, hints=hints, run=letter,
        describe="your letter",
        mistakes=(Mistake(lambda got, want, args: got not in choices,
                          f"answer with one letter, {', '.join(first)} or {last}, as a string."),))


@dataclass(frozen=True)
class Exercise:
    """A named set of questions (one notebook)."""

    name: str
    title: str
    questions: tuple[Question, ...]
    solution_allowed: bool = True
    setup: str = ""  # the source of the notebook's set-up cell (a test holds them equal)


def solutions_hidden() -> bool:
    return os.environ.get("VHOSTLAB_SOLUTIONS", "").lower() in ("hide", "0", "no", "off")


@dataclass
class BoundQuestion:
    """A question tied to the notebook's namespace (what ``ex.q1`` is)."""

    question: Question
    namespace: Mapping[str, Any]
    exercise_allows_solution: bool = True
    _hints_shown: int = field(default=0, repr=False)

    def check(self) -> Result:
        """Run every case; returns a Result that displays itself."""
        return self.question.check(self.namespace)

    def require(self) -> None:
        """For test cells: NotImplementedError while an answer is not defined yet."""
        missing = [t for t in self.question.targets if t not in self.namespace]
        if missing:
            raise NotImplementedError(f"`{missing[0]}` is not defined yet: answer the "
                                      "question above and run its cell")

    def assert_correct(self) -> None:
        """For test cells: AssertionError when wrong, NotImplementedError when not tried."""
        result = self.check()
        if result.outcome is Outcome.NOT_ATTEMPTED:
            raise NotImplementedError(result.message)
        if result.outcome is Outcome.INCORRECT:
            raise AssertionError(result.message)

    def hint(self, n: int | None = None) -> Hint:
        """The next hint (or hint number `n`, from 1)."""
        hints = self.question.hints
        if n is None:
            self._hints_shown = min(self._hints_shown + 1, len(hints))
            n = self._hints_shown
        n = max(1, min(n, len(hints)))
        return Hint(hints[n - 1], n, len(hints))

    def solution(self) -> Solution:
        if solutions_hidden() or not (self.exercise_allows_solution
                                      and self.question.solution_allowed):
            return Solution("your instructor has not released the solution for this "
                            "question; try the hints.", allowed=False)
        return Solution(self.question.solution)

    def __repr__(self) -> str:
        return f"<{self.question.name}: {self.question.title}>"


class BoundExercise:
    """An exercise bound to a namespace: attributes q1, q2, ... are questions."""

    def __init__(self, exercise: Exercise, namespace: Mapping[str, Any]) -> None:
        self.exercise = exercise
        self._questions = {q.name: BoundQuestion(q, namespace, exercise.solution_allowed)
                           for q in exercise.questions}

    def __getattr__(self, name: str) -> BoundQuestion:
        try:
            return self.__dict__["_questions"][name]
        except KeyError:
            raise AttributeError(f"exercise {self.exercise.name!r} has no question {name!r}; "
                                 f"it has {sorted(self.__dict__['_questions'])}") from None

    def __dir__(self) -> list[str]:
        return sorted(set(super().__dir__()) | set(self._questions))

    def check_all(self) -> list[Result]:
        return [q.check() for q in self._questions.values()]

    def __repr__(self) -> str:
        names = ", ".join(self._questions)
        return f"<exercise {self.exercise.name}: {names}>"
