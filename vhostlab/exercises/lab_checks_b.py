"""End-of-lab self-checks for labs 05, 08 and 09 (``bind("lab09", globals())``).

The same machinery as the graded exercises (checks.Question): cases, hints
in order, a solution, and messages for the usual mistakes.
"""
from __future__ import annotations

import numpy as np

from vhostlab.exercises.checks import (Case, Exercise, Mistake, Question, fixed,
                                       letter_question, name_question, name_set)

__all__ = ["LAB05", "LAB08", "LAB09", "MARKING_CHOICES"]


def _names(targets, args):
    value = targets[0]() if callable(targets[0]) else targets[0]   # the reference is a function
    return name_set((value,), args)


# -- lab 05 ------------------------------------------------------------------------
def _log_reference(bitmap, gpa, length):
    from vhostlab.ring import vhost_log_write
    vhost_log_write(bitmap, gpa, length)


# One question per range would repeat itself; one function, checked on several ranges.
_RANGES = (("one byte in page 0", 0, 1), ("pages 0 and 1 (8 KiB at 0)", 0, 8192),
           ("10 bytes at 9*4096+100 (page 9)", 9 * 4096 + 100, 10),
           ("2 bytes across the page 3/4 boundary", 4 * 4096 - 1, 2),
           ("page 63, the last", 63 * 4096, 4096))


def _mark_observe(targets, args):
    out = []
    for _describe, addr, length in _RANGES:
        bitmap = np.zeros(8, np.uint8)
        targets[0](bitmap, addr, length)
        out.append(bitmap.tobytes())
    return tuple(out)


def _bits_reversed(got: bytes, want: bytes) -> bool:
    """Each byte's bits in the other order: page 0 marked as the highest bit."""
    g, w = np.frombuffer(got, np.uint8), np.frombuffer(want, np.uint8)
    return bool((np.unpackbits(g, bitorder="big") == np.unpackbits(w, bitorder="little")).all())


def _first_wrong(got, want):
    for (describe, _a, _l), g, w in zip(_RANGES, got, want):
        if g != w:
            return describe, g, w
    return None


L05_Q1 = Question(
    name="q1", title="mark the pages of a written range in the dirty log",
    targets=("mark_pages",), reference=_log_reference, run=_mark_observe,
    cases=(Case("five ranges on a 64-page log", fixed),),
    mistakes=(
        Mistake(lambda got, want, args: _first_wrong(got, want) is not None
                and _first_wrong(got, want)[0].startswith("2 bytes"),
                "a write that crosses a page boundary dirties both pages: the last page is "
                "(gpa + length - 1) // 4096."),
        Mistake(lambda got, want, args: _first_wrong(got, want) is not None
                and _first_wrong(got, want)[0].startswith("pages 0 and 1"),
                "8 KiB at 0 covers two pages; mark every page from the first to the last."),
        Mistake(lambda got, want, args: any(g != w and _bits_reversed(g, w)
                                            for g, w in zip(got, want)),
                "bit p % 8 of byte p // 8: page 0 is the lowest bit of byte 0."),
    ),
    hints=("page = gpa // 4096; bit (page % 8) of byte (page // 8).",
           "for page in range(gpa // 4096, (gpa + length - 1) // 4096 + 1): "
           "bitmap[page // 8] |= 1 << (page % 8)"),
    solution='''\
def mark_pages(bitmap, gpa, length):
    for page in range(gpa // 4096, (gpa + length - 1) // 4096 + 1):
        bitmap[page // 8] |= 1 << (page % 8)''',
)

MARKING_CHOICES = {
    "A": "one back-end thread marks with a plain OR while QEMU drains the log with its "
         "atomic exchange",
    "B": "two back-end threads (one per ring) mark pages of the same byte with a plain OR",
    "C": "two back-end threads mark pages of the same byte with an atomic OR",
}

L05_Q2 = letter_question(
    "q2", "when is a dirty-log mark lost?", "loses_a_mark", "B",
    choices=MARKING_CHOICES,
    wrong={
        "A": "walk it through: QEMU takes the word and clears it, then the plain store puts "
             "back the bits QEMU took. Those pages are sent again: extra work, nothing "
             "lost.",
        "C": "an atomic OR is one indivisible read-modify-write: neither writer can "
             "overwrite the other's bit.",
    },
    hints=("A mark is lost when a store writes back a byte that no longer holds another "
           "writer's bit.",),
)

LAB05 = Exercise("lab05", "Lab 05: the numba datapath", (L05_Q1, L05_Q2))


# -- lab 08 ------------------------------------------------------------------------
def _local_ops():
    from vhostlab.frontend import VHOST_OPS_TABLE
    return {o.name for o in VHOST_OPS_TABLE if o.user and o.local}


L08_Q1 = Question(
    name="q1", title="the ops that send no message for vhost-user", targets=("local_ops",),
    kind="value", reference=_local_ops, run=_names,
    cases=(Case("your set", fixed),),
    mistakes=(
        Mistake(lambda got, want, args: not isinstance(got, set),
                "give a set of op names, e.g. {\"vhost_get_vq_index\"}."),
        Mistake(lambda got, want, args: "vhost_net_set_backend" in got,
                "vhost_net_set_backend is not local: vhost-user does not have it at all "
                "(NULL in user_ops)."),
        Mistake(lambda got, want, args: got < want,
                "all of these are local, but some are missing: the recorder's table has six."),
        Mistake(lambda got, want, args: bool(got - want),
                "one or more of those send a message: look at the 'kind' column of ref."),
    ),
    hints=("Run `ref` again: the kind column says which ops answered locally.",
           "Six, among them vhost_get_vq_index and vhost_requires_shm_log."),
    solution='''\
local_ops = {"vhost_backend_can_merge", "vhost_backend_cleanup", "vhost_backend_memslots_limit",
             "vhost_get_vq_index", "vhost_requires_shm_log", "vhost_set_iotlb_callback"}''',
)

