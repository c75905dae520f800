"""``vhostlab bench``: the datapath kernels raced against their Python twins.

In-process microbenchmarks: a ring of 256 descriptors in memfd-backed guest
memory, recycled by bumping avail->idx before each burst, with the kernels
called directly (no wrapper), for TX and RX, 64- and 1500-byte frames, bursts
of 32 and 256, dirty logging off and on (the log then covers all memory and
VHOST_VRING_F_LOG is set). The same cases run on a packed ring (``ring``:
"packed"), recycled by making the burst's descriptors available again in the
device's lap (that cost, like the bump's, is measured alone and subtracted). Rates are per second of this thread's CPU time,
best of five runs, so that other processes sharing the machine do not count.
Two start-up numbers come from fresh processes: ``compile_s``, the first call
of every kernel with an empty numba cache, and ``warm_start_s``, import plus
the first calls with that cache warm (CPU seconds; ``*_wall_s`` beside them).

    python -m vhostlab.bench [--json] [--quick] [--no-startup]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

__all__ = ["main", "run", "add_arguments", "measure_startup", "bench_kernels",
           "bench_log_cost"]

_NUM = 256                 # ring size
_RING_GPA = 0x10000        # legacy layout block
_BUF_GPA = 0x100000        # num buffers of 2 KiB
_BUF_SIZE = 2048
_RAM = 4 << 20
_HDR = 12


class _Setup:
    """Guest memory, one ring whose descriptors point at fixed buffers, and
    the kernel arguments for one benchmark case."""

    def __init__(self, name: str, frame_bytes: int, burst: int, log: bool) -> None:
        from .dirtylog import DirtyLog
        from .memory import GuestMemory
        from .ring import FrameArena, Virtqueue, VirtqueueDriver, vring_layout

        self.memory = GuestMemory.allocate(_RAM, layout="flat")
        driver = VirtqueueDriver(self.memory, _NUM, _RING_GPA)
        tx = name == "tx"
        for i in range(_NUM):
            gpa = _BUF_GPA + i * _BUF_SIZE
            length = _HDR + frame_bytes if tx else _BUF_SIZE
            if tx:
                self.memory.write(gpa, bytes(_HDR) + bytes([i & 0xFF]) * frame_bytes)
            driver.add_buffer([(gpa, length, not tx)])
        self.views = driver.views
        del driver
        self.vq = Virtqueue(1 if tx else 0, name)
        self.vq.set_num(_NUM)
        layout = vring_layout(_RING_GPA, _NUM)
        self.vq.set_addr(layout.desc, layout.avail, layout.used, layout.used,
                         1 if log else 0, memory=self.memory)
        self.log = DirtyLog.allocate(self.memory) if log else None
        self.arena = FrameArena(max(1 << 16, burst * (frame_bytes + _HDR)), _NUM)
        if not tx:
            self.arena.extend([bytes([k & 0xFF]) * frame_bytes for k in range(burst)])
        self.burst, self.tx, self.frame_bytes = burst, tx, frame_bytes

    def args(self) -> tuple:
        host, table = self.memory.kernel_args()
        log = self.log.bitmap if self.log else np.zeros(0, np.uint8)
        a = self.arena
        if self.tx:
            return (host, table, self.vq.state, log, a.buf, a.offsets, a.lengths,
                    _HDR, self.burst)
        return (host, table, self.vq.state, log, a.buf, a.offsets, a.lengths,
                self.burst, _HDR, 0)

    def bump(self) -> None:
        """The guest makes ``burst`` more chains available (the same ones)."""
        self.views.avail_idx[0] = (self.vq.last_avail_idx + self.burst) & 0xFFFF

    def close(self) -> None:
        self.views = None
        if self.log:
            self.log.close()
        self.memory.close()


class _PackedSetup(_Setup):
    """The same case on a packed ring: one single-descriptor chain per slot
    (id = slot), the driver and device areas after the descriptor ring."""

    def __init__(self, name: str, frame_bytes: int, burst: int, log: bool) -> None:
        from .dirtylog import DirtyLog
        from .memory import GuestMemory
        from .ring import FrameArena, PackedVirtqueue
        from .ring.packed_layout import VRING_PACKED_DESC_DTYPE, packed_avail_flags

        self.memory = GuestMemory.allocate(_RAM, layout="flat")
        tx = name == "tx"
        slots = np.arange(_NUM)
        self.fresh = []                 # the ring made available, in lap 0 and lap 1
        for wrap in (0, 1):
            ring = np.zeros(_NUM, VRING_PACKED_DESC_DTYPE)
            ring["addr"] = _BUF_GPA + slots * _BUF_SIZE
            ring["len"] = _HDR + frame_bytes if tx else _BUF_SIZE
            ring["id"] = slots
            ring["flags"] = packed_avail_flags(wrap) | (0 if tx else 2)    # WRITE for RX
            self.fresh.append(ring)
        for i in range(_NUM if tx else 0):
            self.memory.write(_BUF_GPA + i * _BUF_SIZE, bytes(_HDR) + bytes([i & 0xFF])
                              * frame_bytes)
        self.descs = self.memory.view(_RING_GPA, 16 * _NUM).view(VRING_PACKED_DESC_DTYPE)
        self.descs[:] = self.fresh[1]
        self.vq = PackedVirtqueue(1 if tx else 0, name)
        self.vq.set_num(_NUM)
        driver, device = _RING_GPA + 0x2000, _RING_GPA + 0x2004
        self.vq.set_addr(_RING_GPA, driver, device, device, 1 if log else 0,
                         memory=self.memory)
        self.log = DirtyLog.allocate(self.memory) if log else None
        self.arena = FrameArena(max(1 << 16, burst * (frame_bytes + _HDR)), _NUM)
        if not tx:
            self.arena.extend([bytes([k & 0xFF]) * frame_bytes for k in range(burst)])
        self.burst, self.tx, self.frame_bytes = burst, tx, frame_bytes
        self.views = None

    def bump(self) -> None:
        """The guest makes the next ``burst`` slots available again, in the
        device's lap (the burst divides the ring: no slot range wraps)."""
        s = self.vq.state[0]
        pos, wrap = int(s["last_avail_idx"]), int(s["avail_wrap_counter"])
        self.descs[pos:pos + self.burst] = self.fresh[wrap][pos:pos + self.burst]

    def close(self) -> None:
        self.descs = self.fresh = None
        super().close()


