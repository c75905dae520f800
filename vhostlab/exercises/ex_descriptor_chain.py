"""Exercise descriptor_chain: walk a descriptor chain the way a back-end must.

Each case builds a real split ring in real guest memory: a memfd laid out
like QEMU's pc machine (GuestMemory.allocate), plus one more region right
after it (an ADD_MEM_REG), a descriptor table written through the ring
layer's numpy views, frames written into guest buffers. The guest is hostile
in half the cases. For reading a frame, the right answer is what the
project's own TX datapath (``Virtqueue.tx_burst``) takes from the same ring.
"""
from __future__ import annotations

from ..errors import VhostlabError

import contextlib
from typing import Iterator

import numpy as np

from vhostlab.exercises.checks import Case, Exercise, Mistake, Question, Raises
from vhostlab.memory import GuestMemory
from vhostlab.ring.arena import FrameArena
from vhostlab.ring.layout import (VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
                                  vring_layout, vring_views)
from vhostlab.ring.virtqueue import Virtqueue

__all__ = ["EXERCISE", "SETUP", "guest_ring", "GuardedTable", "EndlessWalk", "RING_GPA",
           "EXTRA_REGION"]

RAM_SIZE = 4 << 20                 # pc layout: [0, 0xc0000) [0xe0000, 0xf0000) [0x100000, 4 MiB)
EXTRA_REGION = (RAM_SIZE, 1 << 20)  # a region right after RAM, as ADD_MEM_REG would add
RING_GPA = 0x200000
BUF_GPA = 0x300000
RESERVE = 64 << 20                 # address space for all regions (small: graders cap it)
NEXT, WRITE, INDIRECT = VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, VRING_DESC_F_INDIRECT

SETUP = '''\
from vhostlab.exercises import bind
from vhostlab.exercises.ex_descriptor_chain import guest_ring
from vhostlab.ring.layout import (VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT,
                                  VRING_DESC_F_WRITE, vring_layout, vring_views)

ex = bind("descriptor_chain", globals())'''

SOLUTION_WALK_CHAIN = '''\
def walk_chain(desc, head, num):
    """[(addr, len, flags), ...] of the chain at head; ValueError if hostile."""
    if not 0 <= head < num:
        raise ValueError(f"head={head}: not below the queue size {num}")
    chain, index = [], head
    while True:
        if len(chain) == num:
            raise ValueError(f"head={head}: more than {num} descriptors, a loop")
        d = desc[index]
        # copy each field once: the guest may rewrite the descriptor meanwhile
        addr, length = int(d["addr"]), int(d["len"])
        flags, nxt = int(d["flags"]), int(d["next"])
        if length == 0:
            raise ValueError(f"descriptor {index}: len=0")
        if flags & VRING_DESC_F_INDIRECT:
            raise ValueError(f"descriptor {index}: INDIRECT is not handled here")
        chain.append((addr, length, flags))
        if not flags & VRING_DESC_F_NEXT:
            return chain
        if nxt >= num:
            raise ValueError(f"descriptor {index}: next={nxt}, queue size {num}")
        index = nxt'''

SOLUTION_FIND_REGION = '''\
def find_region(regions, gpa, length):
    """Index of the region holding all of [gpa, gpa + length); ValueError if none."""
    if length <= 0:
        raise ValueError(f"length={length}: a buffer has at least one byte")
    for i, r in enumerate(regions):
        start, end = r.guest_phys_addr, r.guest_phys_addr + r.memory_size
        if start <= gpa < end:
            if gpa + length > end:
                raise ValueError(f"[{gpa:#x}, +{length:#x}) leaves region {i} at {end:#x}")
            return i
    raise ValueError(f"gpa={gpa:#x} is in no region")'''

SOLUTION_READ_FRAME = '''\
def read_frame(memory, desc, head, num, hdr_len):
    """The frame a TX chain carries, its virtio-net header stripped."""
    data = b""
    for addr, length, flags in walk_chain(desc, head, num):
        if flags & VRING_DESC_F_WRITE:
            raise ValueError(f"head={head}: a TX buffer must be device-readable")
        find_region(memory.regions, addr, length)
        data += memory.read(addr, length)
    if len(data) < hdr_len:
        raise ValueError(f"head={head}: {len(data)} bytes, less than the header")
    return data[hdr_len:]'''


class EndlessWalk(VhostlabError, RuntimeError):
    """A walk read the descriptor table far more often than any chain needs."""


