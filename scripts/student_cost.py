"""What one student's lab session costs: memory, CPU and time, K students at once.

Each student is what a JupyterHub single-user server holds: a JupyterLab
server of their own, serving a copy of ``labs/``, and one real Jupyter kernel
started through its REST API, which runs labs 00, 04 and 07 in that order over
the kernel websocket, with a real QEMU (VHOSTLAB_FRONTEND=qemu). All K
students start together. While they run, every process of each student's tree
(the server, the kernel, the QEMUs and back-ends the kernel starts) is read
from /proc every ``--interval`` seconds:

- memory: the tree's summed PSS (``/proc/PID/smaps_rollup``; shared pages
  divided among the processes that map them, so K students add up to what
  the node holds) and summed RSS (shared pages counted in full per process,
  an upper bound); the peak of each sum over the run;
- CPU: user + system seconds of the kernel and of the whole tree, reaped
  children included (``cutime``/``cstime``), read from the kernel just before
  its shutdown and from the server just before it stops, so nothing the tree
  ran is missed.

It prints a table, writes ``--json``, and suggests a JupyterHub sizing for a
``--node-gb`` / ``--node-cores`` node. Every server, kernel and QEMU it starts
is stopped at the end, on failure too.

    .venv/bin/python scripts/student_cost.py --students 1 2 4 --json cost.json

Needs the kit's venv with the test extras (psutil) and QEMU installed.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "browser"))
sys.path.insert(0, str(ROOT / "tests" / "hub"))
import lab_browser  # noqa: E402  (the JupyterLab server harness: start, API, stop)
import notebook_api  # noqa: E402  (notebooks run over the kernel websocket)

LABS = ("00_welcome.ipynb", "04_virtqueues.ipynb", "07_live_migration.ipynb")
MIB = 1024 * 1024
RESERVED_GB = 1.0           # a node's system daemons, kubelet and hub pods
CPU_LIMIT = 1.0             # what Binder gives a session; the labs' hot path is one thread


def memory_kib(pid: int) -> tuple[int, int]:
    """(PSS, RSS) of one process in KiB from /proc/PID/smaps_rollup; (0, 0) once gone."""
    pss = rss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    pss = int(line.split()[1])
                elif line.startswith("Rss:"):
                    rss = int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return pss, rss


def tree(pid: int) -> list[int]:
    """``pid`` and every live process under it."""
    try:
        top = psutil.Process(pid)
        return [pid] + [p.pid for p in top.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def cpu_seconds(pid: int) -> float:
    """User + system seconds of ``pid`` and of every child it has reaped."""
    t = psutil.Process(pid).cpu_times()
    return t.user + t.system + t.children_user + t.children_system


class Student:
    """One student's JupyterLab and kernel, and what they cost."""

    def __init__(self, number: int, scratch: Path, env: dict) -> None:
        self.name = f"student{number}"
        root = lab_browser.copy_labs(ROOT / "labs", scratch / self.name / "labs")
        self.server = lab_browser.JupyterLab(root, scratch / self.name / "jupyterlab", env=env)
        self.kernel_pid: int | None = None
        self.peak = {"tree_pss": 0, "tree_rss": 0, "kernel_pss": 0, "kernel_rss": 0,
                     "server_pss": 0}
        self.processes = 0
        self.cpu = {"kernel": 0.0, "tree": 0.0}
        self.labs: list[dict] = []
        self.errors: list[str] = []
        self.seconds = 0.0

    def sample(self) -> None:
        """One reading of the tree's memory; the peaks are kept."""
        server = self.server.proc.pid if self.server.proc else None
        if server is None:
            return
        pids = tree(server)
        kernel = set(tree(self.kernel_pid)) if self.kernel_pid else set()
        total = {"tree_pss": 0, "tree_rss": 0, "kernel_pss": 0, "kernel_rss": 0}
        for pid in pids:
            pss, rss = memory_kib(pid)
            total["tree_pss"] += pss
            total["tree_rss"] += rss
            if pid in kernel:
                total["kernel_pss"] += pss
                total["kernel_rss"] += rss
            if pid == server:
                self.peak["server_pss"] = max(self.peak["server_pss"], pss)
        for key, value in total.items():
            self.peak[key] = max(self.peak[key], value)
        self.processes = max(self.processes, len(pids))

    def session(self, go: threading.Barrier, labs: list[str], cell_timeout: float) -> None:
        """Start a kernel, wait for the others, run the labs in order, shut it down."""
        api = notebook_api.ServerAPI(self.server.url("/"), self.server.token)
        kernel_id = api.start_kernel("")
        socket = None
        try:
            self.kernel_pid = next(p.pid for p in psutil.Process(self.server.proc.pid).children()
                                   if "ipykernel" in " ".join(p.cmdline()))
            socket = api.kernel(kernel_id)
            go.wait()
            start = time.monotonic()
            for lab in labs:
                run = notebook_api.run_notebook(socket, self.server.root / lab, cell_timeout)
                self.labs.append({"lab": lab, "seconds": round(run.seconds, 1),
                                  "cells": len(run.cells), "errors": run.errors()})
                self.errors += [f"{lab} {e}" for e in run.errors()]
                if run.cells and "a real QEMU" not in run.cells[0].text():
                    self.errors.append(f"{lab} did not run on a real QEMU: "
                                       f"{run.cells[0].text()[:200]!r}")
                if run.errors():
                    break
            self.seconds = time.monotonic() - start
            self.cpu["kernel"] = cpu_seconds(self.kernel_pid)
        except Exception as exc:           # recorded and reported; the others go on
            self.errors.append(f"{type(exc).__name__}: {exc}")
            go.abort()
        finally:
            if socket is not None:
                socket.close()
            api.shutdown_kernel(kernel_id)
            self.cpu["tree"] = cpu_seconds(self.server.proc.pid)


