"""Guest RX through the device: frames land in the guest's buffers behind a
virtio-net header, with MRG_RXBUF spanning chains, and the dirty log marks
exactly what was written. Every test runs with the kernel and its twin."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from test_datapath_support import net_hdr
from vhostlab.dirtylog import DirtyLog
from vhostlab.memory import GuestMemory
from vhostlab.ring import FrameArena, Virtqueue, VirtqueueDriver, vring_layout

IMPLS = ["numba", "python"]
MiB = 1 << 20
RING = 0x200000
BUFS = 0x300000


class RxRig:
    def __init__(self, num: int = 16, event_idx: bool = False) -> None:
        self.memory = GuestMemory.allocate(8 * MiB, layout="pc")
        self.layout = vring_layout(RING, num)
        self.driver = VirtqueueDriver(self.memory, num, RING, event_idx=event_idx)
        self.vq = Virtqueue(0, "rx")
        self.vq.set_num(num)
        self.vq.set_event_idx(event_idx)
        self.set_log_flags(0)

    def set_log_flags(self, flags: int, log_guest_addr: int | None = None) -> None:
        lga = self.layout.used if log_guest_addr is None else log_guest_addr
        self.vq.set_addr(self.layout.desc, self.layout.avail, self.layout.used, lga, flags,
                         memory=self.memory)

    def post(self, *sizes: int, segments: int = 1) -> list[int]:
        """Post one buffer per size (split in ``segments`` descriptors)."""
        gpas = []
        for k, size in enumerate(sizes):
            gpa = BUFS + k * 0x10000
            piece = -(-size // segments)
            parts = [(gpa + i * 0x1000, min(piece, size - i * piece), True)
                     for i in range(segments) if size - i * piece > 0]
            self.driver.add_buffer(parts)
            gpas.append(gpa)
        self.driver.publish()
        return gpas

    def close(self) -> None:
        self.driver.views = None
        self.driver = None
        self.memory.close()


@pytest.fixture
def rx():
    rig = RxRig()
    yield rig
    rig.close()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("hdr_len", [10, 12])
def test_frames_land_behind_a_zeroed_header(rx, impl, hdr_len):
    gpas = rx.post(1526, 1526, 1526)
    frames = [bytes([k + 1]) * (60 + 100 * k) for k in range(3)]
    arena = FrameArena.from_frames(frames)
    assert rx.vq.rx_burst(rx.memory, arena, hdr_len=hdr_len, impl=impl) == 3
    used = rx.driver.get_used()
    assert used == [(k, hdr_len + len(f)) for k, f in enumerate(frames)]
    for gpa, frame in zip(gpas, frames):
        assert rx.memory.read(gpa, hdr_len + len(frame)) == \
            net_hdr(1 if hdr_len == 12 else None, hdr_len) + frame
    assert (rx.vq.frames, rx.vq.bytes, rx.vq.dropped) == (3, sum(map(len, frames)), 0)
    assert rx.vq.take_call()


@pytest.mark.parametrize("impl", IMPLS)
def test_header_and_frame_across_small_descriptors(rx, impl):
    (gpa,) = rx.post(80, segments=16)                # 5-byte pieces: header spans 3
    frame = bytes(range(68))
    arena = FrameArena.from_frames([frame])
    assert rx.vq.rx_burst(rx.memory, arena, hdr_len=12, impl=impl) == 1
    written = b"".join(rx.memory.read(gpa + i * 0x1000, 5) for i in range(16))
    assert written == net_hdr(1, 12) + frame
    assert rx.driver.get_used() == [(0, 80)]


@pytest.mark.parametrize("impl", IMPLS)
def test_mrg_rxbuf_spans_chains_and_counts_them_in_num_buffers(rx, impl):
    gpas = rx.post(512, 512, 512, 512)
    big, small = bytes(range(256)) * 5, b"tail"      # 1280 + 12 -> 3 chains
    arena = FrameArena.from_frames([big, small])
    assert rx.vq.rx_burst(rx.memory, arena, hdr_len=12, mrg_rxbuf=True, impl=impl) == 2
    assert rx.driver.get_used() == [(0, 512), (1, 512), (2, 268), (3, 16)]
    stream = b"".join(rx.memory.read(g, n) for g, n in zip(gpas[:3], (512, 512, 268)))
    assert stream == net_hdr(3, 12) + big
    assert rx.memory.read(gpas[3], 16) == net_hdr(1, 12) + small


@pytest.mark.parametrize("impl", IMPLS)
def test_mrg_rxbuf_waits_when_the_frame_needs_more_buffers(rx, impl):
    rx.post(512, 512)
    arena = FrameArena.from_frames([b"a" * 100, b"b" * 2000])
    assert rx.vq.rx_burst(rx.memory, arena, hdr_len=12, mrg_rxbuf=True, impl=impl) == 1
    assert rx.driver.get_used() == [(0, 112)]       # the second chain stays available
    assert rx.vq.avail_pending == 1
    rx.post(*[1024] * 3)
    arena.drop_front(1)
    assert rx.vq.rx_burst(rx.memory, arena, hdr_len=12, mrg_rxbuf=True, impl=impl) == 1
    assert [n for _, n in rx.driver.get_used()] == [512, 1024, 476]


@pytest.mark.parametrize("impl", IMPLS)
def test_without_mrg_a_frame_too_big_is_dropped_and_the_chain_kept(rx, impl):
    rx.post(100, 1526)
    arena = FrameArena.from_frames([b"x" * 200, b"y" * 50])
    assert rx.vq.rx_burst(rx.memory, arena, hdr_len=10, impl=impl) == 2
    assert rx.driver.get_used() == [(0, 60)]        # "y" went into the 100-byte chain
    assert rx.vq.dropped == 1 and rx.vq.frames == 1 and rx.vq.avail_pending == 1


@pytest.mark.parametrize("impl", IMPLS)
def test_out_of_buffers_stops_the_burst(rx, impl):
    rx.post(1526)
    arena = FrameArena.from_frames([b"1" * 60, b"2" * 60])
    assert rx.vq.rx_burst(rx.memory, arena, impl=impl) == 1
    assert rx.vq.rx_burst(rx.memory, FrameArena.from_frames([b"3"]), impl=impl) == 0
    assert rx.vq.frames == 1 and not rx.vq.broken


@pytest.mark.parametrize("impl", IMPLS)
def test_empty_frames_take_a_chain_each(rx, impl):
    rx.post(64, 64)
    assert rx.vq.rx_burst(rx.memory, FrameArena.from_frames([b"", b""]), hdr_len=0,
                          impl=impl) == 2
    assert rx.driver.get_used() == [(0, 0), (1, 0)]


@pytest.mark.parametrize("impl", IMPLS)
def test_logging_marks_buffer_pages_and_the_used_ring(rx, impl):
    rx.set_log_flags(1)
    rx.post(1526)
    gpa = BUFS + 0x10000 - 20                        # a frame that crosses a page
    rx.driver.add_buffer([(gpa, 1526, True)])
    rx.driver.publish()
    with DirtyLog.allocate(rx.memory) as log:
        arena = FrameArena.from_frames([b"a" * 60, b"b" * 60])
        assert rx.vq.rx_burst(rx.memory, arena, hdr_len=12, log=log, impl=impl) == 2
        used_pages = {rx.layout.used // 4096}
        assert set(log.sync().tolist()) == {BUFS // 4096, gpa // 4096, gpa // 4096 + 1} | \
            used_pages
        rx.set_log_flags(0)
        rx.post(1526)
        assert rx.vq.rx_burst(rx.memory, FrameArena.from_frames([b"c"]), log=log,
                              impl=impl) == 1
        assert log.sync().tolist() == [BUFS // 4096]     # no F_LOG: buffers only
        rx.post(1526)
        assert rx.vq.rx_burst(rx.memory, FrameArena.from_frames([b"d"]), impl=impl) == 1
        assert log.popcount() == 0                        # no log given: logging off


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(1, 3000), min_size=1, max_size=6),
       frames=st.lists(st.integers(0, 4000), min_size=1, max_size=6),
       segments=st.integers(1, 4), mrg=st.booleans(), hdr_len=st.sampled_from([0, 10, 12]),
       impl=st.sampled_from(IMPLS), lga=st.sampled_from([None, 0x400FFE]))
def test_the_log_marks_exactly_the_pages_written(sizes, frames, segments, mrg, hdr_len,
                                                 impl, lga):
    """Buffers start as 0x55 and every byte the device writes differs from
    it (frames are 0xAA, the header 0 or num_buffers), so the pages written
    are the pages that changed, plus the used ring's when F_LOG is set."""
    rig = RxRig(num=32)
    try:
        rig.set_log_flags(1, lga)
        area = (BUFS, 6 * 0x10000)
        rig.memory.write(area[0], b"\x55" * area[1])
        rig.post(*sizes, segments=segments)
        with DirtyLog.allocate(rig.memory) as log:
            arena = FrameArena.from_frames([b"\xaa" * n for n in frames])
            rig.vq.rx_burst(rig.memory, arena, hdr_len=hdr_len, mrg_rxbuf=mrg,
                            log=log, impl=impl)
            changed = np.flatnonzero(rig.memory.view(*area) != 0x55) + area[0]
            expected = set((changed // 4096).tolist())
            published = len(rig.driver.get_used())
            if published:
                base = rig.layout.used if lga is None else lga
                expected |= {(base + 2) // 4096, (base + 3) // 4096, (base + 4) // 4096,
                             (base + 4 + 8 * published - 1) // 4096}
            assert set(log.sync().tolist()) == expected
    finally:
        rig.close()
