"""DirtyLog: sizing like QEMU, marking exactly the pages written, syncing like
vhost_dev_sync_region, validation of SET_LOG_BASE, atomicity, no leaks."""
from __future__ import annotations

import os
import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numba import njit

from test_datapath_support import maps_lines, memfd_with, open_fds
from vhostlab.dirtylog import (MAX_LOG_SIZE, DirtyLog, LogRangeError, LogSizeError,
                               vhost_dev_sync_region, vhost_dev_sync_region_py,
                               vhost_get_log_size)
from vhostlab.memory import GuestMemory
from vhostlab.ring import vhost_log_write, vhost_log_write_py
from vhostlab.ring.atomics import load_acquire, store_release
from vhostlab.ring.errors import E_LOG_RANGE, RING_OK

MiB = 1 << 20


def test_log_size_matches_qemu_for_a_256m_pc_guest():
    with GuestMemory.allocate(256 * MiB, layout="pc") as mem:
        assert vhost_get_log_size(mem.regions) == 1024          # u64 chunks
        with DirtyLog.allocate(mem) as log:
            assert log.size == 8192 and log.pages == 65536      # SET_LOG_BASE mmap_size
            assert os.fstat(log.fd).st_size == 8192


def test_back_end_marks_what_the_front_end_syncs_through_one_memfd():
    with DirtyLog.allocate(8192) as front:
        back = DirtyLog.from_fd(front.fd, front.size, 0)
        back.mark_range(0x3000, 1)                 # page 3
        back.mark_range(0x10FFF, 2)                # pages 16 and 17
        assert front.popcount() == 3
        assert front.sync().tolist() == [3, 16, 17]
        assert front.popcount() == 0 and back.popcount() == 0
        back.close()


