"""Each numba kernel equals its plain-Python twin on random rings, valid and
hostile: same status, same frame count, same arena, same guest memory (used
ring, buffers, headers), same ring state, same dirty-log bits."""
from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from test_datapath_support import INDIRECT, NEXT, WRITE, memfd_with
from vhostlab.memory import GuestMemory, GuestMemoryRegion
from vhostlab.ring import (VRING_STATE_DTYPE, vring_layout, vring_rx_burst,
                           vring_rx_burst_py, vring_tx_burst, vring_tx_burst_py)

REGION_A = (0x0, 0x10000)        # two adjacent regions from two memfds,
REGION_B = (0x10000, 0x4000)     # nothing mapped after 0x14000
RING = 0x1000
TABLES = 0x8000                  # indirect tables live here
BUFFERS = 0x3000
SETTINGS = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])


@pytest.fixture(scope="module")
def memory():
    fds = [memfd_with(REGION_A[1]), memfd_with(REGION_B[1])]
    mem = GuestMemory.from_table([
        (GuestMemoryRegion(REGION_A[0], REGION_A[1], 0x7F00_0000_0000, 0), fds[0]),
        (GuestMemoryRegion(REGION_B[0], REGION_B[1], 0x7F10_0000_0000, 0), fds[1])])
    for fd in fds:
        os.close(fd)
    yield mem
    mem.close()


addresses = st.one_of(
    st.integers(0, 63).map(lambda k: BUFFERS + 0x100 * k),          # buffers
    st.integers(0, 63).map(lambda k: BUFFERS + 0x100 * k),
    st.integers(0, 15).map(lambda k: TABLES + 16 * k),              # an indirect table
    st.integers(1, 0x40).map(lambda k: REGION_B[0] - k),            # straddling A and B
    st.integers(1, 0x40).map(lambda k: REGION_B[0] + REGION_B[1] - k),   # end of memory
    st.integers(0x14000, 0x20000),                                  # unmapped
    st.integers(1 << 63, (1 << 64) - 1),                            # negative as int64
    st.integers(0, (1 << 64) - 1))
lengths = st.one_of(st.integers(1, 0x100), st.integers(1, 0x100), st.sampled_from(
    [0, 16, 32, 48, 24, 0x40, 0xFFFFFFFF, 0x80000000]), st.integers(0, (1 << 32) - 1))
flag_sets = st.sampled_from([0, NEXT, WRITE, WRITE | NEXT, 0, NEXT, WRITE, WRITE | NEXT,
                             INDIRECT, INDIRECT | NEXT, INDIRECT | WRITE, 7])


@st.composite
def descriptors(draw, count, nexts):
    """Anything at all."""
    return [(draw(addresses), draw(lengths), draw(flag_sets), draw(st.integers(0, nexts)))
            for _ in range(count)]


@st.composite
def valid_descriptors(draw, count, write, table_len=0):
    """Chains that follow every rule: links only go forward (no loops), some
    descriptors point at the valid indirect table of ``table_len`` entries."""
    out = []
    for i in range(count):
        nxt = draw(st.integers(0, count - 1))
        linked = nxt > i and draw(st.booleans())
        if table_len and not linked and draw(st.integers(0, 3)) == 0:
            out.append((TABLES, 16 * table_len, INDIRECT, 0))
            continue
        out.append((BUFFERS + 0x100 * draw(st.integers(0, 63)), draw(st.integers(1, 0x100)),
                    write | (NEXT if linked else 0), nxt if linked else 0))
    return out


@st.composite
def corrupted(draw, descs, nexts):
    """Replace a few fields of a few descriptors with hostile values."""
    descs = list(descs)
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 1, 2]))):
        i = draw(st.integers(0, len(descs) - 1))
        field = draw(st.integers(0, 3))
        value = draw((addresses, lengths, flag_sets, st.integers(0, nexts))[field])
        descs[i] = tuple(value if k == field else v for k, v in enumerate(descs[i]))
    return descs


