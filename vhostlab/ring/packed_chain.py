"""Walking a packed ring's descriptor chains and returning them (virtio 2.8).

The packed kernels' counterpart of :mod:`.chain`, and built from its pieces:
the ring areas are checked by the same ``_ring_area`` (region and alignment,
on every burst), buffers by the same :func:`.chain.check_buffer` (len != 0,
WRITE matches the direction, inside one region, total fits a u32) and
indirect descriptors by the same :func:`.chain.check_indirect` (one level,
no NEXT with it, len a non-zero multiple of 16, aligned, inside one region).
What is new in a packed ring, and checked here:

1. A chain is contiguous in the ring from the device's position on, and
   wraps past the end (the wrap counter flips there). The first descriptor
   is available when its AVAIL bit equals the device's wrap counter and its
   USED bit does not (2.8.1); it is read with acquire, the rest after it.
   Every later descriptor of the chain must be available in its own lap too
   ("the driver MUST NOT make the first descriptor in the list available
   before all subsequent descriptors", 2.8.21.1): E_PACKED_FLAGS otherwise.
2. A chain of more than ``num`` ring descriptors would run into itself:
   E_LOOP.
3. The buffer id is the chain's last ring descriptor's (2.8.6); the device
   returns it, so it must be below the queue size: E_PACKED_ID.
4. An indirect table is walked in order, len / 16 entries; only WRITE counts
   in its entries (2.8.7: NEXT is ignored), INDIRECT in one is refused as in
   a split ring.

A cursor is a tuple of ints, as in :mod:`.chain`::

    (desc, num, pos, wrap, more, count, head, table, tsize, tnext, table_gpa,
     total, index, id)

``desc``/``num`` the ring, ``pos``/``wrap`` the next ring slot and its lap,
``more`` whether the chain goes on in the ring, ``count`` ring descriptors
taken, ``head`` the chain's first slot, ``table``/``tsize``/``tnext``/
``table_gpa`` the indirect table being walked (-1: none), ``total`` bytes so
far, ``index`` the descriptor returned last, ``id`` the buffer id.

The device returns each chain with one used descriptor at its own used
position: ``id``, ``len`` (bytes written), then ``flags`` with AVAIL = USED =
its wrap counter, stored with release so the driver never sees the flags
before id and len (2.8.21.1 / DPDK's vhost_flush_*_shadow_packed); the
position then moves on by the chain's ring descriptors. While logging, the
16 bytes written are marked in the dirty log at their GPA in the descriptor
ring (DPDK marks ``log_guest_addr + 16 * slot``, but QEMU passes the device
area's GPA as log_guest_addr, so the page that changed is the descriptor
ring's own).
"""
from __future__ import annotations

import struct
import warnings

import numpy as np
from numba import njit
from numba.core.errors import NumbaExperimentalFeatureWarning

from .atomics import fence_seq_cst, load_acquire, load_relaxed, store_release
from .cache import twin
from .chain import (CHAIN_END, DESC_INDIRECT, _ring_area, _ring_area_py, check_buffer,
                    check_buffer_py, check_indirect, check_indirect_py, fail, fail_py,
                    guest_views, guest_views_py)
from .errors import (E_INDIRECT_NESTED, E_LOG_RANGE, E_LOOP, E_PACKED_FLAGS, E_PACKED_ID,
                     E_RING_NUM, RING_OK)
from .layout import (VHOST_VRING_F_LOG, VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT,
                     vring_need_event, vring_need_event_py)
from .log import vhost_log_write_count, vhost_log_write_count_py
from .packed_layout import (VRING_PACKED_DESC_ALIGN, VRING_PACKED_EVENT_ALIGN,
                            VRING_PACKED_EVENT_FLAG_DESC, VRING_PACKED_EVENT_FLAG_DISABLE,
                            VRING_PACKED_EVENT_FLAG_ENABLE, VRING_PACKED_EVENT_SIZE,
                            VRING_PACKED_MAX_SIZE)

# The packed ring's state record is the split ring's plus the two wrap counters,
# appended, so the split helpers it shares (``fail``, ``_ring_area``, the log
# marking) read it at the same offsets. numba calls that record subtyping and
# warns about it at every compile; it is relied on here, and the warning would
# only clutter a learner's cell output.
warnings.filterwarnings("ignore", category=NumbaExperimentalFeatureWarning,
                        message=r"Record\(.*has been considered a subtype of Record")

# Cursor fields (see the module docstring).
P_DESC, P_NUM, P_POS, P_WRAP, P_MORE, P_COUNT, P_HEAD, P_TABLE, P_TSIZE, P_TNEXT, \
    P_TABLE_GPA, P_TOTAL, P_INDEX, P_ID = range(14)

