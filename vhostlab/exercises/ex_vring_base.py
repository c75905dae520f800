"""Exercise vring_base: GET_VRING_BASE and SET_VRING_BASE, so that no frame is lost.

The learner writes the two functions a back-end runs for these messages,
against a small view of one of its rings (:class:`VringControl`). They are
checked twice: on a real back-end device driven by real messages
(``handlers.dispatch``), and, the part that matters, by the kit's built-in
live migration (``vhostlab.frontend.migration.BuiltinMigration``) run with
the learner's functions answering GET_VRING_BASE in the source back-end and
SET_VRING_BASE in the destination, every frame counted at the other end.
"""
from __future__ import annotations

import contextlib
import os
from typing import Callable, Iterator

from vhostlab.backend import handlers
from vhostlab.backend.device import VhostUserNetDevice, Vring
from vhostlab.backend.errors import RequestError
from vhostlab.exercises.checks import Case, Exercise, Mistake, Question, fixed
from vhostlab.exercises.migration_checks import (MIGRATION_WAIT_S, frames_outcome,
                                                 reference_must_migrate, summary_of)
from vhostlab.frontend.migration import BuiltinMigration
from vhostlab.protocol import Message, Request, U64, VringState

__all__ = ["EXERCISE", "SETUP", "VringControl", "apply_set_vring_base", "learner_handlers",
           "migrate_with", "started_ring"]

SETUP = '''\
from vhostlab.exercises import bind
from vhostlab.exercises.ex_vring_base import VringControl, migrate_with, started_ring

ex = bind("vring_base", globals())'''

SOLUTION_GET = '''\
def get_vring_base(vring):
    """GET_VRING_BASE: stop the ring; return where the destination must resume."""
    vring.stop()
    return vring.last_avail_idx'''

SOLUTION_SET = '''\
def set_vring_base(vring, num):
    """SET_VRING_BASE: the ring resumes at avail index num."""
    vring.last_avail_idx = num'''

SOLUTION_MIGRATE = '''\
# Nothing new to write: q3 migrates a guest with your get_vring_base (in the
# source back-end) and your set_vring_base (in the destination back-end).'''


class VringControl:
    """What GET_VRING_BASE / SET_VRING_BASE may see and do of one back-end ring.

    ``index``, ``num``, ``started`` and ``used_idx`` are read-only;
    ``last_avail_idx`` is the next avail entry the back-end will take (in
    ``set_vring_base`` you may assign it: a u16); ``stop()`` stops the ring,
    as the spec asks on GET_VRING_BASE: no more kicks, no more frames.
    """

    def __init__(self, dev: VhostUserNetDevice, vring: Vring, *, settable: bool = False):
        self._dev, self._vring, self._settable = dev, vring, settable
        self.requested_base: int | None = None

    @property
    def index(self) -> int:
        return self._vring.index

    @property
    def num(self) -> int:
        return self._vring.num

    @property
    def started(self) -> bool:
        return self._vring.started

    @property
    def used_idx(self) -> int:
        ring = self._vring.ring
        return int(ring.used_idx) if ring is not None else self._vring.base

    @property
    def last_avail_idx(self) -> int:
        if self.requested_base is not None:
            return self.requested_base
        return self._vring.last_avail_idx

    @last_avail_idx.setter
    def last_avail_idx(self, value: int) -> None:
        if not self._settable:
            raise AttributeError("last_avail_idx is read-only here: only SET_VRING_BASE sets it")
        if not isinstance(value, int) or not 0 <= value <= 0xFFFF:
            raise ValueError(f"last_avail_idx = {value!r}: a split ring index is a u16")
        self.requested_base = value

    def stop(self) -> None:
        """Stop the ring: the back-end drops its kick and call fds, keeps the position."""
        self._dev.stop_vring(self._vring)

    def __repr__(self) -> str:
        return (f"<vring {self.index} num={self.num} started={self.started} "
                f"last_avail_idx={self.last_avail_idx} used_idx={self.used_idx}>")


def _ring_of(dev: VhostUserNetDevice, msg: Message) -> Vring:
    state = msg.payload
    if not isinstance(state, VringState):
        raise RequestError(msg.request.name, "payload", type(state).__name__, "VringState")
    if not 0 <= state.index < len(dev.vrings):
        raise RequestError(msg.request.name, "index", state.index, f"< {len(dev.vrings)}")
    return dev.vrings[state.index]


def _learner_failed(msg: Message, exc: BaseException) -> RequestError:
    return RequestError(msg.request.name, "learner code", type(exc).__name__,
                        "no exception", str(exc))


