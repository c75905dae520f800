"""Walking descriptor chains and returning them: the pieces both kernels share.

A burst starts with :func:`burst_start`: :func:`map_ring` (the three areas,
checked against the memory table every time) and :func:`avail_ready`
(avail->idx, with acquire). Guest memory goes around as ``mem``, the uint8
array with its uint16/32/64 views (:func:`guest_views`). Each chain starts at
:func:`avail_head`. A chain is walked with a cursor (a
tuple of ints, see below), the way rust-vmm's DescriptorChain is an iterator
with a TTL. :func:`chain_next` reads one descriptor, copies its four fields
into locals *once* (the guest can rewrite it at any time), checks them,
follows INDIRECT into a table, and returns the next buffer as ``(status, host
offset, gpa, len, cursor)``. Its checks, in order (what libvhost-user, DPDK's
fill_vec_buf_split and rust-vmm do; :func:`check_indirect` and
:func:`check_buffer`):

1. INDIRECT: not inside an indirect table, not together with NEXT, len a
   non-zero multiple of 16 (at most 65536 entries), table 16-byte aligned and
   inside one region;
2. len != 0;
3. the WRITE flag matches the direction (TX chains are device-readable, RX
   chains device-writable);
4. [addr, addr + len) inside one mapped region;
5. the chain's total length fits in a u32;
6. with NEXT: next < the table's size, and the chain is no longer than its
   table (a longer one loops).

:func:`put_used_elem` fills used-ring slots; :func:`publish_used` ends a
burst: used->idx with release, the dirty log of the used ring, avail_event,
and whether the driver wants an interrupt.

Each function has a twin ``<name>_py``. Where the two differ only in the
helpers they call, the twin is the kernel's own code run by the interpreter
(``cache.twin``); where they touch guest memory, the twin reads and writes a
memoryview with ``struct``.

Speed: :func:`chain_next` is inlined into the kernels by numba
(``inline="always"``), so LLVM optimizes each kernel's loop as one piece, and
the kernels hand it *borrowed* arrays (``atomics.borrow``): numba would
otherwise count references to every array it passes around, atomically, per
descriptor, which costs more than walking the descriptor (measured: 6 million
descriptors/s with counting, 33 without, 77 once inlined).
"""
from __future__ import annotations

import struct

import numpy as np
from numba import njit

from ..memory import gpa_to_host, gpa_to_host_py
from .atomics import borrow, fence_seq_cst, load_acquire, load_relaxed, store_release
from .cache import twin
from .errors import (E_AVAIL_IDX, E_BUF_ADDR, E_CHAIN_LEN, E_DIRECTION, E_HEAD,
                     E_INDIRECT_ALIGN, E_INDIRECT_LEN, E_INDIRECT_NESTED, E_INDIRECT_NEXT,
                     E_LOG_RANGE, E_LOOP, E_NEXT, E_RING_ADDR, E_RING_ALIGN, E_RING_NUM,
                     E_ZERO_LEN, RING_OK)
from .layout import (INDIRECT_MAX_ENTRIES, VHOST_VRING_F_LOG, VIRTQUEUE_MAX_SIZE,
                     VRING_AVAIL_ALIGN, VRING_AVAIL_F_NO_INTERRUPT, VRING_DESC_ALIGN,
                     VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
                     VRING_USED_ALIGN, vring_need_event, vring_need_event_py)
from .log import vhost_log_write_count, vhost_log_write_count_py

# A cursor is a tuple (immutable: passing it costs nothing):
#   (table, size, table_gpa, next, count, head, total, index)
# table      host offset of the descriptor table being walked
# size       its number of entries (num, or an indirect table's len / 16)
# table_gpa  its GPA when it is an indirect table, else -1
# next       index of the next descriptor to read, -1 at the end
# count      descriptors taken from this table so far (the TTL)
# head       the chain's head
# total      bytes in the chain so far
# index      index of the descriptor chain_next returned last
CUR_TABLE, CUR_TABLE_GPA, CUR_NEXT, CUR_TOTAL, CUR_INDEX = 0, 2, 3, 6, 7
CHAIN_END = -1      # chain_next: no more buffers (not an error)
DESC_INDIRECT = -2  # chain_step: the cursor entered an indirect table

_U32_MAX = 0xFFFFFFFF
# Far past any log (MAX_LOG_SIZE covers 2**43 bytes), and far from int64 wrap.
_LOG_GUEST_ADDR_MAX = 1 << 62
_DESC = struct.Struct("<QIHH")
_U16 = struct.Struct("<H")
_USED_ELEM = struct.Struct("<II")


