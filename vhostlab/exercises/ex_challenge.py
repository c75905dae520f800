"""Exercise challenge (bonus): two datapath decisions, graded against a real QEMU.

Problem A, EVENT_IDX notification suppression: ``vring_need_event(event_idx,
new_idx, old_idx)`` (virtio 2.7.10, u16 arithmetic) and ``should_signal(ring)``,
whether the device writes the call eventfd after a used-ring update.

Problem B, mergeable RX buffers: ``place_frame(frame_len, hdr_len,
buffer_sizes)``, how one frame is spread over the guest's RX buffers with
VIRTIO_NET_F_MRG_RXBUF, and the header's ``num_buffers``.

Each is first tried on small cases, then inside a vhostlab back-end serving a
real QEMU whose qtest guest driver negotiated the feature: the learner's
function is the back-end's decision there (``backend.overrides``). Without a
QEMU the grade fails and says so: this tier needs a real peer.
"""
from __future__ import annotations

import contextlib
import os
import struct
from typing import Callable

from vhostlab.backend.overrides import (RingOverrides, SignalView, reference_place_frame,
                                        reference_should_signal)
from vhostlab.exercises.checks import Case, Exercise, Mistake, Question, fixed
from vhostlab.exercises.migration_checks import usable_qemu
from vhostlab.ring.layout import VRING_AVAIL_F_NO_INTERRUPT, vring_need_event_py

__all__ = ["EXERCISE", "SETUP", "SignalView", "NO_QEMU", "usable_qemu", "needs_qemu",
           "run_event_idx", "run_mrg_rxbuf"]

SETUP = '''\
from vhostlab.exercises import bind
from vhostlab.exercises.ex_challenge import (VRING_AVAIL_F_NO_INTERRUPT, SignalView,
                                             needs_qemu, run_event_idx, run_mrg_rxbuf)

ex = bind("challenge", globals())'''

SOLUTION_NEED_EVENT = '''\
def vring_need_event(event_idx, new_idx, old_idx):
    """Did moving the index from old_idx to new_idx pass event_idx? (u16)"""
    return (new_idx - event_idx - 1) & 0xFFFF < (new_idx - old_idx) & 0xFFFF'''

SOLUTION_SHOULD_SIGNAL = '''\
def should_signal(ring):
    """After a used-ring update: must the device write the call eventfd?"""
    if not ring.event_idx:
        return not ring.avail_flags & VRING_AVAIL_F_NO_INTERRUPT
    if ring.old_idx is None:
        return True                      # the first update: nothing to compare with
    return vring_need_event(ring.used_event, ring.new_idx, ring.old_idx)'''

SOLUTION_PLACE = '''\
def place_frame(frame_len, hdr_len, buffer_sizes):
    """(num_buffers, bytes per buffer) for header + frame, or None to wait."""
    left, lengths = hdr_len + frame_len, []
    for size in buffer_sizes:
        if left == 0:
            break
        lengths.append(min(size, left))
        left -= lengths[-1]
    if left:
        return None                      # not enough buffers yet: the frame waits
    return len(lengths), lengths'''

NO_QEMU = ("needs a real QEMU: this challenge is graded inside a back-end that serves a "
           "real QEMU, and none was found here (install qemu-system-x86_64, or set "
           "VHOSTLAB_QEMU); it cannot pass without one.")

VIRTIO_NET_F_MRG_RXBUF = 15
VIRTIO_RING_F_EVENT_IDX = 29
RX_QUEUE, IRQ_WAIT_S = 0, 4.0


def needs_qemu() -> str:
    """The QEMU's path; RuntimeError (NO_QEMU) when there is none."""
    qemu = usable_qemu()
    if qemu is None:
        raise RuntimeError(NO_QEMU)
    return qemu


@contextlib.contextmanager
def _served(qemu: str, overrides: RingOverrides, features: int):
    from vhostlab.qemu.host import VhostUserHost
    host = VhostUserHost("challenge", qemu=qemu)
    try:
        host.start_backend()
        host.server.device.overrides = overrides    # this server only, before DRIVER_OK
        host.start_qemu()
        yield host, host.init_guest(features=features)
    finally:
        host.close()