def learner_handlers(get_vring_base: Callable, set_vring_base: Callable) -> dict:
    """Back-end handlers (``handlers.HANDLERS`` signature) that run the learner's code.

    The back-end's own checks come first (payload, queue index; for SET, a
    stopped ring and a u16 base, by the back-end's own handler, which then
    applies the base the learner chose). A learner function that raises or
    returns something that is not a u16 makes the request fail, as a bug in
    a real back-end would.
    """
    original_set = handlers.set_vring_base

    def get_handler(dev, msg, fds):
        vring = _ring_of(dev, msg)
        try:
            num = get_vring_base(VringControl(dev, vring))
        except Exception as exc:  # the learner's bug becomes a refused request
            raise _learner_failed(msg, exc) from None
        if not isinstance(num, int) or isinstance(num, bool) or not 0 <= num <= 0xFFFF:
            raise RequestError(msg.request.name, "num", num, "an int 0..65535",
                               "get_vring_base must return the ring's base")
        return VringState(vring.index, num)

    def set_handler(dev, msg, fds):
        vring = _ring_of(dev, msg)
        try:
            apply_set_vring_base(dev, vring, set_vring_base, msg.payload.num, original_set)
        except RequestError:
            raise
        except Exception as exc:  # the learner's bug becomes a refused request
            raise _learner_failed(msg, exc) from None
        return None

    return {Request.GET_VRING_BASE: get_handler, Request.SET_VRING_BASE: set_handler}


def apply_set_vring_base(dev: VhostUserNetDevice, vring: Vring, set_vring_base: Callable,
                         num: int, original_set: Callable | None = None) -> None:
    """Run the learner's set_vring_base on `vring`; apply the base it chose (if any)
    through the back-end's own SET_VRING_BASE handler and its checks."""
    control = VringControl(dev, vring, settable=True)
    set_vring_base(control, num)
    if control.requested_base is not None:
        chosen = Message.make(Request.SET_VRING_BASE,
                              VringState(vring.index, control.requested_base))
        (original_set or handlers.set_vring_base)(dev, chosen, None)


def migrate_with(get_vring_base: Callable, set_vring_base: Callable, *,
                 queue_size: int = 256, rounds: int = 3, frames_per_round: int = 16) -> dict:
    """Run the built-in live migration with the learner's two functions; its summary.

    Both functions are first tried once on a started ring, so that a stub's
    NotImplementedError reaches the caller instead of breaking a back-end.
    """
    with started_ring(5) as (dev, vring):
        get_vring_base(VringControl(dev, vring))
        set_vring_base(VringControl(dev, vring, settable=True), 5)
    # Both back-ends run the learner's code: the source answers GET_VRING_BASE,
    # the destination takes SET_VRING_BASE. Frames a wrong answer loses are
    # waited for MIGRATION_WAIT_S, not the default 10 s.
    migration = BuiltinMigration(queue_size=queue_size, rounds=rounds,
                                 frames_per_round=frames_per_round,
                                 backend_handlers=learner_handlers(get_vring_base, set_vring_base),
                                 wait_timeout=MIGRATION_WAIT_S)
    return summary_of(migration.run)


# ---------------------------------------------------------------- a real started ring
@contextlib.contextmanager
def started_ring(base: int, index: int = 1, num: int = 256) -> Iterator[tuple]:
    """A back-end device whose ring `index` was set up by real messages.

    SET_VRING_NUM(num), SET_VRING_BASE(base) and SET_VRING_KICK (with a real
    eventfd) go through the back-end's dispatch, so the ring is started at
    `base`. Yields ``(device, vring)``; everything is released afterwards.
    """
    dev = VhostUserNetDevice()
    kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    try:
        _dispatch(dev, Message.make(Request.SET_VRING_NUM, VringState(index, num)))
        _dispatch(dev, Message.make(Request.SET_VRING_BASE, VringState(index, base)))
        fd, kick = kick, -1          # from here the device owns (or has closed) it
        _dispatch(dev, Message.make(Request.SET_VRING_KICK, U64(index), fds=(fd,)))
        yield dev, dev.vrings[index]
    finally:
        if kick >= 0:
            os.close(kick)
        dev.release()


def _dispatch(dev: VhostUserNetDevice, msg: Message) -> None:
    outcome = handlers.dispatch(dev, msg)
    if outcome.error is not None:
        raise outcome.error


def _get_case(base: int):
    @contextlib.contextmanager
    def setup():
        with started_ring(base) as (dev, vring):
            yield dev, vring
    return setup


def _run_get(targets, args):
    dev, vring = args
    control = VringControl(dev, vring)
    returned = targets[0](control)
    return returned, vring.started


def _set_case(base: int, num: int):
    @contextlib.contextmanager
    def setup():
        with started_ring(base) as (dev, vring):
            dev.stop_vring(vring)          # GET_VRING_BASE came first, as it must
            yield dev, vring, num, base
    return setup