@njit(cache=True, nogil=True)
def copy_bytes(dst, dst_start, src, src_start, count):
    """dst[dst_start:dst_start + count] = src[src_start:src_start + count].

    The indices are unsigned on purpose: numba, like Python, wraps negative
    indices, and that per-byte check keeps LLVM from vectorizing the loop
    (a 64-byte copy goes from about 40 ns to 3 ns). Callers check bounds.
    """
    d, s = np.uint64(dst_start), np.uint64(src_start)
    for k in range(np.uint64(count)):
        dst[d + k] = src[s + k]


@njit(cache=True, nogil=True)
def fail(s, code, head, index, table, value, limit):
    """Record an error in ring state ``s`` (the first one wins); returns code."""
    if s["status"] == RING_OK:
        s["status"] = code
        s["err_head"], s["err_index"], s["err_table"] = head, index, table
        s["err_value"], s["err_limit"] = value, limit
    return code


fail_py = twin(fail)


@njit(cache=True, nogil=True)
def _ring_area(regions, s, which, gpa, size, align):
    if gpa % align:
        return fail(s, E_RING_ALIGN, -1, which, -1, gpa, align), 0
    host = gpa_to_host(regions, gpa, size)
    if host < 0:
        return fail(s, E_RING_ADDR, -1, which, -1, gpa, size), 0
    return RING_OK, host


_ring_area_py = twin(_ring_area, fail=fail_py, gpa_to_host=gpa_to_host_py)


@njit(cache=True, nogil=True)
def map_ring(regions, s):
    """Host offsets ``(status, desc, avail, used)`` of the ring's three areas.

    Checked on every burst: the memory table may have changed since
    SET_VRING_ADDR.
    """
    num = int(s["num"])
    if num < 1 or num > VIRTQUEUE_MAX_SIZE or num & (num - 1):
        return fail(s, E_RING_NUM, -1, -1, -1, num, VIRTQUEUE_MAX_SIZE), 0, 0, 0
    status, desc = _ring_area(regions, s, 0, int(s["desc"]), 16 * num, VRING_DESC_ALIGN)
    if status != RING_OK:
        return status, 0, 0, 0
    status, avail = _ring_area(regions, s, 1, int(s["avail"]), 6 + 2 * num,
                               VRING_AVAIL_ALIGN)
    if status != RING_OK:
        return status, 0, 0, 0
    status, used = _ring_area(regions, s, 2, int(s["used"]), 6 + 8 * num, VRING_USED_ALIGN)
    return status, desc, avail, used


map_ring_py = twin(map_ring, fail=fail_py, _ring_area=_ring_area_py)


@njit(cache=True, nogil=True, inline="always")
def guest_views(host, regions):
    """Guest memory and the region table as the kernels pass them around:
    ``mem = (host, h16, h32, h64)``, the uint8 array and its views as
    uint16/32/64, and ``regions``, all borrowed (``atomics.borrow``)."""
    mem = (borrow(host), borrow(host.view(np.uint16)), borrow(host.view(np.uint32)),
           borrow(host.view(np.uint64)))
    return mem, borrow(regions)


def guest_views_py(host, regions):
    """Twin of :func:`guest_views`: a memoryview of guest memory (``struct``
    reads it), and the region table as lists (``gpa_to_host_py``)."""
    return memoryview(host), regions.tolist()


@njit(cache=True, nogil=True)
def avail_ready(mem, s, avail):
    """How many avail entries wait: ``(status, ready)``.

    avail->idx is read with acquire: the ring entries and descriptors are read
    after it (2.7.13). It may run at most the queue size ahead of
    last_avail_idx.
    """
    last, num = s["last_avail_idx"], s["num"]
    avail_idx = np.int64(load_acquire(mem[1], (avail + 2) >> 1))
    ready = (avail_idx - last) & 0xFFFF
    if ready > num:
        return fail(s, E_AVAIL_IDX, -1, last, -1, avail_idx, num), 0
    return RING_OK, ready


def avail_ready_py(mv, s, avail):
    """Twin of :func:`avail_ready`."""
    last, num = int(s["last_avail_idx"]), int(s["num"])
    avail_idx = _U16.unpack_from(mv, avail + 2)[0]        # acquire in the kernel
    ready = (avail_idx - last) & 0xFFFF
    if ready > num:
        return fail_py(s, E_AVAIL_IDX, -1, last, -1, avail_idx, num), 0
    return RING_OK, ready