@settings(max_examples=150, deadline=None)
@given(gpa=st.integers(0, 70 * 4096), length=st.integers(0, 9 * 4096))
def test_mark_range_marks_exactly_the_pages_written(gpa, length):
    bitmap = np.zeros(10, np.uint8)                # 80 pages
    twin = bitmap.copy()
    status = vhost_log_write(bitmap, gpa, length)
    assert status == vhost_log_write_py(twin, gpa, length)
    assert np.array_equal(bitmap, twin)
    pages = set(range(gpa // 4096, (gpa + length - 1) // 4096 + 1)) if length else set()
    if pages and max(pages) >= 80:
        assert status == E_LOG_RANGE and not bitmap.any()     # nothing marked
    else:
        assert status == RING_OK
        marked = set(np.flatnonzero(np.unpackbits(bitmap, bitorder="little")).tolist())
        assert marked == pages


def test_marking_past_the_end_is_a_named_error_and_marks_nothing():
    with DirtyLog.allocate(8) as log:
        log.mark_page(63)
        with pytest.raises(LogRangeError, match="page 64 lies past the log"):
            log.mark_range(63 * 4096, 4097)
        with pytest.raises(LogRangeError):
            log.mark_range(-4096, 1)
        assert log.dirty_pages().tolist() == [63]


@pytest.mark.parametrize("impl", ["numba", "python"])
def test_sync_takes_a_gpa_range_and_clears_only_that(impl):
    with DirtyLog.allocate(64) as log:              # 512 pages, 8 chunks
        for page in (0, 63, 64, 200, 511):
            log.mark_page(page)
        snap = log.snapshot()
        assert log.sync(64 * 4096, 255 * 4096, impl=impl).tolist() == [64, 200]
        assert log.dirty_pages().tolist() == [0, 63, 511]
        assert np.unpackbits(snap).sum() == 5           # the snapshot is a copy
        assert log.sync(impl=impl).tolist() == [0, 63, 511]
        assert log.sync(impl=impl).size == 0


@settings(max_examples=60, deadline=None)
@given(words=st.lists(st.integers(0, (1 << 64) - 1), min_size=1, max_size=16),
       first=st.integers(0, 15), span=st.integers(0, 15))
def test_sync_kernel_equals_twin(words, first, span):
    a = np.array(words, np.uint64)
    b = a.copy()
    last = min(first + span, a.size - 1)
    out_a = np.zeros(64 * a.size, np.int64)
    out_b = out_a.copy()
    n = vhost_dev_sync_region(a, first, last, out_a)
    assert n == vhost_dev_sync_region_py(b, first, last, out_b)
    assert np.array_equal(out_a[:n], out_b[:n]) and np.array_equal(a, b)
    expected = [c * 64 + bit for c in range(first, last + 1) for bit in range(64)
                if int(words[c]) >> bit & 1]
    assert out_a[:n].tolist() == expected


@pytest.mark.parametrize("size, offset, file_size, words", [
    (0, 0, 4096, "mmap_size = 0x0"),
    (12, 0, 4096, "multiple of 8"),
    (MAX_LOG_SIZE + 8, 0, 4096, "mmap_size"),
    (4096, 8, 4096, r"mmap_offset 0x8 \+ mmap_size 0x1000 = 0x1008 exceeds the file size"),
    (8, 3, 4096, "mmap_offset = 0x3"),
    (8, (1 << 64) - 8, 4096, "exceeds the file size"),
])
def test_set_log_base_validation(size, offset, file_size, words):
    fd = memfd_with(file_size)
    try:
        with pytest.raises(LogSizeError, match=words):
            DirtyLog.from_fd(fd, size, offset)
    finally:
        os.close(fd)


def test_set_log_base_bad_fds():
    r, w = os.pipe()
    try:
        with pytest.raises(LogSizeError, match="not a regular file"):
            DirtyLog.from_fd(r, 8, 0)
    finally:
        os.close(r)
        os.close(w)
    with pytest.raises(LogSizeError, match="fstat failed"):
        DirtyLog.from_fd(10_000, 8, 0)


def test_a_log_at_an_offset_maps_the_right_bytes():
    fd = memfd_with(3 * 4096)
    try:
        with DirtyLog.from_fd(fd, 4096, 4096 + 64) as log:
            log.mark_page(0)
            assert os.pread(fd, 1, 4096 + 64) == b"\x01"
            assert os.pread(fd, 1, 4096 + 63) == b"\x00"
    finally:
        os.close(fd)


def test_close_leaks_nothing():
    fds_before = open_fds()
    log = DirtyLog.allocate(1 << 16)
    inode = os.fstat(log.fd).st_ino
    assert any(line.split()[4] == str(inode) for line in maps_lines())
    log.close()
    assert not any(line.split()[4] == str(inode) for line in maps_lines())
    assert open_fds() == fds_before
    with pytest.raises(Exception, match="closed"):
        log.mark_page(0)


@njit(nogil=True)
def _marker(bitmap, control, rounds):
    """Each round: wait until the syncer has taken the chunk, then mark its
    64 pages one by one (while the syncer keeps exchanging it)."""
    chunk = bitmap.view(np.uint64)
    for _ in range(rounds):
        while load_acquire(chunk, 0) != 0:
            pass
        for page in range(64):
            vhost_log_write(bitmap, page * 4096, 1)
    store_release(control, 0, np.uint64(1))


@njit(nogil=True)
def _syncer(bitmap, control, counts):
    chunk = bitmap.view(np.uint64)
    pages = np.empty(64, np.int64)
    while True:
        done = load_acquire(control, 0)
        n = vhost_dev_sync_region(chunk, 0, 0, pages)
        for k in range(n):
            counts[pages[k]] += 1
        if done:
            return


def test_marking_races_with_sync_and_loses_no_bit():
    """The back-end marks (atomic OR) while the front-end syncs (atomic
    exchange) the same 64-bit chunk, in two threads without the GIL: every
    mark must be taken by exactly one sync. (With plain read-modify-write
    instead of the atomics, bits are lost within a few rounds.)"""
    rounds = 3000
    bitmap = np.zeros(8, np.uint8)
    control = np.zeros(1, np.uint64)
    counts = np.zeros(64, np.int64)
    _marker(bitmap, control, 1)                        # compile outside the race
    _syncer(bitmap, control, counts)
    control[0], counts[:] = 0, 0
    syncer = threading.Thread(target=_syncer, args=(bitmap, control, counts))
    syncer.start()
    try:
        _marker(bitmap, control, rounds)
    finally:
        control[0] = 1
        syncer.join()
    assert counts.tolist() == [rounds] * 64