def _run_set(targets, args):
    dev, vring, num, _ = args
    apply_set_vring_base(dev, vring, targets[0], num)
    return vring.last_avail_idx


def _exec(code: str) -> Callable:
    ns: dict = {}
    exec(code, ns)
    return next(v for k, v in ns.items() if not k.startswith("__"))


_REF_GET, _REF_SET = _exec(SOLUTION_GET), _exec(SOLUTION_SET)

Q1 = Question(
    name="q1", title="get_vring_base: stop the ring, say where it stopped",
    targets=("get_vring_base",), reference=_REF_GET, run=_run_get,
    cases=(
        Case("a started ring that has taken 300 chains", _get_case(300)),
        Case("a started ring at avail index 65535 (about to wrap)", _get_case(65535)),
        Case("a started ring that has taken nothing yet", _get_case(0)),
    ),
    mistakes=(
        Mistake(lambda got, want, args: got[0] is None,
                "your function returned None; did you forget `return`?"),
        Mistake(lambda got, want, args: got[0] == want[0] and got[1],
                "the number is right but the ring is still running: the spec says "
                "'stop ring upon receiving GET_VRING_BASE', call vring.stop()."),
        Mistake(lambda got, want, args: got[0] == want[0] % args[1].num and got[0] != want[0],
                "that is the slot (index % num), not the index: the destination needs the "
                "free-running 16-bit last_avail_idx."),
        Mistake(lambda got, want, args: not isinstance(got[0], int),
                "return an int: the ring's last_avail_idx."),
    ),
    hints=(
        "The reply to GET_VRING_BASE carries {index, num}; num is where the ring stopped "
        "taking avail entries.",
        "VringControl shows you that number among its attributes; return it as it is (the "
        "free-running index, not index % num).",
        "After GET_VRING_BASE the back-end must not take or write anything more on the "
        "ring: VringControl has a method for that, and it comes before the report.",
    ),
    solution=SOLUTION_GET,
    own_work=(),
)

Q2 = Question(
    name="q2", title="set_vring_base: resume where the source stopped",
    targets=("set_vring_base",), reference=_REF_SET, run=_run_set,
    cases=(
        Case("SET_VRING_BASE num=300 on a stopped ring", _set_case(0, 300)),
        Case("SET_VRING_BASE num=0 on a ring that was at 77", _set_case(77, 0)),
        Case("SET_VRING_BASE num=65535", _set_case(0, 65535)),
    ),
    mistakes=(
        Mistake(lambda got, want, args: got != want and got == args[3],
                "the ring is still where it was: assign the new base to "
                "vring.last_avail_idx."),
    ),
    hints=(
        "SET_VRING_BASE's num is the avail index the ring resumes from.",
        "VringControl has exactly one attribute that set_vring_base may assign.",
    ),
    solution=SOLUTION_SET,
    own_work=(),
)


def _run_migration(targets, args):
    summary = migrate_with(*targets)        # a stub raises NotImplementedError here
    if tuple(targets) == (_REF_GET, _REF_SET):
        reference_must_migrate(summary)
    return frames_outcome(summary)


def _migration_failed(got, want, args) -> bool:
    return got.get("error") is not None


def _frames_wrong(got, want, args) -> bool:
    return got.get("integrity") != "ok"


Q3 = Question(
    name="q3", title="a live migration with your two functions loses no frame",
    targets=("get_vring_base", "set_vring_base"), reference=(_REF_GET, _REF_SET),
    run=_run_migration, seconds=60.0,
    correct_message="the guest moved to the destination without losing, repeating or "
                    "corrupting a single frame.",
    cases=(Case("a built-in live migration (64-entry queues, 3 rounds of traffic both ways)",
                fixed),),
    mistakes=(
        Mistake(_migration_failed, "the migration itself failed (a back-end refused a "
                                   "request your code answered): check what q1 and q2 say."),
        Mistake(_frames_wrong, "the guest lost, duplicated or found corrupted frames after "
                               "moving: the destination did not resume exactly where the "
                               "source stopped. Check that q1 and q2 are correct."),
    ),
    hints=(
        "q3 has no code of its own: make q1 and q2 correct.",
        "The source's GET_VRING_BASE reply is what QEMU sends the destination in "
        "SET_VRING_BASE: both numbers must be the same free-running index.",
    ),
    solution=SOLUTION_MIGRATE,
    own_work=(),
)

EXERCISE = Exercise(name="vring_base", title="GET_VRING_BASE / SET_VRING_BASE in a migration",
                    questions=(Q1, Q2, Q3), setup=SETUP, solution_allowed=False)
