"""End-of-lab self-checks for labs 00, 01, 03 and 04 (``bind("lab01", globals())``).

Each lab's questions are data, as in the graded exercises (checks.Question):
what the learner defines, the cases, hints in order, the solution, and
messages for the usual mistakes. A lab notebook's last section asks them;
``ex.q1.check()`` answers. Nothing here is graded: these are for the learner.
"""
from __future__ import annotations

from vhostlab.exercises.checks import (Case, Exercise, Mistake, Question, Raises, answered, fixed,
                                       lower_name_set)

__all__ = ["LAB00", "LAB01", "LAB03", "LAB04"]


# -- lab 00 ------------------------------------------------------------------------
KIT_RUNS = {"legacy virtio-net-pci", "tcg", "one queue pair", "split rings", "packed rings"}
KIT_EXPLAINS = {"event_idx", "inflight", "postcopy", "multiqueue"}

L00_Q1 = Question(
    name="q1", title="what the kit only explains", targets=("only_explained",), kind="value",
    reference=KIT_EXPLAINS, run=lower_name_set, cases=(Case("your set", fixed),),
    mistakes=(
        Mistake(lambda got, want, args: not isinstance(got, set),
                "give a set of names from the list in the question, e.g. {\"tcg\"}."),
        Mistake(lambda got, want, args: bool(got & KIT_RUNS),
                "some of those the kit really runs: read the 'What the kit runs' section "
                "again."),
        Mistake(lambda got, want, args: got < want,
                "right so far, but not all of them: one or more are missing."),
    ),
    hints=("The section 'What the kit runs, and what it only explains' has two lists.",
           "Four of the nine names are only explained."),
    solution='only_explained = {"EVENT_IDX", "inflight", "postcopy", "multiqueue"}',
)


def _stop_reference(version):
    if tuple(version[:2]) < (7, 2):
        return ("GET_VRING_BASE",)
    if tuple(version[:2]) < (8, 1):
        return ("SET_STATUS 0", "GET_VRING_BASE")
    return ("GET_VRING_BASE", "SET_STATUS 0")


def _tupled(targets, args):
    got = targets[0](*args)
    return tuple(got) if isinstance(got, list) else got


L00_Q2 = Question(
    name="q2", title="the stop sequence, by QEMU release", targets=("stop_sequence",),
    reference=_stop_reference, run=_tupled,
    cases=tuple(Case(f"QEMU {'.'.join(map(str, v))}", lambda v=v: fixed(v)) for v in
                ((5, 2, 0), (7, 2, 22), (8, 0, 0), (8, 1, 0), (10, 0, 13))),
    mistakes=(
        Mistake(lambda got, want, args: set(got or ()) == set(want) and got != want,
                "the right messages, in the wrong order: which release sends SET_STATUS 0 "
                "first?"),
        Mistake(lambda got, want, args: "SET_STATUS 0" in (got or ()) and len(want) == 1,
                "QEMU before 7.2 has no vhost_dev_start op for vhost-user: it sends no "
                "SET_STATUS at all."),
    ),
    hints=("Three variants: the seed's (only GET_VRING_BASE), QEMU 7.2's, QEMU 8.1's.",
           "Compare the version as a tuple: version[:2] < (7, 2) ..."),
    solution='''\
def stop_sequence(version):
    if tuple(version[:2]) < (7, 2):
        return ("GET_VRING_BASE",)
    if tuple(version[:2]) < (8, 1):
        return ("SET_STATUS 0", "GET_VRING_BASE")
    return ("GET_VRING_BASE", "SET_STATUS 0")''',
)

LAB00 = Exercise("lab00", "Lab 00: the kit, its front-ends and its scope", (L00_Q1, L00_Q2))


# -- lab 01 ------------------------------------------------------------------------
def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (0xAF << 8) | nr


def _ioctl_question(name: str, ioctl: str, direction: int, nr: int, size: int, *,
                    wrong: dict, hints: tuple) -> Question:
    """The number of ioctl ``ioctl`` (vhost's type 0xAF): ``wrong`` maps the
    (direction, size) of a likely slip to what to tell the learner."""
    return Question(
        name=name, title=f"the ioctl number of {ioctl}", kind="value", targets=(ioctl,),
        reference=_ioc(direction, nr, size), cases=(Case("your number", fixed),),
        mistakes=tuple(answered(_ioc(d, nr, s), say) for (d, s), say in wrong.items()),
        hints=hints,
        solution=f"{ioctl} = ({direction} << 30) | ({size} << 16) | (0xAF << 8) | 0x{nr:02x}"
                 f"   # {_ioc(direction, nr, size):#010x}",
    )