L08_Q2 = Question(
    name="q2", title="does QEMU send SEND_RARP?", targets=("sends_rarp",),
    reference=lambda guest_announce, rarp: (not guest_announce) and rarp,
    cases=tuple(Case(f"guest acked GUEST_ANNOUNCE={a}, protocol feature RARP={r}",
                     lambda a=a, r=r: fixed(a, r))
                for a in (False, True) for r in (True, False)),
    mistakes=(
        Mistake(lambda got, want, args: args[0] and got,
                "a guest that acked VIRTIO_NET_F_GUEST_ANNOUNCE announces itself: "
                "vhost_user_migration_done() returns before sending anything."),
        Mistake(lambda got, want, args: not args[1] and got,
                "without protocol feature RARP the back-end cannot be asked: QEMU returns "
                "-ENOTSUP."),
    ),
    hints=("Read vhost_user_migration_done() in hw/virtio/vhost-user.c: two ifs.",),
    solution="def sends_rarp(guest_announce, rarp):\n    return not guest_announce and rarp",
)

L08_Q3 = name_question(
    "q3", "who calls vhost_net_set_mtu?", "mtu_caller", "virtio_net_vhost_status",
    run=lambda t, a: str(t[0]).strip().rstrip("()"),
    wrong={
        "vhost_net_init": "vhost_net_init() creates the vhost_net; the MTU is sent later, "
                          "when the device starts.",
        "vhost_net_start": "close: it is called just before vhost_net_start(), by its caller.",
    },
    hints=("hw/net/virtio-net.c: the function that decides to start vhost when the "
           "guest's driver sets DRIVER_OK.",),
)

LAB08 = Exercise("lab08", "Lab 08: the VhostOps reference", (L08_Q1, L08_Q2, L08_Q3))


# -- lab 09 ------------------------------------------------------------------------
L09_Q1 = Question(
    name="q1", title="QEMU's switch-over threshold, in pages", targets=("threshold_pages",),
    reference=lambda bandwidth, downtime_ms: bandwidth * downtime_ms / 1000 / 4096,
    cases=(Case("4 MiB/s, 50 ms", lambda: fixed(4 << 20, 50)),
           Case("32 MiB/s, 300 ms", lambda: fixed(32 << 20, 300)),
           Case("1 MiB/s, 10 ms", lambda: fixed(1 << 20, 10))),
    compare=lambda got, want: isinstance(got, (int, float)) and abs(got - want) <= 1,
    mistakes=(
        Mistake(lambda got, want, args: abs(got - want * 1000) <= 1000,
                "downtime-limit is in milliseconds: divide by 1000."),
        Mistake(lambda got, want, args: abs(got - want * 4096) <= 4096,
                "that is bytes: divide by the page size, 4096."),
    ),
    hints=("threshold_size = bandwidth x downtime_limit (migration/migration.c).",
           "bytes/s x s = bytes; bytes / 4096 = pages."),
    solution="def threshold_pages(bandwidth, downtime_ms):\n"
             "    return bandwidth * downtime_ms / 1000 / 4096",
)

L09_Q2 = Question(
    name="q2", title="does this round let QEMU switch over?", targets=("switches_over",),
    reference=lambda pages, bandwidth, downtime_ms: pages * 4096 < bandwidth * downtime_ms / 1000,
    cases=(Case("8 dirty pages, 1 MiB/s, 10 ms", lambda: fixed(8, 1 << 20, 10)),
           Case("8 dirty pages, 16 MiB/s, 10 ms", lambda: fixed(8, 16 << 20, 10)),
           Case("220 dirty pages, 2 MiB/s, 300 ms", lambda: fixed(220, 2 << 20, 300)),
           Case("100 dirty pages, 2 MiB/s, 300 ms", lambda: fixed(100, 2 << 20, 300))),
    mistakes=(
        Mistake(lambda got, want, args: got != want and args[0] == 220,
                "220 pages are 880 KiB; 2 MiB/s for 0.3 s is 600 KiB."),
    ),
    hints=("Compare the bytes still dirty with what the link carries within the downtime "
           "limit.",),
    solution="def switches_over(pages, bandwidth, downtime_ms):\n"
             "    return pages * 4096 < bandwidth * downtime_ms / 1000",
)

L09_Q3 = name_question(
    "q3", "what query-migrate lacks when there was no switch-over", "missing_field", "downtime",
    run=lambda t, a: str(t[0]).strip().strip('"').lower(), describe="your field name",
    mistakes=(
        Mistake(lambda got, want, args: got in ("total-time", "total_time"),
                "total-time is there while the migration runs (and grows); look for the one "
                "that only a switch-over can measure."),
    ),
    wrong={
        "status": "status is always there: it stays 'active'.",
    },
    hints=("The guest never stopped.",),
)

LAB09 = Exercise("lab09", "Lab 09: a migration sweep", (L09_Q1, L09_Q2, L09_Q3))