_SETUPS = {"split": _Setup, "packed": _PackedSetup}


def _cpu_seconds(step, count: int) -> float:
    """CPU time this thread spends running ``step()`` ``count`` times."""
    start = time.thread_time_ns()
    for _ in range(count):
        step()
    return (time.thread_time_ns() - start) / 1e9


def _time_kernel(kernel, setup: _Setup, seconds: float, rounds: int = 5) -> float:
    """Descriptors per second of CPU time: the best of ``rounds`` runs.

    The thread's CPU clock, not the wall clock: on a shared machine other
    processes take turns on the core, and that time is not ours. Each call
    is preceded by a bump of avail->idx (the guest's part), whose cost is
    measured on its own and subtracted.
    """
    args = setup.args()

    def step():
        setup.bump()
        status, n = kernel(*args)
        if status != 0 or n != setup.burst:
            raise RuntimeError(f"bench kernel returned status {status}, {n} frames")

    step()                                          # warm up (and compile)
    calls = max(1, int(seconds / rounds / (_cpu_seconds(step, 5) / 5)))
    best = 0.0
    for _ in range(rounds):
        spent = _cpu_seconds(step, calls) - _cpu_seconds(setup.bump, calls)
        best = max(best, calls * setup.burst / max(spent, 1e-9))
    return best