@njit(cache=True, nogil=True, inline="always")
def burst_start(host, regions, s):
    """Map the ring and see how many avail entries wait:
    ``(status, mem, regions, desc, avail, used, ready)``, ``mem`` and
    ``regions`` as :func:`guest_views` gives them."""
    mem, regions = guest_views(host, regions)
    status, desc, avail, used = map_ring(regions, s)
    ready = 0
    if status == RING_OK:
        status, ready = avail_ready(mem, s, avail)
    return status, mem, regions, desc, avail, used, ready


burst_start_py = twin(burst_start, guest_views=guest_views_py, map_ring=map_ring_py,
                      avail_ready=avail_ready_py)


@njit(cache=True, nogil=True, inline="always")
def avail_head(mem, s, avail, position):
    """The chain head in avail.ring[position % num]: ``(status, head)``."""
    num = s["num"]
    slot = position & (num - 1)
    head = np.int64(mem[1][((avail + 4) >> 1) + slot])
    if head >= num:
        return fail(s, E_HEAD, -1, slot, -1, head, num), head
    return RING_OK, head


def avail_head_py(mv, s, avail, position):
    """Twin of :func:`avail_head`."""
    num = int(s["num"])
    slot = position & (num - 1)
    head = _U16.unpack_from(mv, avail + 4 + 2 * slot)[0]
    if head >= num:
        return fail_py(s, E_HEAD, -1, slot, -1, head, num), head
    return RING_OK, head


@njit(cache=True, nogil=True)
def over_budget(s):
    """Whether the burst may start no new chain: ``descs`` reached ``desc_budget``
    (the service's descriptor weight; a chain already started is finished)."""
    return s["desc_budget"] > 0 and s["descs"] >= s["desc_budget"]


def over_budget_py(s):
    """Twin of :func:`over_budget`."""
    return int(s["desc_budget"]) > 0 and int(s["descs"]) >= int(s["desc_budget"])


@njit(cache=True, nogil=True, inline="always")
def put_used_elem(mem, used, slot, head, length):
    """used->ring[slot] = {id: head, len: length} (published later)."""
    h32 = mem[2]
    elem = ((used + 4) >> 2) + 2 * slot
    h32[elem], h32[elem + 1] = head, length


def put_used_elem_py(mv, used, slot, head, length):
    """Twin of :func:`put_used_elem`."""
    _USED_ELEM.pack_into(mv, used + 4 + 8 * slot, head, length)


@njit(cache=True, nogil=True)
def chain_start(desc, num, head):
    """A cursor at the chain whose head is descriptor ``head``."""
    return (desc, num, -1, head, 1, head, 0, head)


chain_start_py = twin(chain_start)


@njit(cache=True, nogil=True)
def check_indirect(regions, addr, length, flags, table_gpa):
    """Checks 1 for an INDIRECT descriptor: ``(code, value, limit, table)``
    with ``table`` the host offset of its table when code is RING_OK."""
    if table_gpa >= 0:                          # 2.7.5.3.1: one level only
        return E_INDIRECT_NESTED, flags, 0, -1
    if flags & VRING_DESC_F_NEXT:               # 2.7.5.3.1: no NEXT with it
        return E_INDIRECT_NEXT, flags, 0, -1
    if length == 0 or length % 16 or length > 16 * INDIRECT_MAX_ENTRIES:
        return E_INDIRECT_LEN, length, 16 * INDIRECT_MAX_ENTRIES, -1
    if addr % VRING_DESC_ALIGN:
        return E_INDIRECT_ALIGN, addr, VRING_DESC_ALIGN, -1
    table = gpa_to_host(regions, addr, length)
    if table < 0:
        return E_BUF_ADDR, addr, length, -1
    return RING_OK, 0, 0, table


check_indirect_py = twin(check_indirect, gpa_to_host=gpa_to_host_py)


@njit(cache=True, nogil=True)
def check_buffer(regions, addr, length, flags, nxt, size, count, total, want_write):
    """Checks 2-6 for a buffer descriptor: ``(code, value, limit, host)``."""
    if length == 0:
        return E_ZERO_LEN, 0, 1, -1
    if ((flags & VRING_DESC_F_WRITE) != 0) != want_write:
        return E_DIRECTION, flags, VRING_DESC_F_WRITE if want_write else 0, -1
    host = gpa_to_host(regions, addr, length)
    if host < 0:
        return E_BUF_ADDR, addr, length, -1
    if total + length > _U32_MAX:
        return E_CHAIN_LEN, total + length, _U32_MAX, -1
    if flags & VRING_DESC_F_NEXT:
        if nxt >= size:
            return E_NEXT, nxt, size, -1
        if count >= size:
            return E_LOOP, count + 1, size, -1
    return RING_OK, 0, 0, host