def measure(k: int, scratch: Path, labs: list[str], interval: float,
            cell_timeout: float) -> dict:
    """K students at once; their costs, per student and together."""
    env = {"VHOSTLAB_FRONTEND": "qemu"}
    load_before = os.getloadavg()
    students = [Student(n, scratch / f"k{k}", env) for n in range(1, k + 1)]
    done = threading.Event()
    try:
        for s in students:
            s.server.start(timeout=120)

        def sampler() -> None:
            while not done.is_set():
                for s in students:
                    s.sample()
                done.wait(interval)

        watcher = threading.Thread(target=sampler, daemon=True)
        watcher.start()
        go = threading.Barrier(k)
        threads = [threading.Thread(target=s.session, args=(go, labs, cell_timeout)) for s in students]
        start = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.monotonic() - start
        done.set()
        watcher.join()
    finally:
        done.set()
        for s in students:
            s.server.stop()
    load_after = os.getloadavg()

    def per_student(key: str, scale: float = 1.0) -> float:
        return max(s.peak[key] for s in students) / scale

    return {
        "students": k,
        "wall_s": round(wall, 1),
        "lab_seconds_per_student": round(max(s.seconds for s in students), 1),
        "peak_tree_pss_mib": round(per_student("tree_pss", 1024), 1),
        "peak_tree_rss_mib": round(per_student("tree_rss", 1024), 1),
        "peak_kernel_pss_mib": round(per_student("kernel_pss", 1024), 1),
        "peak_kernel_rss_mib": round(per_student("kernel_rss", 1024), 1),
        "peak_server_pss_mib": round(per_student("server_pss", 1024), 1),
        "cpu_kernel_s": round(max(s.cpu["kernel"] for s in students), 1),
        "cpu_tree_s": round(max(s.cpu["tree"] for s in students), 1),
        "max_processes": max(s.processes for s in students),
        "load_before": [round(x, 2) for x in load_before],
        "load_after": [round(x, 2) for x in load_after],
        "per_student": [{"name": s.name, "peak_kib": s.peak, "cpu_s": s.cpu,
                         "seconds": round(s.seconds, 1), "labs": s.labs} for s in students],
        "errors": {s.name: s.errors for s in students if s.errors},
    }


def round_up(value_mib: float, step: int = 128) -> int:
    return int(math.ceil(value_mib / step) * step)