def _frame(i: int, size: int) -> bytes:
    head = struct.pack("!6s6sH", b"\x52\x54\x00\x12\x34\x56", b"\x52\x54\x00\xaa\xbb\xcc",
                       0x88B5)
    return head + bytes([i & 0xFF]) + os.urandom(size - len(head) - 1)


def run_event_idx(should_signal: Callable, *, rounds: int = 3, frames: int = 5,
                  qemu: str | None = None) -> dict:
    """Serve a real QEMU (EVENT_IDX negotiated) with `should_signal` deciding every call.

    Each round the back-end delivers `frames` frames one by one while the guest
    sleeps on its interrupt; then the guest reads them (and moves used_event).
    Returns the rounds that stalled (no interrupt came), the frames received,
    and the decisions: missed (reference signals, yours not) and extra.
    """
    qemu = qemu or needs_qemu()
    overrides = RingOverrides(should_signal=should_signal)
    stalled = received = 0
    with _served(qemu, overrides, 1 << VIRTIO_RING_F_EVENT_IDX) as (host, guest):
        guest.post_rx_buffers()
        for r in range(rounds):
            if guest.irq_line is not None:
                guest.read_isr()                       # start each round with the line low
            for i in range(frames):
                host.server.inject([_frame(r * frames + i, 60 + 40 * i)])
            if not guest.qtest.wait_irq(guest.irq_line, IRQ_WAIT_S):
                stalled += 1
            got = []
            for _ in range(20):                        # read what arrived (used->idx)
                got += guest.receive()
                if len(got) >= frames:
                    break
                guest.wait_used(RX_QUEUE, 1, 0.1)
            received += len(got)
    with overrides.lock:
        decisions = list(overrides.decisions)
    return {"stalled": stalled, "rounds": rounds, "received": received,
            "sent": rounds * frames, "decisions": len(decisions),
            "calls": sum(got for _, got, _ in decisions),
            "reference_calls": sum(want for _, _, want in decisions),
            "missed": sum(1 for _, got, want in decisions if want and not got),
            "extra": sum(1 for _, got, want in decisions if got and not want),
            "errors": list(overrides.errors)}


MRG_BUFFER = 128
MRG_SIZES = (60, 116, 117, 300, 1000, 1514)


def run_mrg_rxbuf(place_frame: Callable, *, qemu: str | None = None) -> dict:
    """Serve a real QEMU (MRG_RXBUF negotiated, 128-byte RX buffers) with `place_frame`
    spreading every frame; the guest reassembles by num_buffers."""
    from vhostlab.qemu.guest import GuestDriverError
    qemu = qemu or needs_qemu()
    overrides = RingOverrides(place_frame=place_frame)
    sent = [_frame(i, n) for i, n in enumerate(MRG_SIZES)]
    got, error = [], None
    with _served(qemu, overrides, 1 << VIRTIO_NET_F_MRG_RXBUF) as (host, guest):
        guest.post_rx_buffers(size=MRG_BUFFER)
        host.server.inject(sent)
        try:
            for _ in range(30):
                got += guest.receive(timeout=0.2)
                if len(got) >= len(sent):
                    break
        except GuestDriverError as exc:
            error = str(exc)
    wrong = sum(1 for a, b in zip(got, sent) if a != b) + abs(len(sent) - len(got))
    return {"sent": len(sent), "received": len(got), "corrupted": wrong,
            "guest_error": error, "errors": list(overrides.errors)}


# ---------------------------------------------------------------- Problem A
def _need_case(e: int, n: int, o: int, why: str):
    return Case(f"vring_need_event({e}, {n}, {o}) ({why})", lambda: fixed("need", e, n, o))


def _signal_case(why: str, **kw):
    view = SignalView(**{"old_idx": None, "used_event": 0, "event_idx": True,
                         "avail_flags": 0, **kw})
    return Case(f"should_signal on {why}", lambda: fixed("signal", view))