@st.composite
def scenarios(draw, rx: bool):
    num = draw(st.sampled_from([1, 2, 4, 8, 16]))
    write = WRITE if rx else 0
    s = {"num": num, "rx": rx}
    if draw(st.integers(0, 3)):                 # mostly valid rings, a little broken
        table_len = draw(st.integers(1, 8))
        s["table"] = draw(corrupted(draw(valid_descriptors(8, write)), 9))
        s["table"][:table_len] = draw(valid_descriptors(table_len, write))
        s["descs"] = draw(corrupted(draw(valid_descriptors(num, write, table_len)), num + 1))
        s["heads"] = draw(st.lists(st.integers(0, num - 1), min_size=num, max_size=num))
        s["ahead"] = draw(st.integers(1, num))
    else:                                       # anything at all
        s["descs"] = draw(descriptors(num, num + 1))
        s["table"] = draw(descriptors(8, 9))
        s["heads"] = draw(st.lists(st.integers(0, num + 1), min_size=num, max_size=num))
        s["ahead"] = draw(st.integers(0, num + 2))
    s["last"] = draw(st.integers(0, 0xFFFF))
    s["used_idx"] = draw(st.one_of(st.just(s["last"]), st.integers(0, 0xFFFF)))
    s["event_idx"] = draw(st.booleans())
    s["signalled"] = (draw(st.integers(0, 0xFFFF)), draw(st.integers(0, 1)))
    s["used_event"], s["avail_flags"] = draw(st.integers(0, 0xFFFF)), draw(st.integers(0, 1))
    s["log"] = draw(st.sampled_from([0, 1, 3, 8, 8]))       # bitmap bytes (0: off)
    s["flags"] = draw(st.integers(0, 1))                     # VHOST_VRING_F_LOG
    s["lga"] = draw(st.sampled_from([None, None, 0x3FFC, 0x13FFE, 0x100000, (1 << 63) - 8]))
    s["hdr_len"] = draw(st.sampled_from([0, 10, 12]))
    s["arena"] = draw(st.sampled_from([(64, 1), (512, 4), (4096, 16), (4096, 16), (4096, 2)]))
    if rx:
        s["frames"] = draw(st.lists(st.integers(0, 300), max_size=5,
                                    min_size=draw(st.sampled_from([0, 1, 1]))))
        s["mrg"] = draw(st.integers(0, 1))
    else:
        s["max_frames"] = draw(st.one_of(st.just(num), st.integers(-1, num + 1)))
    return s


def _pack(descs) -> bytes:
    return np.array(descs, dtype=[("a", "<u8"), ("l", "<u4"), ("f", "<u2"),
                                  ("n", "<u2")]).tobytes()


def _prepare(memory, s):
    """Write the scenario into guest memory; returns the kernel arguments."""
    num = s["num"]
    layout = vring_layout(RING, num)
    pattern = np.random.default_rng(num).integers(0, 256, REGION_A[1], np.uint8)
    memory.write(REGION_A[0], pattern.tobytes())
    memory.write(REGION_B[0], pattern[:REGION_B[1]].tobytes())
    memory.write(layout.desc, _pack(s["descs"]))
    memory.write(TABLES, _pack(s["table"]))
    avail = np.zeros(3 + num, "<u2")
    avail[0], avail[1] = s["avail_flags"], (s["last"] + s["ahead"]) & 0xFFFF
    avail[2:2 + num] = [h & 0xFFFF for h in s["heads"]]
    avail[2 + num] = s["used_event"]
    memory.write(layout.avail, avail.tobytes())
    state = np.zeros(1, VRING_STATE_DTYPE)
    st_ = state[0]
    st_["num"], st_["desc"], st_["avail"], st_["used"] = num, layout.desc, layout.avail, \
        layout.used
    st_["log_guest_addr"] = layout.used if s["lga"] is None else s["lga"]
    st_["flags"], st_["event_idx"] = s["flags"], s["event_idx"]
    st_["last_avail_idx"], st_["used_idx"] = s["last"], s["used_idx"]
    st_["signalled_used"], st_["signalled_used_valid"] = s["signalled"]
    st_["err_head"] = st_["err_table"] = -1
    log = np.zeros(s["log"], np.uint8)
    capacity, max_frames = s["arena"]
    arena, offsets, lengths = (np.zeros(capacity, np.uint8), np.zeros(max_frames, np.int64),
                               np.zeros(max_frames, np.int64))
    host, table = memory.kernel_args()
    if s["rx"]:
        frames = s["frames"][:max_frames]
        pos = 0
        for k, size in enumerate(frames):
            size = min(size, capacity - pos)
            arena[pos:pos + size] = (np.arange(size) + 7 * k) % 251
            offsets[k], lengths[k] = pos, size
            pos += size
        return (host, table, state, log, arena, offsets, lengths, len(frames), s["hdr_len"],
                s["mrg"])
    return (host, table, state, log, arena, offsets, lengths, s["hdr_len"], s["max_frames"])


