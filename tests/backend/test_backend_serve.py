"""`python -m vhostlab.backend.serve` as a real process: --once, signals, the JSON line,
--trace, pcap, and near-zero CPU while idle."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from test_backend_protocol import Guest, frames_of, wait_until
from test_backend_scripted import ScriptedFrontend
from vhostlab.backend import read_pcap
from vhostlab.protocol import TO_BACKEND, TO_FRONTEND

SUMMARY_KEYS = {"guest_tx_frames", "guest_tx_bytes", "guest_rx_frames", "guest_rx_bytes",
                "dropped", "pages_logged", "slowest_service_ms", "messages", "errors"}


@pytest.fixture
def serve(tmp_path):
    procs = []

    def start(*args: str) -> tuple[subprocess.Popen, str]:
        d = tmp_path / f"s{len(procs)}"
        d.mkdir(mode=0o700)
        sock = str(d / "vu.sock")
        proc = subprocess.Popen([sys.executable, "-m", "vhostlab.backend.serve", "--socket",
                                 sock, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        procs.append(proc)
        if not wait_until(lambda: os.path.exists(sock) or proc.poll() is not None, 60):
            pytest.fail("serve did not create its socket")
        assert proc.poll() is None, proc.stderr.read()
        return proc, sock
    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        proc.stdout.close()
        proc.stderr.close()


def finish(proc: subprocess.Popen) -> tuple[dict, str]:
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    lines = out.splitlines()
    assert len(lines) == 1, out
    summary = json.loads(lines[0])
    assert set(summary) == SUMMARY_KEYS
    return summary, err


def test_serve_once_reports_what_the_front_end_sent(serve, tmp_path):
    trace = tmp_path / "trace.jsonl"
    proc, sock = serve("--once", "--wire", "loopback", "--trace", str(trace))
    sent = frames_of(30, 60) + frames_of(5, 1400)
    with ScriptedFrontend(sock) as fe:
        guest = Guest(fe)
        guest.post_rx(64)
        guest.transmit(sent)
        got: list[bytes] = []
        assert wait_until(lambda: got.extend(guest.receive()) or len(got) == len(sent), 30)
        del guest
    summary, err = finish(proc)
    assert summary["guest_tx_frames"] == summary["guest_rx_frames"] == len(sent)
    assert summary["guest_tx_bytes"] == summary["guest_rx_bytes"] == sum(map(len, sent))
    assert summary["dropped"] == 0 and summary["errors"] == []
    assert summary["messages"]["SET_MEM_TABLE"] == 1
    assert summary["messages"]["SET_VRING_KICK"] == 2
    assert "front-end left" in err                       # logs go to stderr
    records = [json.loads(line) for line in trace.read_text().splitlines()]
    sent_requests = sum(summary["messages"].values())
    assert len([r for r in records if r["direction"] == TO_BACKEND]) == sent_requests
    first = records[0]
    assert first["request"] == "GET_FEATURES" and first["raw"] == "010000000100000000000000"
    reply = records[1]
    assert reply["direction"] == TO_FRONTEND and reply["fields"]["flags"] == 5
    kicks = [r for r in records if r["request"] == "SET_VRING_KICK"]
    assert all(r["nfds"] == 1 for r in kicks)


def test_serve_pcap_wire_writes_what_the_guest_sent(serve, tmp_path):
    pcap = tmp_path / "out.pcap"
    proc, sock = serve("--once", "--wire", f"pcap:{pcap}")
    sent = frames_of(12, 200)
    with ScriptedFrontend(sock) as fe:
        guest = Guest(fe)
        guest.transmit(sent)
        assert wait_until(lambda: len(read_pcap(str(pcap))) == 12, 30)
        del guest
    summary, _ = finish(proc)
    assert read_pcap(str(pcap)) == sent                  # virtio-net header stripped
    assert summary["guest_tx_frames"] == 12


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_exits_zero_on_signal_with_its_json_line(serve, sig):
    proc, sock = serve()
    with ScriptedFrontend(sock) as fe:
        guest = Guest(fe)
        guest.transmit(frames_of(4))
        used: list = []
        assert wait_until(lambda: used.extend(guest.drivers[1].get_used()) or len(used) == 4)
        proc.send_signal(sig)
        summary, _ = finish(proc)
        del guest
    assert summary["guest_tx_frames"] == 4


def test_serve_refuses_a_socket_in_a_directory_others_can_enter(tmp_path):
    d = tmp_path / "open"
    d.mkdir()
    os.chmod(d, 0o755)
    proc = subprocess.run([sys.executable, "-m", "vhostlab.backend.serve", "--socket",
                           str(d / "vu.sock")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "0755" in proc.stderr and proc.stdout == ""


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")   # utime + stime


def test_idle_backend_uses_under_one_percent_cpu(serve):
    proc, sock = serve()
    with ScriptedFrontend(sock) as fe:
        guest = Guest(fe)                    # connected, rings started, kick fds watched
        guest.transmit(frames_of(3))
        time.sleep(1.0)
        before, t0 = _cpu_seconds(proc.pid), time.monotonic()
        time.sleep(10.0)
        used, elapsed = _cpu_seconds(proc.pid) - before, time.monotonic() - t0
        del guest
    assert used / elapsed < 0.01, f"{used:.3f} s of CPU in {elapsed:.1f} s while idle"
