"""Each packed-ring kernel equals its plain-Python twin on random packed rings,
valid and hostile: same status, same frame count, same arena, same guest memory
(used descriptors, buffers, headers, the device area), same ring state (wrap
counters included), same dirty-log bits."""
from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from test_datapath_twins import (REGION_A, REGION_B, TABLES, _outcome, addresses, lengths,
                                 memory)  # noqa: F401 (memory: a fixture)
from vhostlab.ring import (vring_packed_rx_burst, vring_packed_rx_burst_py,
                           vring_packed_tx_burst, vring_packed_tx_burst_py)
from vhostlab.ring.packed_layout import VRING_PACKED_STATE_DTYPE

NEXT, WRITE, INDIRECT, AVAIL, USED = 1, 2, 4, 1 << 7, 1 << 15
RING, DRIVER, DEVICE = 0x1000, 0x0F00, 0x0F04
BUFFERS = 0x3000
SETTINGS = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])


def _avail(wrap: int) -> int:
    return AVAIL if wrap else USED


flag_sets = st.sampled_from([0, NEXT, WRITE, WRITE | NEXT, INDIRECT, INDIRECT | NEXT,
                             INDIRECT | WRITE, 7])
pairs = st.sampled_from([0, AVAIL, USED, AVAIL | USED])


@st.composite
def valid_ring(draw, num, last, wrap, write, table_len):
    """Chains from slot ``last`` on (lap ``wrap``), each made available as the
    spec says; the slots after them are not available."""
    descs = [(0, 0, 0, (USED | AVAIL) if not wrap else 0)] * num     # used last lap
    pos, w, left = last, wrap, draw(st.integers(0, num))
    while left > 0:
        k = draw(st.integers(1, min(3, left)))
        bid = draw(st.integers(0, num - 1))
        indirect = table_len and k == 1 and draw(st.integers(0, 3)) == 0
        for j in range(k):
            more = NEXT if j < k - 1 else 0
            if indirect:
                d = (TABLES, 16 * table_len, bid, INDIRECT | _avail(w))
            else:
                d = (BUFFERS + 0x100 * draw(st.integers(0, 63)), draw(st.integers(1, 0x100)),
                     bid, write | more | _avail(w))
            descs[pos] = d
            pos += 1
            if pos == num:
                pos, w = 0, w ^ 1
        left -= k
    return descs


@st.composite
def table_entries(draw, count, write):
    return [(BUFFERS + 0x100 * draw(st.integers(0, 63)), draw(st.integers(1, 0x100)),
             draw(st.integers(0, 0xFFFF)), write | draw(st.sampled_from([0, NEXT])))
            for _ in range(count)]


@st.composite
def hostile(draw, num, count):
    return [(draw(addresses), draw(lengths), draw(st.integers(0, num + 1)),
             draw(flag_sets) | draw(pairs)) for _ in range(count)]


@st.composite
def corrupted(draw, descs, num):
    descs = list(descs)
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 1, 2]))):
        i = draw(st.integers(0, len(descs) - 1))
        field = draw(st.integers(0, 3))
        value = draw((addresses, lengths, st.integers(0, 0xFFFF),
                      st.builds(int.__or__, flag_sets, pairs))[field])
        descs[i] = tuple(value if k == field else v for k, v in enumerate(descs[i]))
    return descs


@st.composite
def scenarios(draw, rx: bool):
    num = draw(st.sampled_from([1, 2, 3, 5, 8, 16]))
    write = WRITE if rx else 0
    s = {"num": num, "rx": rx}
    s["last"], s["wrap"] = draw(st.integers(0, num - 1)), draw(st.integers(0, 1))
    if draw(st.integers(0, 3)):                 # mostly valid rings, a little broken
        table_len = draw(st.integers(1, 8))
        s["table"] = draw(corrupted(draw(table_entries(8, write)), num))
        s["descs"] = draw(corrupted(draw(valid_ring(num, s["last"], s["wrap"], write,
                                                    table_len)), num))
        s["used"] = (s["last"], s["wrap"])
    else:                                       # anything at all
        s["descs"] = draw(hostile(num, num))
        s["table"] = draw(hostile(num, 8))
        s["used"] = (draw(st.integers(0, num - 1)), draw(st.integers(0, 1)))
    s["event_idx"] = draw(st.booleans())
    s["signalled"] = (draw(st.integers(0, num - 1)), draw(st.integers(0, 1)))
    s["driver_event"] = (draw(st.integers(0, 0xFFFF)), draw(st.integers(0, 3)))
    s["device_flags"] = draw(st.sampled_from([0, 0, 1, 2]))
    s["log"] = draw(st.sampled_from([0, 1, 3, 8, 8]))       # bitmap bytes (0: off)
    s["flags"] = draw(st.integers(0, 1))                     # VHOST_VRING_F_LOG
    s["hdr_len"] = draw(st.sampled_from([0, 10, 12]))
    s["arena"] = draw(st.sampled_from([(64, 1), (512, 4), (4096, 16), (4096, 16), (4096, 2)]))
    s["max_chain"] = draw(st.sampled_from([0, 0, 0, 100, 300]))
    s["budget"] = draw(st.sampled_from([0, 0, 0, 1, 3]))
    if rx:
        s["frames"] = draw(st.lists(st.integers(0, 300), max_size=5,
                                    min_size=draw(st.sampled_from([0, 1, 1]))))
        s["mrg"] = draw(st.integers(0, 1))
    else:
        s["max_frames"] = draw(st.one_of(st.just(num), st.integers(-1, num + 1)))
    return s