def _run_signal(targets, args):
    kind = args[0]
    reference = targets == (None, None)
    if kind == "need":
        fn = vring_need_event_py if reference else targets[0]
        return bool(fn(*args[1:]))
    if kind == "signal":
        return reference_should_signal(args[1]) if reference else bool(targets[1](args[1]))
    if reference:
        return ("ok", 0, 0)
    if usable_qemu() is None:
        return ("no qemu",)
    targets[0](1, 2, 0)                          # a stub's NotImplementedError surfaces here
    targets[1](SignalView(1, None, 0, True, 0))
    out = run_event_idx(targets[1])
    if out["errors"]:
        return ("raised", out["errors"][0])
    # A round without an interrupt counts against the answer only when it skipped
    # a signal the reference gives: with none missed, the stall is QEMU's
    # interrupt delivery on a loaded machine, not the decision.
    if out["stalled"] and out["missed"]:
        return ("stalled", out["stalled"], out["missed"])
    if out["missed"] or out["extra"]:
        return ("wrong", out["missed"], out["extra"], out["calls"], out["reference_calls"])
    return ("ok", 0, 0)


def _no_qemu(got, want, args) -> bool:
    return got == ("no qemu",)


def _problem_a_says(got, want, args) -> str:
    if got[0] == "raised":
        return f"inside the back-end your should_signal raised {got[1]}."
    if got[0] == "stalled":
        return (f"the guest slept on its interrupt and none came in {got[1]} round(s): "
                f"your back-end skipped {got[2]} signal(s) the driver's used_event asked "
                "for, so a real driver would stall.")
    return (f"your back-end signalled {got[3]} times where the reference signals "
            f"{got[4]} ({got[1]} missed, {got[2]} extra): an interrupt the driver did not "
            "ask for (used_event already passed) is exactly what EVENT_IDX exists to avoid.")


QA = Question(
    name="q1", title="EVENT_IDX: vring_need_event and should_signal, in a back-end",
    targets=("vring_need_event", "should_signal"), reference=(None, None), run=_run_signal,
    seconds=90.0,
    correct_message="your decisions matched the reference's on every used-ring update a "
                    "real QEMU's guest saw, and the guest never waited in vain.",
    cases=(
        _need_case(0, 1, 0, "the driver asked for the very next entry"),
        _need_case(5, 3, 0, "the driver asked for entry 5, only 0..2 were used"),
        _need_case(2, 5, 3, "entry 2 was already passed before this update"),
        _need_case(65535, 2, 65534, "the indexes wrap past 65535"),
        _need_case(1, 1, 1, "nothing new was used"),
        _signal_case("the first update (old_idx None)", new_idx=3),
        _signal_case("used_event 10, the update 4 -> 9", new_idx=9, old_idx=4, used_event=10),
        _signal_case("used_event 6, the update 4 -> 9", new_idx=9, old_idx=4, used_event=6),
        _signal_case("no EVENT_IDX, avail flags NO_INTERRUPT", new_idx=9, old_idx=4,
                     event_idx=False, avail_flags=VRING_AVAIL_F_NO_INTERRUPT),
        _signal_case("no EVENT_IDX, avail flags 0", new_idx=9, old_idx=4, event_idx=False,
                     used_event=2),
        Case("a back-end serving a real QEMU (EVENT_IDX), 3 rounds of 5 frames",
             lambda: fixed("qemu")),
    ),
    mistakes=(
        Mistake(_no_qemu, NO_QEMU),
        Mistake(lambda got, want, args: args[0] == "need" and args[2] < args[3],
                "the indexes are u16 that wrap: mask each difference with 0xFFFF."),
        Mistake(lambda got, want, args: args[0] == "need",
                "is event_idx inside [old_idx, new_idx)? That is the whole question."),
        Mistake(lambda got, want, args: args[0] == "signal" and args[1].old_idx is None,
                "on the first update there is no old_idx to compare with: what does the "
                "driver lose if you stay silent?"),
        Mistake(lambda got, want, args: args[0] == "signal" and not args[1].event_idx,
                "without EVENT_IDX the driver says what it wants in avail->flags."),
        Mistake(lambda got, want, args: args[0] == "signal",
                "with EVENT_IDX the driver's used_event says which entry it waits for."),
        Mistake(lambda got, want, args: args[0] == "qemu", _problem_a_says),
    ),
    hints=(
        "The driver writes used_event: 'interrupt me when used->idx moves past this entry'. "
        "The device asks whether its update, from old_idx to new_idx, crossed it.",
        "Crossed means event_idx lies in [old_idx, new_idx), counted in u16. Measure both "
        "distances back from new_idx, each masked to 16 bits, and compare them.",
        "should_signal has three situations: EVENT_IDX not negotiated, the first update "
        "on a ring, and the general case; only the last needs vring_need_event.",
    ),
    solution=SOLUTION_NEED_EVENT + "\n\n\n" + SOLUTION_SHOULD_SIGNAL, own_work=(),
    own_work_advice="write the u16 comparison yourself.",
)