L01_Q1 = _ioctl_question(
    "q1", "VHOST_GET_VRING_BASE", 3, 0x12, 8,
    wrong={(1, 8): "that is _IOW: GET_VRING_BASE also reads the state back, so it is _IOWR "
                   "(direction read|write = 3).",
           (2, 8): "that is _IOR: the kernel reads the queue index from the argument too, so "
                   "it is _IOWR.",
           (3, 4): "struct vhost_vring_state is two unsigned ints: 8 bytes."},
    hints=("_IOWR(0xAF, 0x12, struct vhost_vring_state): direction 3 (read and write).",
           "Reuse _IOC from the lab: _IOC(3, 0xAF, 0x12, 8)."),
)

L01_Q2 = _ioctl_question(
    "q2", "VHOST_SET_LOG_BASE", 1, 0x04, 8,
    wrong={(1, 4): "the argument is a __u64 (the log's address): 8 bytes.",
           (3, 8): "the kernel only reads the address: _IOW."},
    hints=("_IOW(0xAF, 0x04, __u64).",),
)


def _set_vring_num_reference(index, num):
    from vhostlab.protocol import Message, Request, VringState
    return Message.make(Request.SET_VRING_NUM, VringState(index=index, num=num)).to_bytes()


L01_Q3 = Question(
    name="q3", title="SET_VRING_NUM on the wire, by hand", targets=("set_vring_num_bytes",),
    reference=_set_vring_num_reference,
    cases=(Case("index 0, num 256", lambda: fixed(0, 256)),
           Case("index 1, num 1024", lambda: fixed(1, 1024))),
    mistakes=(
        Mistake(lambda got, want, args: isinstance(got, bytes) and got == want[12:],
                "that is the payload alone: a message starts with a 12-byte header."),
        Mistake(lambda got, want, args: isinstance(got, bytes) and len(got) == len(want)
                and got[4:8] != want[4:8],
                "look at the flags: a request from the front-end carries version 1 (0x1)."),
        Mistake(lambda got, want, args: isinstance(got, bytes) and got[:4] != want[:4],
                "the request id comes first: SET_VRING_NUM is 8 (docs/interop/vhost-user.rst)."),
    ),
    hints=("Header: three little-endian u32 (request, flags, size). Payload: the ioctl's "
           "struct vhost_vring_state.",
           "struct.pack('<III', 8, 1, 8) + struct.pack('<II', index, num)"),
    solution='''\
import struct

def set_vring_num_bytes(index, num):
    return struct.pack("<III", 8, 1, 8) + struct.pack("<II", index, num)''',
)

LAB01 = Exercise("lab01", "Lab 01: two back-ends, one table of ops", (L01_Q1, L01_Q2, L01_Q3))


# -- lab 03 ------------------------------------------------------------------------
# (guest_phys_addr, memory_size, mmap_offset): the pc machine's three pieces, here from a
# file where they do not sit at their own GPA, so that offset and GPA differ.
REGIONS = ((0x0, 0xC0000, 0x0), (0xE0000, 0x10000, 0x40000000),
           (0x100000, 0x7F00000, 0x80000000))


def _offset_reference(regions, gpa, length):
    for base, size, offset in regions:
        if base <= gpa and gpa + length <= base + size:
            return offset + (gpa - base)
    raise ValueError(f"[{gpa:#x}, {gpa + length:#x}) is not inside one region")


_REFUSE = Raises(ValueError, why="A range that is not entirely inside one region must be "
                                 "refused (CVE-2018-1059).")

L03_Q1 = Question(
    name="q1", title="a guest-physical range to an offset in the memfd",
    targets=("gpa_to_offset",), reference=_offset_reference,
    cases=(Case("16 bytes at 0x300000", lambda: fixed(REGIONS, 0x300000, 16)),
           Case("16 bytes at 0xe0010", lambda: fixed(REGIONS, 0xE0010, 16)),
           Case("16 bytes at 0xbfff8 (crosses the end of region 0)",
                lambda: fixed(REGIONS, 0xBFFF8, 16), _REFUSE),
           Case("16 bytes at 0xc0000 (the ROM hole)",
                lambda: fixed(REGIONS, 0xC0000, 16), _REFUSE),
           Case("4097 bytes at the last page", lambda: fixed(REGIONS, 0x7FFF000, 4097),
                _REFUSE)),
    mistakes=(
        Mistake(lambda got, want, args: got == args[1],
                "you returned the GPA itself: the offset in the fd is the region's "
                "mmap_offset plus how far the GPA lies inside the region."),
    ),
    hints=("Find the region with guest_phys_addr <= gpa and gpa + length <= "
           "guest_phys_addr + memory_size.",
           "Offset = mmap_offset + (gpa - guest_phys_addr); raise ValueError when no "
           "region holds the whole range."),
    solution='''\
def gpa_to_offset(regions, gpa, length):
    for base, size, offset in regions:
        if base <= gpa and gpa + length <= base + size:
            return offset + (gpa - base)
    raise ValueError(f"{gpa:#x}+{length} is not inside one region")''',
)

