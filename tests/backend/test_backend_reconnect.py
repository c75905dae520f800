"""Reconnection: a front-end that leaves and comes back finds a clean device, and
200 connect/disconnect cycles leave open fds and mappings where they started."""
from __future__ import annotations

import gc
import struct

from test_backend_protocol import Guest, frames_of, open_fds, wait_until
from test_backend_scripted import ScriptedFrontend
from vhostlab.backend import BackendServer
from vhostlab.protocol import Request

CYCLES = 200
RAM = 64 << 20


def maps_lines() -> list[str]:
    with open("/proc/self/maps") as f:
        return f.read().splitlines()


def file_mappings(lines: list[str]) -> list[str]:
    """Mappings of files (guest RAM and log memfds among them), without addresses."""
    out = []
    for line in lines:
        parts = line.split(None, 5)
        if len(parts) == 6 and not parts[5].startswith("["):
            out.append(f"{parts[1]} {parts[5]}")
    return sorted(out)


def anonymous_bytes(lines: list[str]) -> int:
    """Address space in anonymous mappings (a leaked guest-memory reservation is 64 GiB)."""
    total = 0
    for line in lines:
        parts = line.split(None, 5)
        if len(parts) == 5:
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            total += hi - lo
    return total


def one_cycle(srv: BackendServer, i: int) -> None:
    """Connect, get some way into the set-up (or garbage), and leave."""
    with ScriptedFrontend(srv.socket_path, ram_size=RAM) as fe:
        stage = i % 4
        if stage == 0:
            fe.negotiate()
        elif stage == 1:
            _, acked = fe.negotiate()
            fe.send(Request.SET_FEATURES, acked)
            fe.set_mem_table()                       # memory mapped, then gone
        elif stage == 2:
            guest = Guest(fe)                        # rings, kick/call/err fds, traffic
            guest.post_rx(4)
            guest.transmit(frames_of(3))
            srv.inject(frames_of(2))
            assert wait_until(lambda: srv.snapshot(trace=False).counters["guest_tx_frames"]
                              >= 3 * (i // 4 + 1))
            del guest
        else:
            # Half a SET_MEM_TABLE with its fds, then hang up mid-message.
            fe.negotiate()
            table = fe.memory.memory_table()
            raw = struct.pack("<III", 5, 1, 8 + 32 * len(table)) + b"\x03"
            fe.send_raw(raw, fds=[fd for _, fd in table])
    # The server notices the hang-up and releases the device.
    assert wait_until(lambda: not srv.connected, 5)


def test_200_reconnects_leave_fds_and_mappings_at_baseline(tmp_path):
    d = tmp_path / "s"
    d.mkdir(mode=0o700)
    with BackendServer(str(d / "vu.sock"), wire="loopback", trace_maxlen=100) as srv:
        for i in range(4):                           # warm up: kernels compiled, arenas made
            one_cycle(srv, i)
        gc.collect()
        fds0, maps0 = open_fds(), maps_lines()
        for i in range(CYCLES):
            one_cycle(srv, i)
        gc.collect()
        assert wait_until(lambda: open_fds() == fds0, 5), sorted(open_fds() ^ fds0)
        maps1 = maps_lines()
        # Every file mapping (memfds of guest RAM and logs) is gone again ...
        assert file_mappings(maps1) == file_mappings(maps0)
        # ... and so is every reservation; only the allocator's own arenas may
        # move by a few lines (Python's 1 MiB arenas, malloc's heaps).
        assert anonymous_bytes(maps1) - anonymous_bytes(maps0) < 64 << 20
        assert abs(len(maps1) - len(maps0)) <= 4, "\n".join(sorted(set(maps1) ^ set(maps0)))
        snap = srv.snapshot()
        assert snap.counters["connections"] == CYCLES + 4
        assert snap.memory == () and snap.log is None
        assert not any(v.started or v.kick or v.call or v.err for v in snap.vrings)
        # 50 of the cycles hung up mid-message: each is named, none is fatal.
        assert snap.counters["errors"] == () or all("internal" not in e
                                                   for e in snap.counters["errors"])


def test_a_returning_front_end_gets_a_clean_device(tmp_path):
    d = tmp_path / "s"
    d.mkdir(mode=0o700)
    with BackendServer(str(d / "vu.sock")) as srv:
        with ScriptedFrontend(srv.socket_path) as fe:
            guest = Guest(fe)
            guest.transmit(frames_of(5))
            assert wait_until(lambda: srv.snapshot().counters["guest_tx_frames"] == 5)
            del guest
        assert wait_until(lambda: not srv.connected)
        snap = srv.snapshot()
        assert snap.features == 0 and snap.protocol_features == 0 and snap.memory == ()
        assert all(v.num == 0 and v.last_avail_idx == 0 and not v.enabled for v in snap.vrings)
        with ScriptedFrontend(srv.socket_path) as fe:   # starts again from avail index 0
            guest = Guest(fe)
            guest.transmit(frames_of(2))
            assert wait_until(lambda: srv.snapshot().counters["guest_tx_frames"] == 7)
            assert srv.snapshot().vrings[1].last_avail_idx == 2
            del guest