class GuardedTable(np.ndarray):
    """A descriptor table view that counts reads by index and stops a walk
    that never ends (one that follows a loop the guest built) before it eats
    the machine's memory. Views and slices share the count."""

    def __array_finalize__(self, obj) -> None:
        self._budget = getattr(obj, "_budget", None)

    def __getitem__(self, key):
        budget = self._budget
        if budget is not None:
            budget[0] -= 1
            if budget[0] < 0:
                budget[0] = budget[1]   # let the learner look at the table afterwards
                raise EndlessWalk(
                    f"more than {budget[1]} reads of a {len(self)}-entry descriptor table: "
                    "the walk followed a loop the guest built")
        return super().__getitem__(key)


def guarded(desc: np.ndarray, reads: int) -> GuardedTable:
    table = desc.view(GuardedTable)
    table._budget = [reads, reads]
    return table


@contextlib.contextmanager
def guest_ring(descriptors: dict[int, tuple[int, int, int, int]], num: int = 8,
               buffers: dict[int, bytes] | None = None) -> Iterator[tuple]:
    """Guest memory with a split ring of `num` entries at RING_GPA.

    `descriptors` maps an index to (addr, len, flags, next), written into the
    descriptor table; `buffers` maps a GPA to bytes written there. Yields
    ``(memory, desc)``: the GuestMemory and the descriptor table's numpy view
    (fields addr, len, flags, next). Everything is unmapped afterwards.
    The table counts reads: a walk that reads it more than 64 * num + 1024
    times gets EndlessWalk instead of running forever.
    """
    memory = GuestMemory.allocate(RAM_SIZE, layout="pc", reserve=RESERVE)
    try:
        memory.allocate_region(*EXTRA_REGION)
        layout = vring_layout(RING_GPA, num)
        desc = vring_views(memory, num, layout.desc, layout.avail, layout.used).desc
        for index, entry in descriptors.items():
            desc[index] = entry
        desc = guarded(desc, 64 * num + 1024)
        for gpa, data in (buffers or {}).items():
            memory.write(gpa, data)
        yield memory, desc
    finally:
        desc = None
        memory.close()


def _solution(*codes: str) -> dict:
    ns = {"VRING_DESC_F_NEXT": NEXT, "VRING_DESC_F_WRITE": WRITE,
          "VRING_DESC_F_INDIRECT": INDIRECT}
    for code in codes:
        exec(code, ns)
    return ns


_REF = _solution(SOLUTION_WALK_CHAIN, SOLUTION_FIND_REGION)


# ---------------------------------------------------------------- Q1: walk_chain
def _walk(descs: dict, head: int, num: int = 8):
    @contextlib.contextmanager
    def setup():
        with guest_ring(descs, num) as (memory, desc):
            yield desc, head, num
    return setup


B = BUF_GPA
_THREE = {2: (B, 12, NEXT, 5), 5: (B + 0x100, 30, NEXT, 1), 1: (B + 0x200, 34, 0, 0)}
_FULL = {i: (B + 0x100 * i, 64, NEXT, i + 1) for i in range(7)} | {7: (B + 0x700, 64, 0, 0)}

