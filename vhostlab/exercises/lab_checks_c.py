"""End-of-lab self-checks for labs 02, 06 and 07 (``bind("lab07", globals())``).

The same machinery as the graded exercises (checks.Question): cases, hints
in order, a solution, and messages for the usual mistakes.
"""
from __future__ import annotations

import struct

from vhostlab.exercises.checks import (Case, Exercise, Mistake, Question, fixed,
                                       letter_question, name_question, name_set)

__all__ = ["LAB02", "LAB06", "LAB07", "LOGGED_CHOICES", "LOSS_CHOICES"]


# -- lab 02 ------------------------------------------------------------------------
L02_Q1 = Question(
    name="q1", title="the 12 header bytes of a reply", targets=("reply_header",),
    reference=lambda request, size: struct.pack("<III", request, 0x5, size),
    cases=(Case("GET_FEATURES (1), u64 payload", lambda: fixed(1, 8)),
           Case("GET_PROTOCOL_FEATURES (15), u64 payload", lambda: fixed(15, 8)),
           Case("GET_VRING_BASE (11), vring state", lambda: fixed(11, 8))),
    mistakes=(
        Mistake(lambda got, want, args: isinstance(got, bytes) and len(got) == 12
                and got[4:8] in (b"\x0d\x00\x00\x00", b"\x01\x00\x00\x00"),
                "the flags of a reply are exactly 0x5: version 1 | reply (0x4), never the "
                "need_reply bit (0x8)."),
        Mistake(lambda got, want, args: isinstance(got, bytes) and len(got) == 12
                and got[:4] == want[:4][::-1],
                "little-endian: the request id's lowest byte comes first."),
    ),
    hints=("Three little-endian u32: request, flags, size.",
           "struct.pack with '<III'."),
    solution="import struct\n\ndef reply_header(request, size):\n"
             "    return struct.pack(\"<III\", request, 0x5, size)",
)

L02_Q2 = name_question(
    "q2", "who adds the LOG_SHMFD migration blocker?", "blocker_function",
    "vhost_user_backend_init",
    wrong={
        "vhost_dev_init":
            "vhost_dev_init adds only the VHOST_F_LOG_ALL blocker; the LOG_SHMFD one "
            "is vhost-user's own.",
        "vhost_user_set_log_base":
            "that is where the log is sent, during a migration; the blocker is added "
            "long before, when the connection is set up.",
    },
    hints=("hw/virtio/vhost-user.c: look for the text 'lacks VHOST_USER_PROTOCOL_F_LOG_SHMFD'.",),
)


def _expects_reply(request, reply_ack, need_reply, log_shmfd):
    return (request.startswith("GET_") or (reply_ack and need_reply)
            or (request == "SET_LOG_BASE" and log_shmfd))


_REPLY_CASES = (("SET_FEATURES", True, False, True), ("SET_MEM_TABLE", True, True, True),
                ("SET_LOG_BASE", False, False, True), ("SET_LOG_BASE", True, False, False),
                ("GET_FEATURES", False, False, False), ("SET_OWNER", False, True, False))

L02_Q3 = Question(
    name="q3", title="does QEMU read a reply?", targets=("expects_reply",),
    reference=_expects_reply,
    cases=tuple(Case(f"{r}, REPLY_ACK={a}, need_reply={n}, LOG_SHMFD={s}",
                     lambda r=r, a=a, n=n, s=s: fixed(r, a, n, s)) for r, a, n, s in _REPLY_CASES),
    mistakes=(
        Mistake(lambda got, want, args: args[0] == "SET_LOG_BASE" and want and not got,
                "SET_LOG_BASE goes without need_reply, yet with LOG_SHMFD "
                "vhost_user_set_log_base() reads a reply: the back-end has mapped the log."),
        Mistake(lambda got, want, args: args[0] == "SET_OWNER" and got,
                "need_reply means nothing unless REPLY_ACK was negotiated."),
        Mistake(lambda got, want, args: args[0].startswith("GET_") and not got,
                "every GET_* request is answered: that is what it is for."),
    ),
    hints=("Three reasons: a GET_*, REPLY_ACK with need_reply, and one request with a rule of "
           "its own.",),
    solution="def expects_reply(request, reply_ack, need_reply, log_shmfd):\n"
             "    return (request.startswith(\"GET_\") or (reply_ack and need_reply)\n"
             "            or (request == \"SET_LOG_BASE\" and log_shmfd))",
)

LAB02 = Exercise("lab02", "Lab 02: the handshake", (L02_Q1, L02_Q2, L02_Q3))


