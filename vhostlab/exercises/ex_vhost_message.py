"""Exercise vhost_message: parse a vhost-user message and refuse bad ones.

Every input is real bytes from the protocol layer (``Message.make(...)
.to_bytes()``) or such bytes cut, padded or altered the way a hostile
front-end would; the right answers come from the protocol layer's own
parser (``peek_header``, ``parse_message``). Neither is in the learner's
namespace, and an answer that calls them (or any kit code) scores 0.
"""
from __future__ import annotations

import struct

from vhostlab.exercises.checks import Case, Exercise, Mistake, Question, Raises, fixed
from vhostlab.protocol import (Feature, Message, Request, VringState, parse_message,
                               peek_header)

__all__ = ["EXERCISE", "SETUP", "SOLUTION_PARSE_HEADER", "SOLUTION_PARSE_VRING_STATE"]

SETUP = '''\
import struct

from vhostlab.exercises import bind
from vhostlab.protocol import (HEADER_SIZE, VERSION_MASK, VHOST_USER_VERSION, Feature,
                               Message, Request, VringState)

ex = bind("vhost_message", globals())

# The requests whose payload is struct vhost_vring_state {u32 index; u32 num;}
VRING_STATE_REQUESTS = {Request.SET_VRING_NUM, Request.SET_VRING_BASE,
                        Request.GET_VRING_BASE, Request.SET_VRING_ENABLE}'''

SOLUTION_PARSE_HEADER = '''\
def parse_header(data):
    """(request, flags, size) from the first 12 bytes; ValueError if bad."""
    if len(data) < HEADER_SIZE:
        raise ValueError(f"header: got {len(data)} bytes, need {HEADER_SIZE}")
    request, flags, size = struct.unpack_from("<III", data)
    if flags & VERSION_MASK != VHOST_USER_VERSION:
        raise ValueError(f"flags=0x{flags:x}: version bits must be {VHOST_USER_VERSION}")
    return request, flags, size'''

SOLUTION_PARSE_VRING_STATE = '''\
def parse_vring_state(data):
    """(request, index, num) of a message carrying struct vhost_vring_state."""
    request, flags, size = parse_header(data)
    if request not in VRING_STATE_REQUESTS:
        raise ValueError(f"request={request}: does not carry a vring state")
    if size != 8:
        raise ValueError(f"size={size}: a vring state is 8 bytes")
    if len(data) != HEADER_SIZE + size:
        raise ValueError(f"message is {len(data)} bytes, header says {HEADER_SIZE + size}")
    index, num = struct.unpack_from("<II", data, HEADER_SIZE)
    return request, index, num'''


def _msg(request: Request, payload=None, **kw) -> bytes:
    return Message.make(request, payload, **kw).to_bytes()


def _with_flags(data: bytes, flags: int) -> bytes:
    return data[:4] + struct.pack("<I", flags) + data[8:]


def _with_size(data: bytes, size: int) -> bytes:
    return data[:8] + struct.pack("<I", size) + data[12:]


def _ref_header(data: bytes) -> tuple[int, int, int]:
    return tuple(peek_header(data))


def _ref_vring_state(data: bytes) -> tuple[int, int, int]:
    msg = parse_message(data)
    return int(msg.request), msg.payload.index, msg.payload.num


_GET_FEATURES = _msg(Request.GET_FEATURES)
_SET_FEATURES = _msg(Request.SET_FEATURES, int(Feature.VHOST_F_LOG_ALL))
_BASE_REPLY = Message.make_reply(Request.GET_VRING_BASE, VringState(1, 300)).to_bytes()
_NUM = _msg(Request.SET_VRING_NUM, VringState(0, 256))


def _big_endian(got, want, args) -> bool:
    return tuple(got) == struct.unpack(">III", args[0][:12])


def _swapped_vring(got, want, args) -> bool:
    return tuple(got) == (want[0], want[2], want[1])


def _not_three_ints(fields: str) -> Mistake:
    """Both parsers return a tuple of three ints; say so when the answer has another shape."""
    return Mistake(lambda got, want, args: not isinstance(got, tuple) or len(got) != 3,
                   f"return a tuple of three ints: ({fields}).")