Q1 = Question(
    name="q1", title="walk_chain: follow next, refuse what a hostile guest builds",
    targets=("walk_chain",), reference=_REF["walk_chain"],
    cases=(
        Case("a one-descriptor chain at head 0", _walk({0: (B, 76, 0, 0)}, 0)),
        Case("the chain 2 -> 5 -> 1", _walk(_THREE, 2),
             advice="Follow `next` while flags has VRING_DESC_F_NEXT; keep the order."),
        Case("a device-writable (RX) chain 7 -> 0", _walk(
            {7: (B, 12, WRITE | NEXT, 0), 0: (B + 0x100, 1514, WRITE, 0)}, 7)),
        Case("a descriptor whose `next` is 5 but whose NEXT flag is clear",
             _walk({0: (B, 64, 0, 5), 5: (B + 0x100, 64, 0, 0)}, 0)),
        Case("a chain of exactly num (8) descriptors, 0 -> 1 -> ... -> 7", _walk(_FULL, 0),
             advice="A chain may hold up to num descriptors; only a longer one is a loop."),
        Case("head 8 in a ring of 8", _walk({0: (B, 64, 0, 0)}, 8),
             expect=Raises(ValueError, why="Heads index the descriptor table: 0 <= head < num.")),
        Case("a `next` of 8 in a ring of 8", _walk({0: (B, 64, NEXT, 8)}, 0),
             expect=Raises(ValueError, why="Check next < num before you follow it.")),
        Case("the loop 3 -> 4 -> 3", _walk({3: (B, 64, NEXT, 4), 4: (B, 64, NEXT, 3)}, 3),
             expect=Raises(ValueError, why="Count the descriptors: more than num means a loop.")),
        Case("a descriptor that points at itself (6 -> 6)", _walk({6: (B, 64, NEXT, 6)}, 6),
             expect=Raises(ValueError, why="Count the descriptors: more than num means a loop.")),
        Case("a zero-length buffer in the middle of a chain",
             _walk({0: (B, 12, NEXT, 1), 1: (B, 0, NEXT, 2), 2: (B, 64, 0, 0)}, 0),
             expect=Raises(ValueError, why="len 0 is refused (libvhost-user, DPDK, rust-vmm).")),
        Case("an INDIRECT descriptor", _walk({0: (B, 32, INDIRECT, 0)}, 0),
             expect=Raises(ValueError, why="This exercise refuses INDIRECT descriptors.")),
    ),
    mistakes=(
        Mistake(lambda got, want, args: len(got) > len(want) and list(got[:len(want)]) == want,
                "you followed `next` after a descriptor whose NEXT flag was clear; `next` "
                "means something only when flags & VRING_DESC_F_NEXT."),
        Mistake(lambda got, want, args: list(got) == want[::-1],
                "the descriptors are there but reversed: keep the chain's order."),
        Mistake(lambda got, want, args: any(not isinstance(x, tuple) for x in got),
                "return a list of tuples of plain ints, (addr, len, flags), e.g. "
                "(int(d['addr']), int(d['len']), int(d['flags']))."),
    ),
    hints=(
        "desc[i] is one descriptor; desc[i]['addr'], ['len'], ['flags'], ['next'] are its "
        "fields. Read them into local variables once.",
        "Three index rules: 0 <= head < num, next < num, and no more than num descriptors "
        "in a chain (a longer chain can only be a loop).",
        "Refuse len == 0 and INDIRECT, and stop when flags & VRING_DESC_F_NEXT is 0.",
    ),
    solution=SOLUTION_WALK_CHAIN,
    own_work=(),
)


# ---------------------------------------------------------------- Q2: find_region
def _region(gpa: int, length: int):
    @contextlib.contextmanager
    def setup():
        with guest_ring({}) as (memory, _):
            yield memory.regions, gpa, length
    return setup


Q2 = Question(
    name="q2", title="find_region: a buffer lies inside one region, or it is refused",
    targets=("find_region",), reference=_REF["find_region"],
    cases=(
        Case("64 bytes at 0x1000 (region 0)", _region(0x1000, 64)),
        Case("the whole of region 1, [0xe0000, 0xf0000)", _region(0xE0000, 0x10000),
             advice="A range may end exactly at its region's end."),
        Case("0x40 bytes ending exactly at the end of region 2", _region(0x3FFFC0, 0x40),
             advice="end = guest_phys_addr + memory_size is the first byte *outside*."),
        Case("a buffer at the start of region 3 (added after RAM)", _region(0x400000, 0x800)),
        Case("0x41 bytes from 0x3fffc0: one byte into region 3", _region(0x3FFFC0, 0x41),
             expect=Raises(ValueError, why="Both regions are mapped, but they may sit far apart "
                                           "in the back-end's memory (CVE-2018-1059).")),
        Case("16 bytes at 0xc0000 (the hole below 1 MiB)", _region(0xC0000, 16),
             expect=Raises(ValueError, why="No region holds it.")),
        Case("32 bytes from 0xbfff0, running into the hole", _region(0xBFFF0, 0x20),
             expect=Raises(ValueError, why="The end of the range matters too.")),
        Case("1 byte past all memory (0x600000)", _region(0x600000, 1),
             expect=Raises(ValueError, why="No region holds it.")),
        Case("a zero-length buffer at 0x1000", _region(0x1000, 0),
             expect=Raises(ValueError, why="A buffer has at least one byte.")),
        Case("16 bytes at 2**64 - 8 (wraps around in C)", _region(2**64 - 8, 16),
             expect=Raises(ValueError, why="No region holds it.")),
    ),
    mistakes=(
        Mistake(lambda got, want, args: got == want + 1 or got == want - 1,
                "that is the neighbouring region: compare gpa against each region's "
                "[guest_phys_addr, guest_phys_addr + memory_size)."),
    ),
    hints=(
        "Each region r has r.guest_phys_addr and r.memory_size; it covers "
        "[r.guest_phys_addr, r.guest_phys_addr + r.memory_size).",
        "Find the region holding gpa, then check that gpa + length does not pass its end.",
        "Never accept a range because its first and last bytes are both mapped: they may be "
        "in two regions that the back-end mapped far apart.",
    ),
    solution=SOLUTION_FIND_REGION,
    own_work=(),
)