def _pack(descs) -> bytes:
    return np.array(descs, dtype=[("a", "<u8"), ("l", "<u4"), ("i", "<u2"),
                                  ("f", "<u2")]).tobytes()


def _prepare(memory, s):
    """Write the scenario into guest memory; returns the kernel arguments."""
    num = s["num"]
    pattern = np.random.default_rng(num).integers(0, 256, REGION_A[1], np.uint8)
    memory.write(REGION_A[0], pattern.tobytes())
    memory.write(REGION_B[0], pattern[:REGION_B[1]].tobytes())
    memory.write(RING, _pack(s["descs"]))
    memory.write(TABLES, _pack(s["table"]))
    memory.write(DRIVER, np.array(s["driver_event"], "<u2").tobytes())
    memory.write(DEVICE, np.array([0, s["device_flags"]], "<u2").tobytes())
    state = np.zeros(1, VRING_PACKED_STATE_DTYPE)
    st_ = state[0]
    st_["num"], st_["desc"], st_["avail"], st_["used"] = num, RING, DRIVER, DEVICE
    st_["flags"], st_["event_idx"] = s["flags"], s["event_idx"]
    st_["last_avail_idx"], st_["avail_wrap_counter"] = s["last"], s["wrap"]
    st_["used_idx"], st_["used_wrap_counter"] = s["used"]
    st_["signalled_used"], st_["signalled_used_valid"] = s["signalled"]
    st_["max_chain"], st_["desc_budget"] = s["max_chain"], s["budget"]
    st_["err_head"] = st_["err_table"] = -1
    log = np.zeros(s["log"], np.uint8)
    capacity, max_frames = s["arena"]
    arena, offsets, lengths_ = (np.zeros(capacity, np.uint8), np.zeros(max_frames, np.int64),
                                np.zeros(max_frames, np.int64))
    host, table = memory.kernel_args()
    if s["rx"]:
        frames = s["frames"][:max_frames]
        pos = 0
        for k, size in enumerate(frames):
            size = min(size, capacity - pos)
            arena[pos:pos + size] = (np.arange(size) + 7 * k) % 251
            offsets[k], lengths_[k] = pos, size
            pos += size
        return (host, table, state, log, arena, offsets, lengths_, len(frames), s["hdr_len"],
                s["mrg"])
    return (host, table, state, log, arena, offsets, lengths_, s["hdr_len"], s["max_frames"])


def _run_both(memory, s, kernel, twin):
    args = _prepare(memory, s)
    fast = _outcome(memory, args, kernel(*args))
    args = _prepare(memory, s)
    slow = _outcome(memory, args, twin(*args))
    del args
    assert fast["result"] == slow["result"]
    for field in VRING_PACKED_STATE_DTYPE.names:
        assert fast["state"][0][field] == slow["state"][0][field], field
    for key in ("log", "arena", "offsets", "lengths"):
        assert np.array_equal(fast[key], slow[key]), key
    assert fast["memory"] == slow["memory"]
    return fast


@SETTINGS
@given(s=scenarios(rx=False))
def test_packed_tx_kernel_equals_its_twin(memory, s):
    out = _run_both(memory, s, vring_packed_tx_burst, vring_packed_tx_burst_py)
    status, n = out["result"]
    event(f"status {status}" + (", frames taken" if n else ""))
    state = out["state"][0]
    assert 0 <= n <= s["num"]
    assert 0 <= state["last_avail_idx"] < s["num"] and 0 <= state["used_idx"] < s["num"]
    assert state["status"] == status or status == 0


@SETTINGS
@given(s=scenarios(rx=True))
def test_packed_rx_kernel_equals_its_twin(memory, s):
    out = _run_both(memory, s, vring_packed_rx_burst, vring_packed_rx_burst_py)
    status, n = out["result"]
    event(f"status {status}" + (", frames written" if n else ""))
    assert 0 <= n <= len(s["frames"])


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(s=scenarios(rx=False))
def test_a_broken_packed_ring_returns_its_error_and_touches_nothing(memory, s):
    args = _prepare(memory, s)
    status, _ = vring_packed_tx_burst(*args)
    if status == 0:
        return
    before = memory.read(REGION_A[0], REGION_A[1])
    state = args[2].copy()
    assert vring_packed_tx_burst(*args) == (status, 0) == vring_packed_tx_burst_py(*args)
    assert memory.read(REGION_A[0], REGION_A[1]) == before
    assert args[2].tobytes() == state.tobytes()
