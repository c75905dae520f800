"""The dirty bitmap image, drawn from a real dirty log marked by the kernels."""
from __future__ import annotations

import numpy as np
import pytest

from vhostlab.dirtylog import DirtyLog
from vhostlab.memory import GuestMemory
from vhostlab.ring.arena import FrameArena
from vhostlab.ring.driver import VirtqueueDriver
from vhostlab.ring.virtqueue import Virtqueue
from vhostlab.viz import LogBitmapView, decode_png
from vhostlab.viz.bitmap import EARLIER, NEVER, PADDING

PAGE = 4096


def _pixel(png: bytes, page: int, pages_per_pixel: int = 1) -> tuple:
    img = decode_png(png)
    p = page // pages_per_pixel
    return tuple(int(c) for c in img[p // 256, p % 256, :3])


@pytest.fixture
def log_256m():
    log = DirtyLog.allocate(8192)             # QEMU's log for 256 MiB: 65536 pages
    yield log
    log.close()


def test_65536_pages_render_as_256x256_with_the_marked_pages_coloured(log_256m):
    log = log_256m
    log.mark_range(0x100000, 1)               # page 256
    log.mark_range(0x500_0FF0, 0x20)          # crosses a page boundary: 0x5000, 0x5001
    view = LogBitmapView(log)
    png = view.png()
    img = decode_png(png)
    assert img.shape[:2] == (256, 256)
    marked = set(np.flatnonzero(np.unpackbits(log.snapshot(), bitorder="little")).tolist())
    assert marked == {256, 0x5000, 0x5001}
    for page in marked:
        assert _pixel(png, page) not in (NEVER, EARLIER, PADDING)
    for page in (0, 255, 257, 0x4FFF, 0x5002, 65535):
        assert _pixel(png, page) == NEVER
    page = view.to_html()
    assert "<b>3</b> of 65536 pages dirty" in page
    assert "0x100000-0x100fff" in page and "0x5000000-0x5001fff" in page
    assert "data:image/png;base64," in page


def test_the_view_reads_the_log_again_and_sees_rx_writes_logged_by_the_kernel(log_256m):
    log = log_256m
    mem = GuestMemory.allocate(16 << 20)
    try:
        drv = VirtqueueDriver(mem, 8, 0x200000)
        drv.add_buffer([(0x800000, 2048, True)])
        drv.publish()
        vq = Virtqueue(0, "rx")
        vq.set_num(8)
        vq.set_base(0)
        vq.set_addr(drv.desc_gpa, drv.avail_gpa, drv.used_gpa, memory=mem)
        view = LogBitmapView(log)
        assert "<b>0</b> of 65536" in view.to_html()
        assert vq.rx_burst(mem, FrameArena.from_frames([b"\xab" * 1000]), log=log) == 1
        # the frame went to page 0x800; the log now says so, and so does the view
        assert _pixel(view.png(), 0x800000 // PAGE) not in (NEVER, EARLIER)
        assert _pixel(view.png(), 0x801000 // PAGE) == NEVER
        assert "0x800000-0x800fff" in view.to_html()
        del drv
    finally:
        mem.close()


def test_rounds_colour_pages_by_how_often_they_were_dirtied():
    rounds = []
    log = DirtyLog.allocate(8192)
    try:
        for pages in ([10, 20, 30], [10, 20], [10, 40]):
            for p in pages:
                log.mark_page(p)
            bitmap = np.zeros(8192, np.uint8)
            for p in log.sync():              # what vhost_log_sync takes from the log
                bitmap[p // 8] |= 1 << (p % 8)
            rounds.append({"round": len(rounds) + 1, "pages_copied": len(pages),
                           "log_bitmap": bitmap})
    finally:
        log.close()
    png = LogBitmapView(rounds, round=2).png()
    hot, new, old, never = (_pixel(png, p) for p in (10, 40, 30, 50))
    assert old == EARLIER and never == NEVER      # 30: dirtied in round 1 only
    assert hot != new and hot not in (NEVER, EARLIER) and new not in (NEVER, EARLIER)
    assert sum(hot) < sum(new)                    # three rounds: darker than one
    # A middle round: 20 dirty again (2 rounds), 40 not yet dirtied.
    png = LogBitmapView(rounds, round=1).png()
    assert _pixel(png, 40) == NEVER and _pixel(png, 30) == EARLIER
    assert "round 2: <b>2</b> of 65536" in LogBitmapView({"rounds": rounds}, round=1).to_html()


def test_big_logs_are_binned_and_tiny_ones_padded():
    big = DirtyLog.allocate(1 << 15)              # 1 GiB of guest RAM: 262144 pages
    try:
        big.mark_page(262143)
        png = LogBitmapView(big).png()
        assert decode_png(png).shape[:2] == (256, 256)
        assert _pixel(png, 262143, pages_per_pixel=4) not in (NEVER, PADDING)
        assert "1 pixel = 4 pages" in LogBitmapView(big).to_html()
    finally:
        big.close()
    small = LogBitmapView(bytes([0x80]))        # 8 pages, page 7 dirty
    img = decode_png(small.png())
    assert img.shape[:2] == (1, 256)
    assert tuple(img[0, 8, :3]) == PADDING and tuple(img[0, 0, :3]) == NEVER
    assert tuple(img[0, 7, :3]) not in (NEVER, PADDING)


def test_a_log_for_64_gib_is_reduced_before_it_is_unpacked():
    log = DirtyLog.allocate(2 << 20)              # 16 Mi pages, past MAX_UNPACKED_PAGES
    try:
        log.mark_page(0)
        log.mark_page(16 * 2**20 - 1)
        view = LogBitmapView(log)
        data = view.data()
        assert data["bits"].size * data["per"] == 16 * 2**20 and data["per"] > 1
        page = view.to_html()
        assert "<b>2</b> of 16777216 pages dirty" in page
        assert "1 pixel = 256 pages" in page
        png = view.png()
        assert decode_png(png).shape[:2] == (256, 256)
        assert _pixel(png, 0) not in (NEVER, PADDING)
        assert _pixel(png, 16 * 2**20 - 1, pages_per_pixel=256) not in (NEVER, PADDING)
        assert _pixel(png, 8 * 2**20, pages_per_pixel=256) == NEVER
    finally:
        log.close()