def bench_kernels(quick: bool = False) -> list[dict]:
    """Run every case; returns the ``results`` rows."""
    from .ring import RING_FORMATS

    budget = {"numba": 0.05 if quick else 0.4, "python": 0.02 if quick else 0.15}
    results = []
    for ring in ("split", "packed"):
        impls = RING_FORMATS[ring]._kernels
        for k, name in enumerate(("tx", "rx")):
            for frame_bytes in (64, 1500):
                for burst in (32, 256):
                    for log in (False, True):
                        for impl in ("numba", "python"):
                            setup = _SETUPS[ring](name, frame_bytes, burst, log)
                            try:
                                rate = _time_kernel(impls[impl][k], setup, budget[impl])
                            finally:
                                setup.close()
                            results.append({
                                "name": name, "impl": impl, "frame_bytes": frame_bytes,
                                "burst": burst, "log": log, "ring": ring,
                                "desc_per_s": round(rate),
                                "gbit_per_s": round(rate * frame_bytes * 8 / 1e9, 3)})
    return results


def _startup_probe(t0: float, c0: float) -> None:
    """Run in a fresh process whose clocks (wall, CPU) read ``t0``, ``c0``
    before any import: import the datapath, then call every kernel once."""
    from . import dirtylog, memory, ring
    t1, c1 = time.perf_counter(), time.process_time()
    setups = [_Setup("tx", 64, 32, True), _Setup("rx", 64, 32, True)]
    log = dirtylog.DirtyLog.allocate(4096)
    for s in setups:
        s.bump()
    t2, c2 = time.perf_counter(), time.process_time()
    ring.vring_tx_burst(*setups[0].args())
    ring.vring_rx_burst(*setups[1].args())
    log.mark_range(0, 4096)
    log.sync()
    view = np.zeros(4, np.uint16)
    ring.smp_store_release(view, 1, np.uint16(1))
    ring.smp_load_acquire(view, 1)
    ring.smp_mb()
    memory.gpa_to_host(setups[0].memory.kernel_args()[1], 0, 1)
    t3, c3 = time.perf_counter(), time.process_time()
    for s in setups:
        s.close()
    log.close()
    print(json.dumps({"import_s": t1 - t0, "first_call_s": t3 - t2,
                      "import_cpu_s": c1 - c0, "first_call_cpu_s": c3 - c2}))


