"""What bounds one burst whatever the guest writes: the TX chain limit (max_chain),
the descriptor budget (desc_budget), RX walking a chain only as far as its frame
goes; and the dirty-log bits the kernels count as they set them (logged)."""
from __future__ import annotations

import numpy as np
import pytest

from test_datapath_support import BUF_GPA, INDIRECT, NEXT, WRITE, Rig
from vhostlab.ring import FrameArena, vhost_log_write_count, vhost_log_write_count_py

IMPLS = ("numba", "python")
TABLE = 0x20000


@pytest.mark.parametrize("count", [vhost_log_write_count, vhost_log_write_count_py])
def test_log_writes_count_the_bits_they_set(count):
    log = np.zeros(4, np.uint8)
    assert count(log, 0, 3 * 4096) == (0, 3)
    assert count(log, 4096, 4096) == (0, 0)            # already dirty: not counted again
    log[0] = 0                                          # QEMU took the bits meanwhile
    assert count(log, 0, 5 * 4096) == (0, 5)
    assert count(log, 31 * 4096, 2 * 4096)[1] == 0      # past the log: refused, nothing set
    assert int(np.unpackbits(log).sum()) == 5


@pytest.mark.parametrize("impl", IMPLS)
def test_tx_chains_over_max_chain_are_dropped_not_copied(impl):
    rig = Rig(num=8, ram=4 << 20)
    try:
        rig.desc(0, BUF_GPA, 100)
        rig.desc(1, BUF_GPA, 3 << 20)                   # 3 MiB: over the limit
        rig.desc(2, BUF_GPA, 200)
        rig.offer(0, 1, 2)
        s = rig.vq.state[0]
        s["max_chain"] = 65535 + 12
        arena = FrameArena(1 << 20, 16)
        n = rig.vq.tx_burst(rig.memory, arena, hdr_len=12, impl=impl)
        assert n == 2 and list(arena.lengths[:2]) == [88, 188]
        assert rig.used() == [(0, 0), (1, 0), (2, 0)]  # all three returned
        assert (s["oversized"], s["oversized_head"], s["oversized_len"]) == (1, 1, 3 << 20)
        assert not rig.vq.broken
    finally:
        rig.close()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("direction", ["tx", "rx"])
def test_the_descriptor_budget_ends_a_burst_between_chains(impl, direction):
    """Chains behind 1024-entry indirect tables; a budget of 1500 descriptors
    lets the burst take two chains, and the rest waits for the next one."""
    entries = 1024
    rig = Rig(num=8, ram=4 << 20)
    w = WRITE if direction == "rx" else 0
    try:
        table = np.zeros(entries, [("a", "<u8"), ("l", "<u4"), ("f", "<u2"), ("n", "<u2")])
        table["a"], table["l"] = BUF_GPA, 1
        table["f"], table["n"] = w | NEXT, np.arange(1, entries + 1) & 0xFFFF
        table[-1]["f"] = w
        rig.memory.write(TABLE, table.tobytes())
        for i in range(4):
            rig.desc(i, TABLE, 16 * entries, INDIRECT)
        rig.offer(0, 1, 2, 3)
        s = rig.vq.state[0]
        s["desc_budget"] = 1500
        if direction == "tx":
            n = rig.vq.tx_burst(rig.memory, FrameArena(1 << 20, 16), impl=impl)
        else:
            n = rig.vq.rx_burst(rig.memory, FrameArena.from_frames([b"f" * (entries - 10)] * 4),
                                hdr_len=10, impl=impl)
        assert n == 2 and len(rig.used()) == 2
        assert s["descs"] == 2 * (entries + 1) and s["avail_pending"] == 2
    finally:
        rig.close()


@pytest.mark.parametrize("impl", IMPLS)
def test_rx_stops_walking_a_chain_once_the_frame_is_in(impl):
    """A 60-byte frame into a chain of 1024 buffers of 1 KiB: it fills the
    first, and the other 1023 are not read."""
    entries = 1024
    rig = Rig(num=8, ram=4 << 20)
    try:
        table = np.zeros(entries, [("a", "<u8"), ("l", "<u4"), ("f", "<u2"), ("n", "<u2")])
        table["a"], table["l"] = BUF_GPA, 1024
        table["f"], table["n"] = WRITE | NEXT, np.arange(1, entries + 1) & 0xFFFF
        table[-1]["f"] = WRITE
        rig.memory.write(TABLE, table.tobytes())
        rig.desc(0, TABLE, 16 * entries, INDIRECT)
        rig.offer(0)
        assert rig.vq.rx_burst(rig.memory, FrameArena.from_frames([b"f" * 60]), hdr_len=10,
                               impl=impl) == 1
        assert rig.used() == [(0, 70)]
        assert rig.vq.state[0]["descs"] == 2          # the indirect descriptor, one buffer
    finally:
        rig.close()
