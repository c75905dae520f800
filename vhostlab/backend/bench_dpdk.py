"""`vhostlab bench --peer dpdk`: DPDK's virtio-user transmits into this back-end, then into
DPDK's own vhost back-end, in the same run; both rates and their ratio are printed.

Both runs use the same front-end: `dpdk-testpmd` with a virtio-user port in
txonly mode (64-byte frames), which counts the frames the back-end took
("Tx-pps"). What differs is who is on the other end of the socket: this
back-end in poll mode (`vhostlab serve --mode poll --wire sink`), or DPDK's
vhost PMD (`net_vhost0`, testpmd in rxonly mode). The rate is the median of
the per-second samples after a warm-up. It is a benchmark: nothing asserts it.
"""
from __future__ import annotations

import ctypes
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable

DURATION = 8.0            # seconds of traffic per back-end
WARMUP_SAMPLES = 2        # per-second samples skipped at the start
TARGET_RATIO = 0.3
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """preexec_fn: SIGKILL the child if this process dies (Linux prctl)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def find_testpmd() -> str | None:
    return os.environ.get("VHOSTLAB_DPDK") or shutil.which("dpdk-testpmd")


def _eal(prefix: str, main_lcore: int, vdev: str) -> list[str]:
    # FACTS.md section 2: no hugepages, no PCI, one file per memory segment.
    return ["-l", "0,1", "--main-lcore", str(main_lcore), "--no-huge", "-m", "1024",
            "--no-pci", "--single-file-segments", f"--file-prefix={prefix}", "--vdev", vdev]


def virtio_user_cmd(testpmd: str, sock: str, prefix: str, forward: str = "txonly",
                    extra: tuple[str, ...] = (), packed: bool = False) -> list[str]:
    """testpmd with a virtio-user port connecting to a back-end listening at `sock`
    (with ``packed``: packed virtqueues, virtio-user's ``packed_vq=1``)."""
    vdev = f"net_virtio_user0,path={sock},queues=1" + (",packed_vq=1" if packed else "")
    return [testpmd, *_eal(prefix, 1, vdev), "--",
            f"--forward-mode={forward}", "--nb-cores=1", "--total-num-mbufs=16384",
            "--stats-period", "1", *extra]


def vhost_cmd(testpmd: str, sock: str, prefix: str) -> list[str]:
    """testpmd with DPDK's vhost back-end listening at `sock`, receiving and dropping."""
    return [testpmd, *_eal(prefix, 0, f"net_vhost0,iface={sock},queues=1"), "--",
            "--forward-mode=rxonly", "--nb-cores=1", "--total-num-mbufs=16384",
            "--stats-period", "1"]


def start(cmd: list[str], log_path: str) -> subprocess.Popen:
    """Start a helper process in its own session, output to `log_path`, dying with us."""
    with open(log_path, "wb") as log:
        return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=_die_with_parent)


def stop(proc: subprocess.Popen, sig: int = signal.SIGINT, timeout: float = 15.0) -> None:
    """Ask `proc` to finish (SIGINT: testpmd prints its final statistics), then make sure."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
        except ProcessLookupError:
            pass


def pps_samples(output: str, field: str = "Tx-pps") -> list[int]:
    return [int(x) for x in re.findall(rf"{field}:\s+(\d+)", output)]


def steady_rate(samples: list[int]) -> float:
    """Median of the samples after the warm-up, ignoring the idle ones before traffic."""
    first = next((i for i, s in enumerate(samples) if s > 0), len(samples))
    started = samples[first:]
    kept = started[WARMUP_SAMPLES:] or started
    return float(statistics.median(kept)) if kept else 0.0


def forward_totals(output: str) -> dict:
    """TX-packets / RX-packets from testpmd's final "Accumulated forward statistics"."""
    block = output.rsplit("Accumulated forward statistics", 1)[-1]
    out = {}
    for key in ("RX-packets", "TX-packets", "TX-dropped"):
        m = re.search(rf"{key}:\s+(\d+)", block)
        out[key] = int(m.group(1)) if m else None
    return out


def _wait_for(path: str, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{path} did not appear (process exit {proc.poll()})")
        time.sleep(0.05)


def _read(path: str) -> str:
    with open(path, "rb") as f:
        return f.read().decode(errors="replace")


def _traffic(log_path: str, proc: subprocess.Popen, duration: float,
             timeout: float = 90.0) -> None:
    """Wait until the sender reports traffic (set-up can take seconds), then `duration` more."""
    deadline = time.monotonic() + timeout
    while not any(pps_samples(_read(log_path))):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"no traffic from testpmd (see {log_path})")
        time.sleep(0.2)
    time.sleep(duration)