_USED_BITS = (1 << 7) | (1 << 15)           # VRING_PACKED_DESC_F_AVAIL | _USED
_NOT_NEXT = ~VRING_DESC_F_NEXT
_DESC = struct.Struct("<QIHH")              # addr, len, id, flags
_USED = struct.Struct("<IHH")               # len, id, flags (from offset 8)
_U16 = struct.Struct("<H")
_EVENT = struct.Struct("<HH")               # off_wrap, flags


@njit(cache=True, nogil=True)
def packed_map_ring(regions, s):
    """Host offsets ``(status, desc, driver, device)`` of the descriptor ring
    and the two event areas, checked on every burst (the memory table may have
    changed since SET_VRING_ADDR), and the device's positions inside the ring."""
    num = int(s["num"])
    if num < 1 or num > VRING_PACKED_MAX_SIZE or s["last_avail_idx"] >= num \
            or s["used_idx"] >= num:
        return fail(s, E_RING_NUM, -1, -1, -1, num, VRING_PACKED_MAX_SIZE), 0, 0, 0
    status, desc = _ring_area(regions, s, 0, int(s["desc"]), 16 * num,
                              VRING_PACKED_DESC_ALIGN)
    if status != RING_OK:
        return status, 0, 0, 0
    status, driver = _ring_area(regions, s, 1, int(s["avail"]), VRING_PACKED_EVENT_SIZE,
                                VRING_PACKED_EVENT_ALIGN)
    if status != RING_OK:
        return status, 0, 0, 0
    status, device = _ring_area(regions, s, 2, int(s["used"]), VRING_PACKED_EVENT_SIZE,
                                VRING_PACKED_EVENT_ALIGN)
    return status, desc, driver, device


packed_map_ring_py = twin(packed_map_ring, fail=fail_py, _ring_area=_ring_area_py)


@njit(cache=True, nogil=True, inline="always")
def packed_burst_start(host, regions, s):
    """Map the ring: ``(status, mem, regions, desc, driver, device)``, ``mem`` and
    ``regions`` as :func:`.chain.guest_views` gives them."""
    mem, regions = guest_views(host, regions)
    status, desc, driver, device = packed_map_ring(regions, s)
    return status, mem, regions, desc, driver, device


packed_burst_start_py = twin(packed_burst_start, guest_views=guest_views_py,
                             packed_map_ring=packed_map_ring_py)


@njit(cache=True, nogil=True, inline="always")
def is_avail(flags, wrap):
    """AVAIL == wrap and USED != wrap: available in the lap ``wrap`` (2.8.1)."""
    return ((flags >> 7) & 1) == wrap and ((flags >> 15) & 1) != wrap


is_avail_py = twin(is_avail)


@njit(cache=True, nogil=True, inline="always")
def packed_desc_avail(mem, desc, pos, wrap):
    """Whether a chain starts at ring slot ``pos``: its flags, read with acquire
    (the rest of the chain is read after them)."""
    flags = np.int64(load_acquire(mem[1], ((desc + 16 * pos) >> 1) + 7))
    return is_avail(flags, wrap)


def packed_desc_avail_py(mv, desc, pos, wrap):
    """Twin of :func:`packed_desc_avail`."""
    return is_avail_py(_U16.unpack_from(mv, desc + 16 * pos + 14)[0], wrap)


@njit(cache=True, nogil=True)
def packed_chain_start(desc, num, pos, wrap):
    """A cursor at the chain whose first descriptor is ring slot ``pos``."""
    return (desc, num, pos, wrap, 1, 0, pos, -1, 0, 0, -1, 0, pos, 0)


packed_chain_start_py = twin(packed_chain_start)


@njit(cache=True, nogil=True, inline="always")
def _ring_advance(cur, more, bid, table, tsize, table_gpa, length):
    """The cursor past the ring descriptor at ``pos`` (``length`` bytes more)."""
    desc, num, pos, wrap, _, count, head, _, _, _, _, total, _, _ = cur
    nxt, nwrap = pos + 1, wrap
    if nxt == num:                          # past the end: the next lap
        nxt, nwrap = 0, wrap ^ 1
    return (desc, num, nxt, nwrap, more, count + 1, head, table, tsize, 0, table_gpa,
            total + length, pos, bid)


_ring_advance_py = twin(_ring_advance)