# -- lab 06 ------------------------------------------------------------------------
L06_Q1 = Question(
    name="q1", title="how many bytes of log for RAM at GPA 0", targets=("log_bytes",),
    reference=lambda ram: -(-ram // (4096 * 64)) * 8,
    cases=(Case("128 MiB", lambda: fixed(128 << 20)), Case("16 MiB", lambda: fixed(16 << 20)),
           Case("1 MiB + 4 KiB", lambda: fixed((1 << 20) + 4096))),
    mistakes=(
        Mistake(lambda got, want, args: got == args[0] // 4096,
                "one *bit* per page, not one byte: eight pages share a byte."),
        Mistake(lambda got, want, args: got == -(-args[0] // 4096) // 8 and got != want,
                "QEMU counts the log in 64-bit chunks (VHOST_LOG_CHUNK): round up to a whole "
                "chunk of 64 pages."),
    ),
    hints=("vhost_get_log_size(): one u64 chunk covers 64 pages of 4 KiB.",),
    solution="def log_bytes(ram):\n    return -(-ram // (4096 * 64)) * 8",
)

LOGGED_CHOICES = {"RX buffers", "TX buffers", "RX used ring", "TX used ring", "RX avail ring"}


L06_Q2 = Question(
    name="q2", title="which pages does the back-end log?", targets=("logged",), kind="value",
    reference={"RX buffers", "RX used ring", "TX used ring"}, run=name_set,
    cases=(Case("your set", fixed),),
    mistakes=(
        Mistake(lambda got, want, args: not isinstance(got, set) or bool(got - LOGGED_CHOICES),
                f"a set of names from {sorted(LOGGED_CHOICES)}."),
        Mistake(lambda got, want, args: "TX buffers" in got,
                "the back-end only reads TX buffers; reading dirties nothing."),
        Mistake(lambda got, want, args: "RX avail ring" in got,
                "the avail ring is written by the guest's driver: QEMU sees that itself."),
        Mistake(lambda got, want, args: got < want,
                "every ring's used entries are written by the back-end, TX too."),
    ),
    hints=("Logged = written by the back-end.",),
    solution='logged = {"RX buffers", "RX used ring", "TX used ring"}',
)

L06_Q3 = name_question(
    "q3", "who sends SET_LOG_BASE when a migration starts on a running device?",
    "log_base_sender", "vhost_dev_log_resize",
    wrong={
        "vhost_dev_start":
            "vhost_dev_start sends it only when logging was already on as the device "
            "started; this device was running before the migration began.",
        "vhost_dev_set_log":
            "vhost_dev_set_log comes after: it sends SET_FEATURES and SET_VRING_ADDR.",
        "vhost_migration_log":
            "close: vhost_migration_log calls the function that sizes the log and sends it.",
    },
    hints=("hw/virtio/vhost.c vhost_migration_log(): what does it call before "
           "vhost_dev_set_log()?",),
)

LAB06 = Exercise("lab06", "Lab 06: dirty logging", (L06_Q1, L06_Q2, L06_Q3))


# -- lab 07 ------------------------------------------------------------------------
L07_Q1 = Question(
    name="q1", title="does this vhost_log_put(dev, true) sync?", targets=("log_put_syncs",),
    reference=lambda refcnt: refcnt == 1,
    cases=tuple(Case(f"the shared log's refcnt is {n} before the put", lambda n=n: fixed(n))
                for n in (1, 2, 3)),
    mistakes=(
        Mistake(lambda got, want, args: args[0] > 1 and got,
                "the log is shared by every vhost device of the type; a put that leaves it "
                "in use only drops a reference."),
        Mistake(lambda got, want, args: args[0] == 1 and not got,
                "the last put (refcnt reaches 0) syncs, then frees the log."),
    ),
    hints=("hw/virtio/vhost.c vhost_log_put(): --log->refcnt == 0.",),
    solution="def log_put_syncs(refcnt):\n    return refcnt == 1",
)

LOSS_CHOICES = {
    "A": "every page the back-end wrote during the whole migration",
    "B": "the pages the back-end marked after QEMU's last bitmap sync, before the rings stopped",
    "C": "the pages the guest's own driver wrote after the last sync",
}

L07_Q2 = letter_question(
    "q2", "what does a skipped final sync lose?", "lost_pages", "B",
    choices=LOSS_CHOICES,
    wrong={
        "A": "the earlier syncs took those marks, and their pages were copied again.",
        "C": "the guest's writes go through QEMU, into QEMU's own dirty bitmap.",
    },
    hints=("Which marks has nobody taken out of the log when the rings stop?",),
)

LAB07 = Exercise("lab07", "Lab 07: live migration", (L07_Q1, L07_Q2))
