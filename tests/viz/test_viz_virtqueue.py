"""The virtqueue view, drawn from a real ring in memfd guest memory.

The guest side writes the ring with the ring layer's driver helpers; the
device side is the ring layer's Virtqueue, which takes chains with the real
TX kernel.
"""
from __future__ import annotations

import html
import re

import numpy as np
import pytest

from vhostlab.memory import GuestMemory
from vhostlab.ring.arena import FrameArena
from vhostlab.ring.driver import VirtqueueDriver
from vhostlab.ring.virtqueue import Virtqueue
from vhostlab.viz import VirtqueueView
from vhostlab.viz.virtqueue import ring_snapshot

RING = 0x200000
BUF = 0x400000


def _text(page: str) -> str:
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", page)))


@pytest.fixture
def memory():
    mem = GuestMemory.allocate(16 << 20)
    yield mem
    mem.close()


def _device(drv: VirtqueueDriver, memory: GuestMemory, index: int = 1) -> Virtqueue:
    vq = Virtqueue(index, "tx")
    vq.set_num(drv.num)
    vq.set_base(0)
    vq.set_addr(drv.desc_gpa, drv.avail_gpa, drv.used_gpa, memory=memory)
    return vq


def test_256_entry_table_shows_every_descriptor_and_chain_order(memory):
    drv = VirtqueueDriver(memory, 256, RING)
    chains = []
    for k in range(80):                       # 80 chains of 3 descriptors: 240 in use
        segs = [(BUF + 0x1000 * (3 * k + j), 100 + 3 * k + j, j == 2) for j in range(3)]
        chains.append((drv.add_buffer(segs), segs))
    drv.publish()
    page = VirtqueueView(drv, max_chains=256).to_html()
    text = _text(page)
    snap = ring_snapshot(drv)
    rows = re.findall(r"<tr[^>]*><td><span[^>]*>(\d+)</span></td><td>(0x[0-9a-f]+)</td>"
                      r"<td>(\d+)</td>", page)
    assert len(rows) == 256                    # every row of the table, none dropped
    for i, addr, length in rows:
        d = snap.desc[int(i)]
        assert (int(addr, 16), int(length)) == (int(d["addr"]), int(d["len"]))
    for head, segs in chains:
        order = [head]
        while snap.desc[order[-1]]["flags"] & 1:
            order.append(int(snap.desc[order[-1]]["next"]))
        assert f"head {head}: {' → '.join(map(str, order))}" in text
        assert [(int(snap.desc[i]["addr"]), int(snap.desc[i]["len"])) for i in order] \
            == [(gpa, n) for gpa, n, _w in segs]
    assert "avail.idx 80" in text and "used.idx 0" in text
    assert "WRITE" in text and "NEXT" in text
    del snap, drv


def test_device_pointers_follow_the_tx_kernel(memory):
    drv = VirtqueueDriver(memory, 8, RING)
    for k in range(3):
        memory.write(BUF + 0x1000 * k, bytes(10) + bytes([k]) * 60)
        drv.add_buffer([(BUF + 0x1000 * k, 70, False)])
    drv.publish()
    vq = _device(drv, memory)
    view = VirtqueueView(drv, state=vq)        # the driver's memory, the device's counters
    before = _text(view.to_html())
    assert "last_avail_idx 0 (3 waiting for the device)" in before
    arena = FrameArena(1 << 16, 8)
    taken = vq.tx_burst(memory, arena, hdr_len=10)
    assert taken == 3
    after = _text(view.to_html())              # same view object, read again
    assert "last_avail_idx 3 (0 waiting for the device)" in after
    assert "used.idx 3" in after
    assert "driver's last used 0 (3 not yet reaped)" in after
    assert "(taken)" in after and "(pending)" not in after
    # used ring slots carry {id, len}: the head, and 0 bytes written (TX)
    assert "1: 1/0" in after and "2: 2/0" in after
    # From the device's side alone, mapping the ring at the GPAs it holds.
    device_side = _text(VirtqueueView(vq, memory=memory).to_html())
    assert "virtqueue 1" in device_side and "last_avail_idx 3" in device_side
    drv.get_used()
    assert "driver's last used 3 (0 not yet reaped)" in _text(view.to_html())
    del drv


def test_hostile_chains_are_drawn_with_their_problem(memory):
    drv = VirtqueueDriver(memory, 8, RING)
    loop = drv.add_buffer([(BUF, 64, False), (BUF + 64, 64, False)])
    wild = drv.add_buffer([(BUF + 0x1000, 64, False), (BUF + 0x2000, 64, False)])
    drv.publish()
    # The guest rewrites its descriptors: a loop, and a next past the table.
    second = int(drv.views.desc[loop]["next"])
    drv.views.desc[second]["flags"] = 1
    drv.views.desc[second]["next"] = loop
    drv.views.desc[wild]["next"] = 300
    text = _text(VirtqueueView(drv).to_html())
    assert f"head {loop}: {loop} → {second} → {loop} → {second}" in text
    assert "loop: chain longer than the queue size 8" in text
    assert f"head {wild}: {wild} next 300 out of range (queue size 8)" in text
    del drv


def test_broken_ring_shows_the_ring_layers_error(memory):
    drv = VirtqueueDriver(memory, 8, RING)
    drv.add_buffer([(BUF, 64, False)])
    drv.publish()
    drv.views.avail_idx[0] = 200               # a guest claiming 200 new entries in 8 slots
    vq = _device(drv, memory)
    arena = FrameArena(1 << 16, 8)
    with pytest.raises(Exception) as err:
        vq.tx_burst(memory, arena, hdr_len=10)
    page = VirtqueueView(drv, state=vq).to_html()
    assert "ring broken" in page
    assert html.escape(str(err.value)) in page
    del drv


def test_snapshot_copies_so_later_guest_writes_do_not_change_it(memory):
    drv = VirtqueueDriver(memory, 8, RING)
    drv.add_buffer([(BUF, 64, False)])
    drv.publish()
    snap = ring_snapshot(drv)
    drv.views.desc[0]["len"] = 999
    assert int(snap.desc[0]["len"]) == 64
    assert isinstance(snap.avail_ring, np.ndarray) and int(snap.avail_ring[0]) == 0
    del drv


def test_with_more_waiting_than_fit_the_next_chains_for_the_device_are_drawn(memory):
    drv = VirtqueueDriver(memory, 64, RING)
    for k in range(40):
        memory.write(BUF + 0x100 * k, bytes(70))
        drv.add_buffer([(BUF + 0x100 * k, 70, False)])
    drv.publish()
    vq = _device(drv, memory)
    assert vq.tx_burst(memory, FrameArena(1 << 16, 16), hdr_len=10, max_frames=12) == 12
    text = _text(VirtqueueView(drv, state=vq, max_chains=8).to_html())
    assert "last_avail_idx 12 (28 waiting for the device)" in text
    drawn = [int(n) for n in re.findall(r"avail\[(\d+)\] head \d+: [\d →]+ \(pending\)", text)]
    assert drawn == list(range(12, 20))
    assert "(taken)" not in text
    del drv