# ---------------------------------------------------------------- Q3: read_frame
def _frame(descs: dict, head: int, buffers: dict, hdr_len: int = 12, num: int = 8):
    @contextlib.contextmanager
    def setup():
        with guest_ring(descs, num, buffers) as (memory, desc):
            yield memory, desc, head, num, hdr_len
    return setup


def _tx_reference(memory, desc, head, num, hdr_len) -> bytes:
    """What the project's TX datapath takes from this ring for chain `head`."""
    layout = vring_layout(RING_GPA, num)
    views = vring_views(memory, num, layout.desc, layout.avail, layout.used)
    views.avail_ring[0] = head
    views.avail_idx[0] = 1
    vq = Virtqueue(1, "tx")
    vq.set_num(num)
    vq.set_base(0)
    vq.set_addr(layout.desc, layout.avail, layout.used, memory=memory)
    arena = FrameArena(1 << 16, 1)
    vq.tx_burst(memory, arena, hdr_len=hdr_len, impl="python")
    return bytes(arena.buf[arena.offsets[0]:arena.offsets[0] + arena.lengths[0]])


_HDR = bytes(12)
_ETH = bytes.fromhex("ffffffffffff" "525400123456" "0806") + bytes(range(46))   # 60 bytes
_SPLIT = {0: (B, 12, NEXT, 3), 3: (B + 0x100, 30, NEXT, 6), 6: (B + 0x200, 30, 0, 0)}
_SPLIT_BUFS = {B: _HDR, B + 0x100: _ETH[:30], B + 0x200: _ETH[30:]}

Q3 = Question(
    name="q3", title="read_frame: the bytes a guest transmits, checked all the way",
    targets=("read_frame",), reference=_tx_reference,
    cases=(
        Case("one buffer holding a 12-byte header and a 60-byte frame",
             _frame({0: (B, 72, 0, 0)}, 0, {B: _HDR + _ETH}),
             advice="Strip hdr_len bytes of virtio-net header from the front."),
        Case("the header in its own buffer, the frame split over two more",
             _frame(_SPLIT, 0, _SPLIT_BUFS),
             advice="Concatenate every buffer of the chain, in order, then strip the header."),
        Case("a legacy 10-byte header (hdr_len=10)",
             _frame({5: (B, 70, 0, 0)}, 5, {B: bytes(10) + _ETH}, hdr_len=10)),
        Case("a buffer in the hole at 0xc0000", _frame({0: (0xC0000, 72, 0, 0)}, 0, {}),
             expect=Raises(ValueError, why="Check every buffer with find_region first.")),
        Case("a buffer straddling the end of RAM into the next region",
             _frame({0: (0x3FFFE0, 72, 0, 0)}, 0, {}),
             expect=Raises(ValueError, why="Check every buffer with find_region first.")),
        Case("a device-writable buffer in a TX chain",
             _frame({0: (B, 12, NEXT, 1), 1: (B + 0x100, 60, WRITE, 0)}, 0, {}),
             expect=Raises(ValueError, why="The device only reads a TX chain: a WRITE "
                                           "buffer there is the guest breaking the rules.")),
        Case("an 8-byte chain with a 12-byte header", _frame({0: (B, 8, 0, 0)}, 0, {}),
             expect=Raises(ValueError, why="A chain shorter than its header is refused.")),
        Case("a chain that loops", _frame({0: (B, 72, NEXT, 0)}, 0, {B: _HDR + _ETH}),
             expect=Raises(ValueError, why="Use your walk_chain.")),
    ),
    mistakes=(
        Mistake(lambda got, want, args: len(got) == len(want) + args[4],
                "the virtio-net header is still in front of the frame: strip hdr_len bytes."),
        Mistake(lambda got, want, args: len(got) < len(want),
                "part of the frame is missing: read every buffer of the chain."),
        Mistake(lambda got, want, args: not isinstance(got, (bytes, bytearray)),
                "return bytes (memory.read returns bytes; concatenate them)."),
    ),
    hints=(
        "walk_chain gives the buffers; memory.read(addr, length) gives their bytes.",
        "Refuse a buffer with VRING_DESC_F_WRITE, and check each one with find_region "
        "(memory.regions) before reading it.",
        "The virtio-net header is the first hdr_len bytes of the whole chain, not of each "
        "buffer.",
    ),
    solution=SOLUTION_READ_FRAME,
    own_work=(),
)

EXERCISE = Exercise(name="descriptor_chain", title="Walk a descriptor chain safely",
                    questions=(Q1, Q2, Q3), setup=SETUP)