def _probe(env: dict) -> dict:
    code = ("import time; t0, c0 = time.perf_counter(), time.process_time(); "
            "from vhostlab.bench import _startup_probe; _startup_probe(t0, c0)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure_startup() -> dict:
    """Start-up costs measured in fresh processes: ``compile_s`` (the first
    call of every kernel with an empty numba cache) and ``warm_start_s``
    (import plus those first calls with the cache filled), in CPU seconds of
    that process, and the same in wall-clock seconds (``*_wall_s``), which
    other processes on a shared machine inflate."""
    with tempfile.TemporaryDirectory(prefix="vhostlab-numba-") as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        cold = _probe(env)
        warm = _probe(env)
    return {"compile_s": cold["first_call_cpu_s"],
            "warm_start_s": warm["import_cpu_s"] + warm["first_call_cpu_s"],
            "compile_wall_s": cold["first_call_s"],
            "warm_start_wall_s": warm["import_s"] + warm["first_call_s"]}


def bench_log_cost(frames: int = 300, log_sizes=(2 << 20, 64 << 20)) -> dict:
    """Wall milliseconds per kicked frame while logging, for each dirty-log size.

    An in-process back-end (loopback wire) and a front-end on a real socket:
    each round posts one RX buffer, transmits one 64-byte frame, kicks, and
    waits until the frame is back in the RX ring; the log is a sparse memfd
    of the given size. The cost should not depend on the log's size: the
    kernels count the bits they set instead of the service scanning the log.
    """
    from .backend import BackendServer
    from .backend.soak import SoakFrontend

    out = {}
    for size in log_sizes:
        with BackendServer(wire="loopback") as srv:
            fe = SoakFrontend(srv.socket_path)
            log = fe.start_logging(size)
            try:
                rx = fe.drivers[0]
                for warm in (True, False):
                    t0 = time.perf_counter()
                    for _ in range(20 if warm else frames):
                        fe.post_rx(1)
                        fe.transmit(1, 64 + _HDR)
                        deadline = time.monotonic() + 5
                        while not rx.get_used():
                            if time.monotonic() > deadline:
                                raise RuntimeError("a kicked frame did not come back")
                    took = time.perf_counter() - t0
                out[f"{size >> 20}MiB"] = round(1000 * took / frames, 3)
            finally:
                fe.close()
                log.close()
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``vhostlab bench``."""
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument("--quick", action="store_true",
                        help="short runs (numbers are rough)")
    parser.add_argument("--no-startup", action="store_true",
                        help="skip the compile and warm-start measurements")
    parser.add_argument("--peer", choices=("none", "dpdk"), default="none",
                        help="dpdk: DPDK's virtio-user transmits into this back-end and into "
                             "DPDK's own vhost back-end, and the two rates are compared")
    parser.add_argument("--ring", choices=("split", "packed"), default="split",
                        help="with --peer dpdk: the virtqueue format virtio-user drives "
                             "(packed: packed_vq=1); the kernel benchmarks run both")


def _table(report: dict) -> str:
    lines = []
    if report["compile_s"] is not None:
        lines.append(f"compile (cold cache): {report['compile_s']:.2f} s CPU "
                     f"({report['compile_wall_s']:.2f} s wall)   warm start: "
                     f"{report['warm_start_s']:.2f} s CPU "
                     f"({report['warm_start_wall_s']:.2f} s wall)")
    lines.append(f"{'name':4} {'impl':6} {'frame':>5} {'burst':>5} {'log':>3} "
                 f"{'Mdesc/s':>8} {'Gbit/s':>7} ring")
    for r in report["results"]:
        lines.append(f"{r['name']:4} {r['impl']:6} {r['frame_bytes']:5} {r['burst']:5} "
                     f"{'on' if r['log'] else 'off':>3} {r['desc_per_s'] / 1e6:8.2f} "
                     f"{r['gbit_per_s']:7.2f} {r['ring']}")
    rate = {(r["name"], r["impl"], r["frame_bytes"], r["burst"], r["log"]): r["desc_per_s"]
            for r in report["results"] if r["ring"] == "split"}
    packed = {(r["name"], r["frame_bytes"], r["burst"]): r["desc_per_s"]
              for r in report["results"]
              if r["ring"] == "packed" and r["impl"] == "numba" and not r["log"]}
    numba = rate.get(("tx", "numba", 64, 256, False))
    if numba:
        lines.append(f"tx 64 B burst 256: numba / python = "
                     f"{numba / rate[('tx', 'python', 64, 256, False)]:.1f}x, logging "
                     f"costs {100 * (1 - rate[('tx', 'numba', 64, 256, True)] / numba):.1f}%")
    for name in ("tx", "rx"):
        split = rate.get((name, "numba", 64, 256, False))
        if split and packed.get((name, 64, 256)):
            lines.append(f"{name} 64 B burst 256: numba packed / split = "
                         f"{packed[name, 64, 256] / split:.2f}")
    cost = report.get("kicked_frame_ms_by_log_size")
    if cost:
        lines.append("a kicked frame while logging (loopback, wall ms): " + ", ".join(
            f"{size} log {ms:.3f}" for size, ms in cost.items()))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Run the benchmark as parsed by :func:`add_arguments`; returns 0."""
    if getattr(args, "peer", "none") == "dpdk":
        from vhostlab.backend.bench_dpdk import run as run_dpdk
        return run_dpdk(as_json=args.json, packed=getattr(args, "ring", "split") == "packed")
    startup = dict.fromkeys(("compile_s", "warm_start_s", "compile_wall_s",
                             "warm_start_wall_s"))
    if not args.no_startup:
        startup = measure_startup()
    report = {**startup, "results": bench_kernels(quick=args.quick),
              "kicked_frame_ms_by_log_size": bench_log_cost(100 if args.quick else 300)}
    print(json.dumps(report, indent=2) if args.json else _table(report))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vhostlab bench", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