Q1 = Question(
    name="q1", title="parse_header: the 12-byte header", targets=("parse_header",),
    reference=_ref_header,
    cases=(
        Case("the 12-byte header of GET_FEATURES", lambda: fixed(_GET_FEATURES)),
        Case("SET_FEATURES carrying VHOST_F_LOG_ALL (20 bytes, payload 8)",
             lambda: fixed(_SET_FEATURES),
             advice="The size field is the third u32: the payload length, header excluded."),
        Case("the GET_VRING_BASE reply (flags 0x5)", lambda: fixed(_BASE_REPLY),
             advice="0x5 is version 1 plus the reply bit (0x4): test the version bits "
                    "alone, and return the whole flags field."),
        Case("SET_FEATURES with need_reply set (flags 0x9)",
             lambda: fixed(_msg(Request.SET_FEATURES, int(Feature.VHOST_F_LOG_ALL),
                                need_reply=True))),
        Case("11 bytes (one short of a header)", lambda: fixed(_GET_FEATURES[:11]),
             expect=Raises(ValueError, why="A header is 12 bytes; check len(data) first.")),
        Case("no bytes at all", lambda: fixed(b""),
             expect=Raises(ValueError, why="A header is 12 bytes; check len(data) first.")),
        Case("a header whose version bits are 2 (flags 0x2)",
             lambda: fixed(_with_flags(_GET_FEATURES, 0x2)),
             expect=Raises(ValueError, why="The lower 2 bits of flags are the version, "
                                           "and the only version is 1.")),
        Case("a header whose version bits are 0 (flags 0x4)",
             lambda: fixed(_with_flags(_GET_FEATURES, 0x4)),
             expect=Raises(ValueError, why="Test the version bits alone: flags & 0x3.")),
    ),
    mistakes=(
        Mistake(lambda got, want, args: tuple(got) == tuple(reversed(want)),
                "the three values are there but in the wrong order: "
                "the header is request, then flags, then size."),
        Mistake(_big_endian, "those are the fields read big endian; vhost-user uses the "
                             "host's byte order, little endian here ('<' in struct)."),
        Mistake(lambda got, want, args: got[0] == want[0] and got[1] == want[1] & 0x3
                and got[2] == want[2],
                "return the whole flags field, not only the version bits."),
        _not_three_ints("request, flags, size"),
    ),
    hints=(
        "The header is three little-endian u32 values in a row: request, flags, size.",
        "struct.unpack_from reads several values at once from a format string ('<' for "
        "little endian, one letter per u32); check len(data) before you do, or struct "
        "raises struct.error, which is not a ValueError.",
        "The version lives in the lowest two bits of flags: flags & VERSION_MASK must "
        "equal VHOST_USER_VERSION (1).",
    ),
    solution=SOLUTION_PARSE_HEADER,
    own_work=(),
)

_STATE_REFUSE = "A back-end must refuse it with a ValueError that names the field."

Q2 = Question(
    name="q2", title="parse_vring_state: a message with a payload",
    targets=("parse_vring_state",), reference=_ref_vring_state,
    cases=(
        Case("SET_VRING_NUM(index=0, num=256)", lambda: fixed(_NUM)),
        Case("SET_VRING_BASE(index=1, num=40000)",
             lambda: fixed(_msg(Request.SET_VRING_BASE, VringState(1, 40000))),
             advice="index is the first u32 of the payload, num the second."),
        Case("GET_VRING_BASE(index=1)",
             lambda: fixed(_msg(Request.GET_VRING_BASE, VringState(1, 0)))),
        Case("SET_VRING_ENABLE(index=1, num=1)",
             lambda: fixed(_msg(Request.SET_VRING_ENABLE, VringState(1, 1)))),
        Case("SET_VRING_NUM whose size field says 4 (and 4 payload bytes)",
             lambda: fixed(_with_size(_NUM, 4)[:16]),
             expect=Raises(ValueError, why="A vring state is exactly 8 bytes. " + _STATE_REFUSE)),
        Case("SET_VRING_NUM cut after 16 bytes (size still says 8)",
             lambda: fixed(_NUM[:16]),
             expect=Raises(ValueError, why="Compare len(data) with 12 + size. " + _STATE_REFUSE)),
        Case("SET_VRING_NUM followed by 4 stray bytes", lambda: fixed(_NUM + b"\0" * 4),
             expect=Raises(ValueError, why="One message is exactly 12 + size bytes. "
                                           + _STATE_REFUSE)),
        Case("SET_VRING_NUM whose size field is 0xffffffff", lambda: fixed(
             _with_size(_NUM, 0xFFFFFFFF)),
             expect=Raises(ValueError, why="Never trust the size field. " + _STATE_REFUSE)),
        Case("SET_FEATURES (a u64 payload, not a vring state)", lambda: fixed(_SET_FEATURES),
             expect=Raises(ValueError, why="Check the request id against "
                                           "VRING_STATE_REQUESTS.")),
        Case("SET_VRING_BASE with version bits 3", lambda: fixed(
             _with_flags(_msg(Request.SET_VRING_BASE, VringState(0, 7)), 0x3)),
             expect=Raises(ValueError, why="Start from parse_header: it checks the version.")),
    ),
    mistakes=(
        Mistake(_swapped_vring, "index and num are swapped: the payload is "
                                "struct vhost_vring_state { unsigned int index; unsigned int num; }."),
        _not_three_ints("request, index, num"),
    ),
    hints=(
        "Call your parse_header first: it already refuses short headers and bad versions.",
        "Three more rules: the request must be in VRING_STATE_REQUESTS, size must be 8, "
        "and len(data) must be exactly HEADER_SIZE + size.",
        "The payload starts at offset HEADER_SIZE: two u32, index then num (unpack_from "
        "takes an offset as its third argument).",
    ),
    solution=SOLUTION_PARSE_VRING_STATE,
    own_work=(),
)

EXERCISE = Exercise(name="vhost_message", title="Parse a vhost-user message",
                    questions=(Q1, Q2), setup=SETUP)