def _send(testpmd: str, workdir: str, sock: str, receiver: subprocess.Popen, name: str,
          finish: Callable[[], object], kill: int, duration: float,
          packed: bool = False) -> str:
    """Once `receiver` listens on `sock`, let virtio-user send into it for
    `duration` seconds, stop the sender, then `finish()` the receiver (both
    get `kill` if anything is still running). Returns the sender's log."""
    log_path = os.path.join(workdir, f"tx-{name}")
    tx = None
    try:
        _wait_for(sock, receiver)
        tx = start(virtio_user_cmd(testpmd, sock, f"vhostlab{os.getpid()}{name[0]}",
                                   packed=packed), log_path)
        _traffic(log_path, tx, duration)
        stop(tx)
        finish()
    finally:
        for proc in (tx, receiver):
            if proc is not None:
                stop(proc, kill)
    return _read(log_path)


def measure_ours(testpmd: str, workdir: str, duration: float = DURATION,
                 packed: bool = False) -> dict:
    """virtio-user -> this back-end (`vhostlab serve --mode poll`)."""
    sock = os.path.join(workdir, "ours.sock")
    serve = start([sys.executable, "-m", "vhostlab.backend.serve", "--socket", sock,
                   "--mode", "poll", "--wire", "sink", "--once"], os.path.join(workdir, "serve"))
    text = _send(testpmd, workdir, sock, serve, "ours", lambda: serve.wait(30),
                 signal.SIGTERM, duration, packed)
    summary_line = _read(os.path.join(workdir, "serve")).strip().splitlines()
    summary = next((json.loads(line) for line in reversed(summary_line)
                    if line.startswith("{")), {})
    return {"pps": steady_rate(pps_samples(text)), "sender": forward_totals(text),
            "backend_frames": summary.get("guest_tx_frames")}


def measure_dpdk(testpmd: str, workdir: str, duration: float = DURATION,
                 packed: bool = False) -> dict:
    """virtio-user -> DPDK's vhost PMD (testpmd rxonly)."""
    sock = os.path.join(workdir, "dpdk.sock")
    rx = start(vhost_cmd(testpmd, sock, f"vhostlab{os.getpid()}v"), os.path.join(workdir, "rx"))
    text = _send(testpmd, workdir, sock, rx, "dpdk", lambda: stop(rx), signal.SIGKILL, duration,
                 packed)
    received = forward_totals(_read(os.path.join(workdir, "rx")))
    return {"pps": steady_rate(pps_samples(text)), "sender": forward_totals(text),
            "backend_frames": received["RX-packets"]}


def run(as_json: bool = False, packed: bool = False) -> int:
    """Measure both back-ends and print the rates and their ratio; 0 on success.
    With ``packed``, virtio-user drives packed virtqueues (``packed_vq=1``)."""
    testpmd = find_testpmd()
    if testpmd is None:
        print("dpdk-testpmd not found (apt-get install dpdk dpdk-dev)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="vhostlab-bench-") as workdir:
        ours = measure_ours(testpmd, workdir, packed=packed)
        dpdk = measure_dpdk(testpmd, workdir, packed=packed)
    ratio = ours["pps"] / dpdk["pps"] if dpdk["pps"] else 0.0
    result = {"frame_bytes": 64, "ring": "packed" if packed else "split",
              "duration_s": DURATION, "vhostlab_pps": ours["pps"],
              "dpdk_vhost_pps": dpdk["pps"], "ratio": ratio, "target_ratio": TARGET_RATIO,
              "vhostlab": ours, "dpdk_vhost": dpdk}
    if as_json:
        print(json.dumps(result))
    else:
        print(f"virtio-user (testpmd txonly, 64-byte frames, "
              f"{'packed' if packed else 'split'} rings) into:\n"
              f"  vhostlab back-end (poll mode)  {ours['pps'] / 1e6:8.2f} Mpps\n"
              f"  DPDK vhost PMD                 {dpdk['pps'] / 1e6:8.2f} Mpps\n"
              f"  ratio                          {ratio:8.3f}   (target >= {TARGET_RATIO})")
    return 0


if __name__ == "__main__":
    sys.exit(run("--json" in sys.argv[1:], "--packed" in sys.argv[1:]))
