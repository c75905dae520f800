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
from hypothesis import given, settings
from hypothesis import strategies as st

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


ROW = (r"<tr[^>]*><td><span[^>]*>(\d+)</span></td><td>(0x[0-9a-f]+)</td><td>(\d+)</td>"
       r"<td>[^<]*</td><td>\d+</td><td>[^<]*</td><td>([^<]*)</td>")


def _rings(page: str) -> list[str]:
    return re.findall(r"<table class='ring'>.*?</table>", page)


def test_table_lists_the_descriptors_in_use_and_chains_in_order(memory):
    drv = VirtqueueDriver(memory, 256, RING)
    chains = []
    for k in range(80):                       # 80 chains of 3 descriptors: 240 in use
        segs = [(BUF + 0x1000 * (3 * k + j), 100 + 3 * k + j, j == 2) for j in range(3)]
        chains.append((drv.add_buffer(segs), segs))
    drv.publish()
    page = VirtqueueView(drv, max_chains=256, max_desc=256).to_html()
    text = _text(page)
    snap = ring_snapshot(drv)
    rows = re.findall(ROW, page)
    in_use = sorted(i for head, _segs in chains for i in range(head, head + 3))
    assert [int(i) for i, _a, _l, _s in rows] == in_use          # every one in use, in order
    for i, addr, length, state in rows:
        d = snap.desc[int(i)]
        assert (int(addr, 16), int(length)) == (int(d["addr"]), int(d["len"]))
        assert state == "in flight"            # published; no device state to say more
    assert "16 unused descriptors not shown" in text
    assert "240–255 not shown" in text
    for head, segs in chains:
        order = [head]
        while snap.desc[order[-1]]["flags"] & 1:
            order.append(int(snap.desc[order[-1]]["next"]))
        assert f"head {head}: {' → '.join(map(str, order))}" in text
        assert [(int(snap.desc[i]["addr"]), int(snap.desc[i]["len"])) for i in order] \
            == [(gpa, n) for gpa, n, _w in segs]
    assert "avail.idx 80" in text and "used.idx 0" in text
    assert "WRITE" in text and "NEXT" in text
    # The default view fits a notebook: 32 rows, and it says what it left out.
    small = VirtqueueView(drv).to_html()
    assert len(re.findall(ROW, small)) == 32
    assert "16 unused descriptors not shown; 208 more in use or recently used not shown " \
        "(max_desc 32)" in _text(small)
    del snap, drv


def test_rings_fit_a_notebook_and_fold_the_rows_nothing_points_at(memory):
    drv = VirtqueueDriver(memory, 256, RING)
    for k in range(4):
        drv.add_buffer([(BUF + 0x1000 * k, 64, False)])
    drv.publish()
    page = VirtqueueView(drv).to_html()
    avail, used = _rings(page)
    for ring in (avail, used):
        rows = re.findall(r"<tr[^>]*>(.*?)</tr>", ring)
        assert max(len(re.findall(r"<t[dh][ >]", r)) for r in rows) == 17   # slot + 16
        assert "slots 16–255 not shown: no pointer and no recent entry, all 0" in \
            _text(ring)
    assert "avail.ring[3] = 3" in avail and "▲ avail.idx" in avail
    assert "used.ring[0] = {id 0, len 0}" in used and "▲ used.idx" in used
    # Every slot, when asked for.
    whole = _rings(VirtqueueView(drv, ring_window=False, ring_columns=32).to_html())[0]
    assert len(re.findall(r"<tr><th>\d+</th>", whole)) == 8 and "not shown" not in whole
    del drv