L03_Q2 = Question(
    name="q2", title="the size of SET_MEM_TABLE's payload", targets=("mem_table_payload_size",),
    reference=lambda n: 8 + 32 * n,
    cases=tuple(Case(f"{n} region(s)", lambda n=n: fixed(n)) for n in (1, 3, 8)),
    mistakes=(
        Mistake(lambda got, want, args: got == 32 * args[0],
                "the regions are right, but the payload starts with nregions and padding "
                "(two u32)."),
        Mistake(lambda got, want, args: got == 12 + 8 + 32 * args[0],
                "the 12-byte header is not part of the payload."),
    ),
    hints=("struct VhostUserMemory: u32 nregions, u32 padding, then the regions.",
           "Each region is four u64."),
    solution="def mem_table_payload_size(nregions):\n    return 8 + 32 * nregions",
)

LAB03 = Exercise("lab03", "Lab 03: the memory table", (L03_Q1, L03_Q2))


# -- lab 04 ------------------------------------------------------------------------
def _used_reference(num):
    from vhostlab.ring import vring_layout
    return vring_layout(0, num).used


L04_Q1 = Question(
    name="q1", title="where the used ring starts (legacy layout)", targets=("used_offset",),
    reference=_used_reference,
    cases=tuple(Case(f"num = {n}", lambda n=n: fixed(n)) for n in (256, 128, 1024, 8)),
    mistakes=(
        Mistake(lambda got, want, args: got == 16 * args[0] + 6 + 2 * args[0],
                "that is where the available ring ends; the legacy layout aligns the used "
                "ring to the next 4096 bytes."),
        Mistake(lambda got, want, args: got == 16 * args[0] + 4 + 2 * args[0],
                "the available ring also has a used_event u16 at its end: 6 + 2*num bytes."),
    ),
    hints=("Descriptor table: 16*num bytes. Available ring: flags, idx, ring[num], "
           "used_event: 6 + 2*num bytes.",
           "Round up to a multiple of 4096: -(-x // 4096) * 4096."),
    solution='''\
def used_offset(num):
    end_of_avail = 16 * num + 6 + 2 * num
    return -(-end_of_avail // 4096) * 4096''',
)

L04_Q2 = Question(
    name="q2", title="a queue size the back-end accepts", targets=("queue_size_ok",),
    reference=lambda num: 0 < num <= 32768 and num & (num - 1) == 0,
    cases=tuple(Case(f"num = {n}", lambda n=n: fixed(n))
                for n in (256, 100, 0, 1, 32768, 65536, 3)),
    mistakes=(
        Mistake(lambda got, want, args: args[0] == 0 and got,
                "0 is not a queue: num & (num - 1) == 0 holds for 0 too."),
        Mistake(lambda got, want, args: args[0] == 65536 and got,
                "the spec caps a split queue at 32768 entries."),
    ),
    hints=("virtio 1.x section 2.7: 'Queue Size value is always a power of 2', at most 32768.",
           "A power of two has one bit set: num & (num - 1) == 0, and num > 0."),
    solution="def queue_size_ok(num):\n    return 0 < num <= 32768 and num & (num - 1) == 0",
)


def _kick_reference(index, polling):
    return index | (0x100 if polling else 0)


L04_Q3 = Question(
    name="q3", title="SET_VRING_KICK's u64 payload", targets=("kick_payload",),
    reference=_kick_reference,
    cases=(Case("queue 1 with an eventfd", lambda: fixed(1, False)),
           Case("queue 0, polling (no fd)", lambda: fixed(0, True)),
           Case("queue 5, polling (no fd)", lambda: fixed(5, True))),
    mistakes=(
        Mistake(lambda got, want, args: args[1] and got == args[0] | 0x80,
                "bits 0-7 are the index; the no-fd flag is the next bit, bit 8 (0x100)."),
    ),
    hints=("vhost-user.rst, 'Ring states' and SET_VRING_KICK: bits 0-7 the index, bit 8 "
           "'no fd' (VHOST_USER_VRING_NOFD_MASK).",),
    solution="def kick_payload(index, polling):\n    return index | (0x100 if polling else 0)",
)

LAB04 = Exercise("lab04", "Lab 04: virtqueues", (L04_Q1, L04_Q2, L04_Q3))