@njit(cache=True, nogil=True, inline="always")
def _ring_check(s, cur, flags):
    """Checks 1-2 before a ring descriptor is taken: RING_OK or the error."""
    count, head, pos = cur[P_COUNT], cur[P_HEAD], cur[P_POS]
    if count >= cur[P_NUM]:
        return fail(s, E_LOOP, head, pos, -1, count + 1, cur[P_NUM])
    if count > 0 and not is_avail(flags, cur[P_WRAP]):
        return fail(s, E_PACKED_FLAGS, head, pos, -1, flags, cur[P_WRAP])
    return RING_OK


_ring_check_py = twin(_ring_check, fail=fail_py, is_avail=is_avail_py)


@njit(cache=True, nogil=True, inline="always")
def packed_step(regions, s, cur, addr, length, flags, bid, want_write):
    """Check the descriptor just read at the cursor (an indirect table's entry
    ``tnext``, else ring slot ``pos``) and move on: ``(status, host, cursor)``.

    status is RING_OK (a buffer at ``host``), DESC_INDIRECT (the cursor now
    walks the indirect table: read on), or an error code (recorded in ``s``).
    """
    s["descs"] += 1                                 # the service's weight
    head, table, total = cur[P_HEAD], cur[P_TABLE], cur[P_TOTAL]
    if table >= 0:                                  # an entry of an indirect table
        i, tgpa, tsize = cur[P_TNEXT], cur[P_TABLE_GPA], cur[P_TSIZE]
        if flags & VRING_DESC_F_INDIRECT:
            return fail(s, E_INDIRECT_NESTED, head, i, tgpa, flags, 0), 0, cur
        code, value, limit, host = check_buffer(regions, addr, length, flags & _NOT_NEXT, 0,
                                                tsize, 0, total, want_write)
        if code != RING_OK:
            return fail(s, code, head, i, tgpa, value, limit), 0, cur
        return RING_OK, host, (cur[0], cur[1], cur[2], cur[3], cur[4], cur[5], head, table,
                               tsize, i + 1, tgpa, total + length, i, cur[P_ID])
    pos = cur[P_POS]
    status = _ring_check(s, cur, flags)
    if status != RING_OK:
        return status, 0, cur
    if flags & VRING_DESC_F_INDIRECT:
        code, value, limit, itable = check_indirect(regions, addr, length, flags, -1)
        if code != RING_OK:
            return fail(s, code, head, pos, -1, value, limit), 0, cur
        return DESC_INDIRECT, 0, _ring_advance(cur, 0, bid, itable, length // 16, addr, 0)
    code, value, limit, host = check_buffer(regions, addr, length, flags & _NOT_NEXT, 0,
                                            cur[P_NUM], 0, total, want_write)
    if code != RING_OK:
        return fail(s, code, head, pos, -1, value, limit), 0, cur
    return RING_OK, host, _ring_advance(cur, 1 if flags & VRING_DESC_F_NEXT else 0, bid, -1,
                                        0, -1, length)


packed_step_py = twin(packed_step, fail=fail_py, check_buffer=check_buffer_py,
                      check_indirect=check_indirect_py, _ring_check=_ring_check_py,
                      _ring_advance=_ring_advance_py)


@njit(cache=True, nogil=True, inline="always")
def packed_chain_end(s, cur):
    """The chain is walked: CHAIN_END, or E_PACKED_ID for a buffer id the
    driver cannot have (not below the queue size)."""
    if cur[P_ID] >= cur[P_NUM]:
        return fail(s, E_PACKED_ID, cur[P_HEAD], cur[P_INDEX], -1, cur[P_ID], cur[P_NUM])
    return CHAIN_END


packed_chain_end_py = twin(packed_chain_end, fail=fail_py)


@njit(cache=True, nogil=True, inline="always")
def _leave_table(cur):
    """The cursor past the end of its indirect table (an indirect descriptor
    has no NEXT, so the chain ends there)."""
    desc, num, pos, wrap, more, count, head, _, _, _, _, total, index, bid = cur
    return (desc, num, pos, wrap, more, count, head, -1, 0, 0, -1, total, index, bid)


_leave_table_py = twin(_leave_table)


@njit(cache=True, nogil=True, inline="always")
def packed_chain_next(mem, regions, s, cur, want_write):
    """The chain's next buffer: ``(status, host, gpa, len, cursor)``.

    status is RING_OK, CHAIN_END, or an error code (recorded in ``s``).
    Each descriptor's fields are copied once: every check and use sees them.
    """
    _, h16, h32, h64 = mem
    while True:
        if cur[P_TABLE] >= 0:
            if cur[P_TNEXT] >= cur[P_TSIZE]:
                cur = _leave_table(cur)
                continue
            d = cur[P_TABLE] + 16 * cur[P_TNEXT]
        elif cur[P_MORE]:
            d = cur[P_DESC] + 16 * cur[P_POS]
        else:
            return packed_chain_end(s, cur), 0, 0, 0, cur
        addr = np.int64(load_relaxed(h64, d >> 3))
        length = np.int64(load_relaxed(h32, (d >> 2) + 2))
        bid = np.int64(load_relaxed(h16, (d >> 1) + 6))
        flags = np.int64(load_relaxed(h16, (d >> 1) + 7))
        status, host, cur = packed_step(regions, s, cur, addr, length, flags, bid, want_write)
        if status != DESC_INDIRECT:
            return status, host, addr, length, cur


def packed_chain_next_py(mv, regions, s, cur, want_write):
    """Twin of :func:`packed_chain_next`; ``mv`` is a memoryview of guest memory."""
    while True:
        if cur[P_TABLE] >= 0:
            if cur[P_TNEXT] >= cur[P_TSIZE]:
                cur = _leave_table_py(cur)
                continue
            d = cur[P_TABLE] + 16 * cur[P_TNEXT]
        elif cur[P_MORE]:
            d = cur[P_DESC] + 16 * cur[P_POS]
        else:
            return packed_chain_end_py(s, cur), 0, 0, 0, cur
        addr, length, bid, flags = _DESC.unpack_from(mv, d)
        if addr >= 1 << 63:
            addr -= 1 << 64        # the kernel keeps addresses in an int64
        status, host, cur = packed_step_py(regions, s, cur, addr, length, flags, bid,
                                           want_write)
        if status != DESC_INDIRECT:
            return status, host, addr, length, cur


@njit(cache=True, nogil=True, inline="always")
def _skip_step(s, cur, flags, bid):
    """Take the ring descriptor at ``pos`` without reading its buffer:
    ``(status, cursor)``."""
    s["descs"] += 1
    status = _ring_check(s, cur, flags)
    if status != RING_OK:
        return status, cur
    return RING_OK, _ring_advance(cur, 1 if flags & VRING_DESC_F_NEXT else 0, bid, -1, 0, -1,
                                  0)


_skip_step_py = twin(_skip_step, _ring_check=_ring_check_py, _ring_advance=_ring_advance_py)


@njit(cache=True, nogil=True, inline="always")
def packed_chain_skip(mem, s, cur):
    """Walk the rest of the chain's ring descriptors without their buffers (a
    frame is in, or a TX chain is dropped): the device must still know where
    the chain ends, and its id. Returns ``(status, cursor)``, status CHAIN_END
    or an error."""
    h16 = mem[1]
    if cur[P_TABLE] >= 0:
        cur = _leave_table(cur)
    while cur[P_MORE]:
        d = cur[P_DESC] + 16 * cur[P_POS]
        flags = np.int64(load_relaxed(h16, (d >> 1) + 7))
        bid = np.int64(load_relaxed(h16, (d >> 1) + 6))
        status, cur = _skip_step(s, cur, flags, bid)
        if status != RING_OK:
            return status, cur
    return packed_chain_end(s, cur), cur


def packed_chain_skip_py(mv, s, cur):
    """Twin of :func:`packed_chain_skip`."""
    if cur[P_TABLE] >= 0:
        cur = _leave_table_py(cur)
    while cur[P_MORE]:
        d = cur[P_DESC] + 16 * cur[P_POS]
        bid, flags = struct.unpack_from("<HH", mv, d + 12)
        status, cur = _skip_step_py(s, cur, flags, bid)
        if status != RING_OK:
            return status, cur
    return packed_chain_end_py(s, cur), cur


@njit(cache=True, nogil=True, inline="always")
def write_used_desc(mem, d, bid, length, flags):
    """The used descriptor at host offset ``d``: len, id, then flags with release."""
    h16 = mem[1]
    mem[2][(d >> 2) + 2] = length
    h16[(d >> 1) + 6] = bid
    store_release(h16, (d >> 1) + 7, flags)


def write_used_desc_py(mv, d, bid, length, flags):
    """Twin of :func:`write_used_desc` (one plain store, see atomics)."""
    _USED.pack_into(mv, d + 8, length, bid, flags)


@njit(cache=True, nogil=True, inline="always")
def packed_put_used(mem, log, s, desc, bid, length, count):
    """Return a chain of ``count`` ring descriptors: its used descriptor at the
    device's used position, which moves on by ``count`` (flipping the used
    wrap counter past the end); logged while logging with VHOST_VRING_F_LOG.
    Returns RING_OK or E_LOG_RANGE."""
    slot, wrap, num = int(s["used_idx"]), int(s["used_wrap_counter"]), int(s["num"])
    write_used_desc(mem, desc + 16 * slot, bid, length, _USED_BITS if wrap else 0)
    nxt = slot + count
    if nxt >= num:
        nxt -= num
        s["used_wrap_counter"] = wrap ^ 1
    s["used_idx"] = nxt
    if log.size > 0 and s["flags"] & VHOST_VRING_F_LOG:
        gpa = int(s["desc"]) + 16 * slot
        status, marked = vhost_log_write_count(log, gpa, 16)
        if status != RING_OK:
            return fail(s, E_LOG_RANGE, -1, -1, -1, gpa, log.size)
        s["logged"] += marked
    return RING_OK


packed_put_used_py = twin(packed_put_used, write_used_desc=write_used_desc_py,
                          vhost_log_write_count=vhost_log_write_count_py, fail=fail_py)


@njit(cache=True, nogil=True, inline="always")
def read_event(mem, area):
    """An event suppression area's ``(off_wrap, flags)``, each read once."""
    h16 = mem[1]
    return (np.int64(load_relaxed(h16, area >> 1)),
            np.int64(load_relaxed(h16, (area >> 1) + 1)))


def read_event_py(mv, area):
    """Twin of :func:`read_event`."""
    return _EVENT.unpack_from(mv, area)


@njit(cache=True, nogil=True, inline="always")
def write_event_flags(mem, area, flags):
    """An event suppression area's flags = ``flags``."""
    mem[1][(area >> 1) + 1] = flags


def write_event_flags_py(mv, area, flags):
    """Twin of :func:`write_event_flags`."""
    _U16.pack_into(mv, area + 2, flags)


@njit(cache=True, nogil=True)
def packed_need_call(s, off_wrap, flags):
    """Does the driver want an interrupt for the used descriptors written since
    the last one (its event suppression area says ``off_wrap``, ``flags``)?

    ENABLE: yes; DISABLE: no; DESC (with EVENT_IDX): when the used position
    passed ``off_wrap`` (DPDK's vhost_vring_call_packed). Remembers the used
    position signalled.
    """
    num, new = int(s["num"]), int(s["used_idx"])
    old, valid = int(s["signalled_used"]), int(s["signalled_used_valid"])
    s["signalled_used"], s["signalled_used_valid"] = new, 1
    mode = flags & 3
    if mode != VRING_PACKED_EVENT_FLAG_DESC or not s["event_idx"]:
        return mode != VRING_PACKED_EVENT_FLAG_DISABLE
    if not valid:
        return True
    off = off_wrap & 0x7FFF
    if new <= old:
        old -= num
    if (off_wrap >> 15) != s["used_wrap_counter"]:
        off -= num
    return vring_need_event(off, new, old)


packed_need_call_py = twin(packed_need_call, vring_need_event=vring_need_event_py)


@njit(cache=True, nogil=True)
def packed_burst_end(mem, log, s, desc, driver, device, taken, frames, nbytes, status):
    """End a burst that returned ``taken`` chains: count ``frames`` and
    ``nbytes``; keep the device area at ENABLE so the driver kicks (written,
    and logged, only when the guest left something else there); decide
    whether the driver wants an interrupt (``call_pending``); note whether
    another chain waits (``avail_pending``). Returns the burst's status, or
    E_LOG_RANGE."""
    s["frames"] += frames
    s["bytes"] += nbytes
    _, dev_flags = read_event(mem, device)
    if dev_flags != VRING_PACKED_EVENT_FLAG_ENABLE:
        write_event_flags(mem, device, VRING_PACKED_EVENT_FLAG_ENABLE)
        if log.size > 0 and s["flags"] & VHOST_VRING_F_LOG:
            logged, marked = vhost_log_write_count(log, int(s["used"]), 4)
            if logged != RING_OK:
                status = fail(s, E_LOG_RANGE, -1, -1, -1, int(s["used"]), log.size)
            s["logged"] += marked
    if taken > 0:
        # Our flag stores must be visible before we read the driver's area:
        # store-then-load needs a full barrier.
        fence_seq_cst()
        off_wrap, flags = read_event(mem, driver)
        if packed_need_call(s, off_wrap, flags):
            s["call_pending"] = 1
    s["avail_pending"] = 1 if packed_desc_avail(
        mem, desc, int(s["last_avail_idx"]), int(s["avail_wrap_counter"])) else 0
    return status


packed_burst_end_py = twin(packed_burst_end, read_event=read_event_py,
                           write_event_flags=write_event_flags_py,
                           vhost_log_write_count=vhost_log_write_count_py, fail=fail_py,
                           fence_seq_cst=None, packed_need_call=packed_need_call_py,
                           packed_desc_avail=packed_desc_avail_py)