check_buffer_py = twin(check_buffer, gpa_to_host=gpa_to_host_py)


@njit(cache=True, nogil=True, inline="always")
def chain_step(regions, s, cur, addr, length, flags, nxt, want_write):
    """Check the descriptor just read at the cursor's ``next`` (its four fields
    given) and move on: ``(status, host, cursor)``.

    status is RING_OK (a buffer at ``host``), DESC_INDIRECT (the cursor now
    walks the indirect table: read on), or an error code (recorded in ``s``).
    """
    table, size, table_gpa, i, count, head, total, _ = cur
    s["descs"] += 1                                 # the service's weight
    if flags & VRING_DESC_F_INDIRECT:
        code, value, limit, indirect = check_indirect(regions, addr, length, flags,
                                                      table_gpa)
        if code != RING_OK:
            return fail(s, code, head, i, table_gpa, value, limit), 0, cur
        return DESC_INDIRECT, 0, (indirect, length // 16, addr, 0, 1, head, total, i)
    code, value, limit, host = check_buffer(regions, addr, length, flags, nxt, size, count,
                                            total, want_write)
    if code != RING_OK:
        return fail(s, code, head, i, table_gpa, value, limit), 0, cur
    after = nxt if flags & VRING_DESC_F_NEXT else -1
    return RING_OK, host, (table, size, table_gpa, after, count + 1, head, total + length, i)


chain_step_py = twin(chain_step, check_indirect=check_indirect_py,
                     check_buffer=check_buffer_py, fail=fail_py)


@njit(cache=True, nogil=True, inline="always")
def chain_next(mem, regions, s, cur, want_write):
    """The chain's next buffer: ``(status, host, gpa, len, cursor)``.

    status is RING_OK, CHAIN_END, or an error code (recorded in ``s``).
    ``mem`` is guest memory as :func:`guest_views` gives it; ``cur`` comes
    from chain_start or the previous call.
    """
    _, h16, h32, h64 = mem
    while cur[CUR_NEXT] >= 0:
        d = cur[CUR_TABLE] + 16 * cur[CUR_NEXT]
        # Copy the descriptor once: every check and use below sees these values.
        addr = np.int64(load_relaxed(h64, d >> 3))
        length = np.int64(load_relaxed(h32, (d >> 2) + 2))
        flags = np.int64(load_relaxed(h16, (d >> 1) + 6))
        nxt = np.int64(load_relaxed(h16, (d >> 1) + 7))
        status, host, cur = chain_step(regions, s, cur, addr, length, flags, nxt, want_write)
        if status != DESC_INDIRECT:
            return status, host, addr, length, cur
    return CHAIN_END, 0, 0, 0, cur


def chain_next_py(mv, regions, s, cur, want_write):
    """Twin of :func:`chain_next`; ``mv`` is a memoryview of guest memory."""
    while cur[CUR_NEXT] >= 0:
        addr, length, flags, nxt = _DESC.unpack_from(mv, cur[CUR_TABLE] + 16 * cur[CUR_NEXT])
        if addr >= 1 << 63:
            addr -= 1 << 64        # the kernel keeps addresses in an int64
        status, host, cur = chain_step_py(regions, s, cur, addr, length, flags, nxt,
                                          want_write)
        if status != DESC_INDIRECT:
            return status, host, addr, length, cur
    return CHAIN_END, 0, 0, 0, cur


@njit(cache=True, nogil=True)
def log_used(log, s, first, n):
    """Log the used-ring writes of a burst at log_guest_addr + offset: ``n``
    elements from slot ``first``, used->idx, and avail_event with EVENT_IDX."""
    num, base = int(s["num"]), int(s["log_guest_addr"])
    if base < 0 or base > _LOG_GUEST_ADDR_MAX:      # base + offset must not wrap
        return fail(s, E_LOG_RANGE, -1, -1, -1, base, log.size)
    start = first & (num - 1)
    head_part = min(n, num - start)
    spans = ((base + 4 + 8 * start, 8 * head_part), (base + 4, 8 * (n - head_part)),
             (base + 2, 2), (base + 4 + 8 * num, 2 * int(s["event_idx"])))
    for gpa, length in spans:
        status, marked = vhost_log_write_count(log, gpa, length)
        if status != RING_OK:
            return fail(s, E_LOG_RANGE, -1, -1, -1, gpa, log.size)
        s["logged"] += marked
    return RING_OK


log_used_py = twin(log_used, fail=fail_py, vhost_log_write_count=vhost_log_write_count_py)


@njit(cache=True, nogil=True)
def publish_used(mem, log, s, avail, used, n):
    """Make ``n`` used elements (already written) visible, and take stock.

    Advances last_avail_idx and used_idx, stores used->idx with release
    (2.7.8), writes avail_event (EVENT_IDX), logs the used ring when
    VHOST_VRING_F_LOG is set and logging is on, decides whether the driver
    wants an interrupt (``call_pending``), and counts the avail entries still
    waiting (``avail_pending``). Returns RING_OK or E_LOG_RANGE.
    """
    h16 = mem[1]
    num = s["num"]
    status = RING_OK
    if n > 0:
        first = s["used_idx"]
        new = (first + n) & 0xFFFF
        store_release(h16, (used + 2) >> 1, new)
        s["used_idx"] = new
        s["last_avail_idx"] = (s["last_avail_idx"] + n) & 0xFFFF
        if s["event_idx"]:
            # avail_event: kick me once avail->idx passes last_avail_idx (2.7.10)
            h16[((used + 4) >> 1) + 4 * num] = s["last_avail_idx"]
        if log.size > 0 and s["flags"] & VHOST_VRING_F_LOG:
            status = log_used(log, s, first, n)
        # Our stores above must be visible before we read what the driver
        # wrote (used_event, flags, avail->idx): store-then-load needs a full
        # barrier, release/acquire do not order it.
        fence_seq_cst()
        if s["event_idx"]:
            old, valid = s["signalled_used"], s["signalled_used_valid"]
            s["signalled_used"], s["signalled_used_valid"] = new, 1
            used_event = np.int64(load_relaxed(h16, ((avail + 4) >> 1) + num))
            need = valid == 0 or vring_need_event(used_event, new, old)
        else:
            flags = np.int64(load_relaxed(h16, avail >> 1))
            need = (flags & VRING_AVAIL_F_NO_INTERRUPT) == 0
        if need:
            s["call_pending"] = 1
    avail_idx = np.int64(load_acquire(h16, (avail + 2) >> 1))
    s["avail_pending"] = (avail_idx - s["last_avail_idx"]) & 0xFFFF
    return status


def publish_used_py(mv, log, s, avail, used, n):
    """Twin of :func:`publish_used` (plain stores and loads, see atomics)."""
    num = int(s["num"])
    status = RING_OK
    if n > 0:
        first = int(s["used_idx"])
        new = (first + n) & 0xFFFF
        _U16.pack_into(mv, used + 2, new)                     # release in the kernel
        s["used_idx"] = new
        last = (int(s["last_avail_idx"]) + n) & 0xFFFF
        s["last_avail_idx"] = last
        if s["event_idx"]:
            _U16.pack_into(mv, used + 4 + 8 * num, last)      # avail_event
        if log.size > 0 and int(s["flags"]) & VHOST_VRING_F_LOG:
            status = log_used_py(log, s, first, n)
        if s["event_idx"]:                                    # (fence in the kernel)
            old, valid = int(s["signalled_used"]), int(s["signalled_used_valid"])
            s["signalled_used"], s["signalled_used_valid"] = new, 1
            used_event = _U16.unpack_from(mv, avail + 4 + 2 * num)[0]
            need = valid == 0 or vring_need_event_py(used_event, new, old)
        else:
            need = (_U16.unpack_from(mv, avail)[0] & VRING_AVAIL_F_NO_INTERRUPT) == 0
        if need:
            s["call_pending"] = 1
    avail_idx = _U16.unpack_from(mv, avail + 2)[0]            # acquire in the kernel
    s["avail_pending"] = (avail_idx - int(s["last_avail_idx"])) & 0xFFFF
    return status


@njit(cache=True, nogil=True, inline="always")
def burst_end(mem, log, s, avail, used, taken, frames, nbytes, status):
    """End a burst: count ``frames`` and ``nbytes``, and publish ``taken`` used
    elements (:func:`publish_used`). Returns the burst's status: its own error
    if it had one, else publish_used's."""
    s["frames"] += frames
    s["bytes"] += nbytes
    published = publish_used(mem, log, s, avail, used, taken)
    return status if status != RING_OK else published


burst_end_py = twin(burst_end, publish_used=publish_used_py)