# ---------------------------------------------------------------- Problem B
def _place_case(n: int, sizes: tuple, why: str, hdr_len: int = 12):
    return Case(f"place_frame({n}, {hdr_len}, {list(sizes)}) ({why})",
                lambda: fixed("place", n, hdr_len, list(sizes)))


def _run_place(targets, args):
    reference = targets == (None,)
    if args[0] == "place":
        fn = reference_place_frame if reference else targets[0]
        got = fn(*args[1:])
        return None if got is None else (int(got[0]), [int(k) for k in got[1]])
    if reference:
        return ("ok", len(MRG_SIZES))
    if usable_qemu() is None:
        return ("no qemu",)
    targets[0](60, 12, [2048])                   # a stub's NotImplementedError surfaces here
    out = run_mrg_rxbuf(targets[0])
    if out["errors"]:
        return ("raised", out["errors"][0])
    if out["guest_error"] or out["corrupted"]:
        return ("corrupted", out["corrupted"], out["guest_error"])
    return ("ok", out["received"])


def _problem_b_says(got, want, args) -> str:
    if got[0] == "raised":
        return f"inside the back-end your place_frame raised {got[1]}."
    if got == ("no qemu",):
        return NO_QEMU
    return (f"the guest reassembled {got[1]} of {len(MRG_SIZES)} frames wrongly"
            + (f" (its driver said: {got[2]})" if got[2] else "")
            + ": it reads num_buffers from the first buffer's header and takes that many.")


def _place_wrong(got, want, args) -> str:
    if want is None:
        return "not enough buffers for the whole frame: return None, and the frame waits."
    if got[0] != want[0] and sum(got[1]) == sum(want[1]):
        return ("the bytes are right but num_buffers is not: it counts the buffers "
                "this frame uses.")
    return ("the header and the frame together go in: fill each buffer as far as it "
            "holds, in order, and stop when nothing is left.")


QB = Question(
    name="q2", title="MRG_RXBUF: spread a frame over RX buffers, in a back-end",
    targets=("place_frame",), reference=(None,), run=_run_place, seconds=90.0,
    correct_message="a real QEMU's guest reassembled every frame from the buffers you "
                    "chose, by the num_buffers you wrote.",
    cases=(
        _place_case(60, (1536, 1536), "fits in one buffer"),
        _place_case(300, (128, 128, 128, 128), "needs three"),
        _place_case(116, (128, 128), "header and frame exactly fill one"),
        _place_case(117, (128, 128), "one byte over"),
        _place_case(1000, (128, 128), "not enough buffers yet"),
        Case("a back-end serving a real QEMU (MRG_RXBUF, 128-byte RX buffers), "
             f"frames of {list(MRG_SIZES)} bytes", lambda: fixed("qemu")),
    ),
    mistakes=(
        Mistake(lambda got, want, args: got == ("no qemu",), NO_QEMU),
        Mistake(lambda got, want, args: args[0] == "qemu", _problem_b_says),
        Mistake(lambda got, want, args: args[0] == "place" and (want is None) != (got is None),
                _place_wrong),
        Mistake(lambda got, want, args: args[0] == "place", _place_wrong),
    ),
    hints=(
        "The device writes one byte stream, the 12-byte header then the frame, across "
        "the buffers in avail order.",
        "Each buffer takes what it holds or what is left, whichever is smaller; "
        "num_buffers is a count, not a size.",
    ),
    solution=SOLUTION_PLACE, own_work=(),
)

EXERCISE = Exercise(name="challenge", title="Challenge: EVENT_IDX and MRG_RXBUF in a back-end",
                    questions=(QA, QB), setup=SETUP, solution_allowed=False)