def test_descriptors_from_the_top_of_the_table_are_listed_first():
    from vhostlab.frontend import BuiltinVirtioNetGuest
    guest = BuiltinVirtioNetGuest(16 << 20, 256)     # its driver hands out 255, 254, ... first
    try:
        assert guest.transmit([bytes(60)] * 3) == 3
        view = VirtqueueView(guest.queues[1], memory=guest.memory)
        page = view.to_html()
        assert sorted(guest.queues[1].inflight) == [253, 254, 255]
        assert [(int(i), st) for i, _a, _l, st in re.findall(ROW, page)] == \
            [(253, "pending"), (254, "pending"), (255, "pending")]
        rows = _text(page[page.index("descriptor table"):])
        assert rows.split(" desc addr len flags next chain state ")[1].startswith(
            "\u22ef 0\u2013252 not shown 253 ")
        assert "253 unused descriptors not shown" in rows
        assert "3 chains in flight" in _text(page)
        del page, view
    finally:
        guest.close()


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
    assert "last_used_idx 0 (the driver's; 3 not yet reaped)" in after
    assert "(taken)" in after and "(pending)" not in after
    # used ring slots carry {id, len}: the head, and 0 bytes written (TX)
    page = view.to_html()
    assert "used.ring[1] = {id 1, len 0}" in page and "used.ring[2] = {id 2, len 0}" in page
    states = dict((int(i), st) for i, _a, _l, st in re.findall(ROW, page))
    assert states == {0: "used, not reaped", 1: "used, not reaped", 2: "used, not reaped"}
    # From the device's side alone, mapping the ring at the GPAs it holds.
    device_side = _text(VirtqueueView(vq, memory=memory).to_html())
    assert "virtqueue 1" in device_side and "last_avail_idx 3" in device_side
    drv.get_used()
    page = view.to_html()
    assert "last_used_idx 3 (the driver's; 0 not yet reaped)" in _text(page)
    assert {st for *_x, st in re.findall(ROW, page)} == {"recently used"}
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


def test_entries_whose_heads_were_reused_are_listed_once_and_not_as_a_problem(memory):
    """The driver gets a chain back and reuses its head: the older avail entry has no
    chain of its own any more. That is how a ring works, so it is one muted line,
    not a red problem per entry."""
    drv = VirtqueueDriver(memory, 4, RING)
    vq = _device(drv, memory)
    for k in range(10):                        # one chain at a time: head reused each lap
        memory.write(BUF + 0x100 * k, bytes(70))
        drv.add_buffer([(BUF + 0x100 * k, 70, False)])
        drv.publish()
        assert vq.tx_burst(memory, FrameArena(1 << 16, 16), hdr_len=10, max_frames=4) == 1
        assert len(drv.pop_used()) == 1
    page = VirtqueueView(drv, state=vq).to_html()
    text = _text(page)
    assert "<span class='bad'>" not in page
    drawn = re.findall(r"avail\[(\d+)\] head (\d+): [\d →]+ \(taken\)", text)
    heads = [int(h) for _i, h in drawn]
    assert drawn and len(set(heads)) == len(heads)      # each head drawn once, newest
    assert [int(i) for i, _h in drawn][-1] == 9
    assert re.search(r"avail\[6\]\.\.avail\[\d\]: not drawn; the driver got these chains "
                     r"back and reused their heads", text), text
    del drv


@settings(max_examples=60, deadline=None)
@given(desc=st.binary(max_size=1024), avail=st.binary(max_size=134),
       used=st.binary(max_size=518), last_avail=st.integers(0, 0xFFFF),
       last_used=st.integers(0, 0xFFFF))
def test_any_guest_bytes_in_the_ring_render_within_bounds(desc, avail, used, last_avail,
                                                          last_used):
    memory = GuestMemory.allocate(4 << 20)
    try:
        drv = VirtqueueDriver(memory, 64, RING)
        memory.write(drv.desc_gpa, desc.ljust(1024, b"\0"))      # whatever the guest wrote
        memory.write(drv.avail_gpa, avail.ljust(134, b"\0"))     # flags, idx, ring
        memory.write(drv.used_gpa, used.ljust(518, b"\0"))       # flags, idx, ring
        drv.last_used_idx = last_used
        page = VirtqueueView(drv, state={"last_avail_idx": last_avail, "num": 64},
                             max_desc=8).to_html()
        rows = re.findall(ROW, page)
        assert len(rows) <= 8 and all(0 <= int(i) < 64 for i, *_ in rows)
        assert len(_rings(page)) == 2
        del drv
    finally:
        memory.close()