def _outcome(memory, args, result):
    state, log, arena, offsets, lengths = args[2], args[3], args[4], args[5], args[6]
    return {"result": tuple(int(x) for x in result), "state": state.copy(),
            "log": log.copy(), "arena": arena.copy(), "offsets": offsets.copy(),
            "lengths": lengths.copy(),
            "memory": memory.read(REGION_A[0], REGION_A[1]) + memory.read(*REGION_B)}


def _run_both(memory, s, kernel, twin):
    args = _prepare(memory, s)
    fast = _outcome(memory, args, kernel(*args))
    args = _prepare(memory, s)
    slow = _outcome(memory, args, twin(*args))
    del args
    assert fast["result"] == slow["result"]
    for field in VRING_STATE_DTYPE.names:
        assert fast["state"][0][field] == slow["state"][0][field], field
    for key in ("log", "arena", "offsets", "lengths"):
        assert np.array_equal(fast[key], slow[key]), key
    assert fast["memory"] == slow["memory"]
    return fast


@SETTINGS
@given(s=scenarios(rx=False))
def test_tx_kernel_equals_its_twin(memory, s):
    out = _run_both(memory, s, vring_tx_burst, vring_tx_burst_py)
    status, n = out["result"]
    event(f"status {status}" + (", frames taken" if n else ""))
    assert 0 <= n <= s["num"]
    assert (out["state"][0]["status"] == status) or status == 0


@SETTINGS
@given(s=scenarios(rx=True))
def test_rx_kernel_equals_its_twin(memory, s):
    out = _run_both(memory, s, vring_rx_burst, vring_rx_burst_py)
    status, n = out["result"]
    event(f"status {status}" + (", frames written" if n else ""))
    assert 0 <= n <= len(s["frames"])


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(s=scenarios(rx=False))
def test_a_broken_ring_returns_its_error_and_touches_nothing(memory, s):
    args = _prepare(memory, s)
    status, _ = vring_tx_burst(*args)
    if status == 0:
        return
    before = memory.read(REGION_A[0], REGION_A[1])
    state = args[2].copy()
    assert vring_tx_burst(*args) == (status, 0) == vring_tx_burst_py(*args)
    assert memory.read(REGION_A[0], REGION_A[1]) == before
    assert args[2].tobytes() == state.tobytes()


def test_a_twin_made_from_its_kernel_runs_no_compiled_code():
    """cache.twin swaps every jitted helper for its twin, or refuses."""
    from vhostlab.ring import chain
    from vhostlab.ring.cache import twin
    with pytest.raises(TypeError, match="no twin given for check_buffer, fail"):
        twin(chain.chain_step, check_indirect=chain.check_indirect_py)
    with pytest.raises(TypeError, match="it calls no avail_head"):
        twin(chain.chain_step, avail_head=chain.avail_head_py)
    assert chain.chain_step_py.__name__ == "chain_step_py"
    assert chain.chain_step_py.__code__ is chain.chain_step.py_func.__code__