def sizing(runs: list[dict], node_gb: float, node_cores: int, target_s: float) -> dict:
    """A JupyterHub sizing from the measured runs.

    mem_guarantee is the largest per-student PSS peak (what a node must hold
    per student when many run at once); mem_limit the largest RSS peak with a
    quarter's headroom (what one session may touch). cpu_guarantee is the
    share that still lets every student on a node run all three labs at the
    same moment within ``target_s`` seconds: CPU seconds / target_s.
    """
    pss = max(r["peak_tree_pss_mib"] for r in runs)
    rss = max(r["peak_tree_rss_mib"] for r in runs)
    cpu = max(r["cpu_tree_s"] for r in runs)
    mem_guarantee = round_up(pss)
    mem_limit = round_up(rss * 1.25)
    cpu_guarantee = max(0.05, math.ceil(cpu / target_s * 20) / 20)
    by_memory = int((node_gb - RESERVED_GB) * 1024 // mem_guarantee)
    by_cpu = int(node_cores // cpu_guarantee)
    return {"node_gb": node_gb, "node_cores": node_cores, "reserved_gb": RESERVED_GB,
            "all_at_once_target_s": target_s,
            "mem_guarantee": f"{mem_guarantee}M", "mem_limit": f"{mem_limit}M",
            "cpu_guarantee": cpu_guarantee, "cpu_limit": CPU_LIMIT,
            "students_by_memory": by_memory, "students_by_cpu": by_cpu,
            "students_per_node": min(by_memory, by_cpu)}


def report(runs: list[dict], size: dict) -> str:
    lines = ["| K | wall (s) | labs per student (s) | peak PSS / student (MiB) | "
             "peak RSS / student (MiB) | kernel tree PSS (MiB) | CPU s / student "
             "(tree) | CPU s / student (kernel) | processes | load before -> after |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        lines.append(f"| {r['students']} | {r['wall_s']} | {r['lab_seconds_per_student']} | "
                     f"{r['peak_tree_pss_mib']} | {r['peak_tree_rss_mib']} | "
                     f"{r['peak_kernel_pss_mib']} | {r['cpu_tree_s']} | {r['cpu_kernel_s']} | "
                     f"{r['max_processes']} | {r['load_before'][0]} -> {r['load_after'][0]} |")
    lines += ["", "| per 16 GB / 4-core node | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in size.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--students", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--json", type=Path, help="write every measurement here")
    parser.add_argument("--labs", nargs="+", default=list(LABS), help="run in this order")
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between samples")
    parser.add_argument("--cell-timeout", type=float, default=600.0)
    parser.add_argument("--node-gb", type=float, default=16.0)
    parser.add_argument("--node-cores", type=int, default=4)
    parser.add_argument("--target-seconds", type=float, default=600.0,
                        help="all students on a node run the three labs at once within this")
    args = parser.parse_args(argv)
    if not shutil.which(os.environ.get("VHOSTLAB_QEMU") or "qemu-system-x86_64"):
        print("student_cost: no qemu-system-x86_64 (apt-get install qemu-system-x86)",
              file=sys.stderr)
        return 2
    runs = []
    with tempfile.TemporaryDirectory(prefix="student-cost-") as scratch:
        for k in args.students:
            print(f"== {k} student(s) at once", file=sys.stderr, flush=True)
            runs.append(measure(k, Path(scratch), args.labs, args.interval, args.cell_timeout))
            print(json.dumps({x: runs[-1][x] for x in list(runs[-1])[:12]}), file=sys.stderr)
    size = sizing(runs, args.node_gb, args.node_cores, args.target_seconds)
    machine = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "cores": os.cpu_count(), "memory_gb": round(psutil.virtual_memory().total / 2**30),
               "kernel": platform.release(), "python": platform.python_version(),
               "command": " ".join(["scripts/student_cost.py"] + (argv or sys.argv[1:]))}
    print(report(runs, size))
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "runs": runs, "sizing": size},
                                        indent=2) + "\n")
    failed = {r["students"]: r["errors"] for r in runs if r["errors"]}
    if failed:
        print(f"student_cost: sessions failed: {json.dumps(failed)[:2000]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
