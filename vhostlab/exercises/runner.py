"""Run one notebook in a fresh kernel and report every cell as it finishes.

The grader starts it as a child process per notebook, in a session of its
own (so that one kill stops it and everything it started):

    python -m vhostlab.exercises.runner NOTEBOOK RESULTS --cell-timeout S --memory-mb M

It dies with the grader that started it (``PR_SET_PDEATHSIG``), caps its
own address space (RLIMIT_AS, inherited by the kernel it starts), executes
the cells one by one with nbclient, and appends one JSON line per cell to
RESULTS the moment the cell ends, so that whatever happens later (the
notebook time limit kills this process, the kernel dies) the grader keeps
every result already earned.

Cells tagged ``grader-skip`` (the learner's self-checks and demos) are not
run: the hidden tests do the checking. A cell that runs past its time limit or kills the kernel (``os._exit``, a
segfault, the memory limit) is recorded as such; the runner then starts a
fresh kernel, replays the cells before it that define things (set-up and
solution cells, not tests, not cells that failed that way) and goes on
with the next cell, so a crash costs only what it broke.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient
from nbclient.exceptions import CellTimeoutError, DeadKernelError

from vhostlab.exercises import notebook as nbg
from vhostlab.exercises.kernel import die_with_parent, limit_address_space

KERNEL_NAME = "vhostlab-grader"
MAX_RESTARTS = 4
# Cells tagged so are for the learner only (self-checks, demos): graders skip them.
SKIP_TAG = "grader-skip"


def _kernel_spec_dir(root: Path, memory_bytes: int) -> Path:
    """A private kernelspec: this interpreter, our kernel wrapper, the limit."""
    spec = root / "kernels" / KERNEL_NAME
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "vhostlab.exercises.kernel", "-f", "{connection_file}"],
        "display_name": "vhostlab grader", "language": "python",
        "env": {"VHOSTLAB_KERNEL_AS_BYTES": str(memory_bytes), "PYTHONHASHSEED": "0"},
    }))
    return spec.parent


def cell_status(cell) -> tuple[str, str, str]:
    """('ok' | 'error', ename, evalue) from an executed cell's outputs."""
    for out in cell.get("outputs", []):
        if out.get("output_type") == "error":
            return "error", out.get("ename", ""), out.get("evalue", "")
    return "ok", "", ""


class Runner:
    """Executes a notebook cell by cell, restarting the kernel after a crash."""

    def __init__(self, nb, results, cell_timeout: float, workdir: Path, spec_dir: Path):
        self.nb = nb
        self.results = results
        self.cell_timeout = cell_timeout
        self.workdir = workdir
        self.spec_dir = spec_dir
        self.fatal: set[int] = set()  # cells that timed out or killed a kernel

    def emit(self, **record) -> None:
        self.results.write(json.dumps(record) + "\n")
        self.results.flush()

    def replayable(self, index: int) -> bool:
        cell = self.nb.cells[index]
        return (cell.cell_type == "code" and index not in self.fatal
                and (not nbg.is_grade(cell) or nbg.is_solution(cell)))

    async def run(self) -> None:
        start, restarts = 0, 0
        while start < len(self.nb.cells):
            if restarts > MAX_RESTARTS:
                self.emit(event="gave_up", index=start, reason="too many kernel restarts")
                return
            start = await self._session(start, replay=restarts > 0)
            restarts += 1
        if start == len(self.nb.cells):
            self.emit(event="done")

    async def _replay(self, client, start: int) -> bool:
        """Run again, in a fresh kernel, the defining cells before `start`."""
        index = 0
        try:
            for index in range(start):
                if self.replayable(index):
                    await client.async_execute_cell(self.nb.cells[index], index)
        except (CellTimeoutError, DeadKernelError) as exc:
            self.emit(event="gave_up", index=start,
                      reason=f"replaying cell {index} after a restart: {type(exc).__name__}")
            return False
        return True

    async def _session(self, start: int, replay: bool) -> int:
        """One kernel's life: replay, then run from `start`; return where to go on."""
        ksm = KernelSpecManager(kernel_dirs=[str(self.spec_dir)], ensure_native_kernel=False)
        km = AsyncKernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=ksm)
        client = NotebookClient(self.nb, km=km, timeout=self.cell_timeout, allow_errors=True,
                                interrupt_on_timeout=False, startup_timeout=120,
                                iopub_timeout=10, raise_on_iopub_timeout=False,
                                skip_cells_with_tag=SKIP_TAG)
        try:
            await client.async_start_new_kernel(cwd=str(self.workdir))
            self.emit(event="kernel", pid=km.provisioner.pid if km.provisioner else None)
            await client.async_start_new_kernel_client()
            if replay and not await self._replay(client, start):
                return len(self.nb.cells) + 1
            for index in range(start, len(self.nb.cells)):
                cell = self.nb.cells[index]
                if cell.cell_type != "code" or not cell.source.strip() \
                        or SKIP_TAG in cell.metadata.get("tags", []):
                    continue
                self.emit(event="start", index=index, grade_id=nbg.grade_id(cell))
                began = time.monotonic()
                try:
                    await client.async_execute_cell(cell, index)
                except (CellTimeoutError, DeadKernelError) as exc:
                    fatal = "timeout" if isinstance(exc, CellTimeoutError) else "died"
                    self.fatal.add(index)
                    self.emit(event="cell", index=index, grade_id=nbg.grade_id(cell),
                              status=fatal, ename=type(exc).__name__, evalue=str(exc)[:500],
                              seconds=round(time.monotonic() - began, 3))
                    return index + 1
                status, ename, evalue = cell_status(cell)
                self.emit(event="cell", index=index, grade_id=nbg.grade_id(cell),
                          status=status, ename=ename, evalue=evalue[:2000],
                          seconds=round(time.monotonic() - began, 3))
            return len(self.nb.cells)
        finally:
            await _shutdown(km, client)


async def _shutdown(km, client) -> None:
    try:
        if client.kc is not None:
            client.kc.stop_channels()
        if km.has_kernel:
            await km.shutdown_kernel(now=True)
    except Exception:  # a kernel already gone is the usual case here
        pass
    finally:
        try:
            km.cleanup_resources()
        except Exception:
            pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vhostlab.exercises.runner")
    parser.add_argument("notebook")
    parser.add_argument("results")
    parser.add_argument("--cell-timeout", type=float, default=120.0)
    parser.add_argument("--memory-mb", type=int, default=0)
    parser.add_argument("--scratch", help="a directory for the kernel's files (default: a "
                                          "temporary one)")
    args = parser.parse_args(argv)
    # a grader that dies (a Dask worker killed mid-notebook) takes its runner along,
    # and the kernel goes with the runner: no notebook runs on unwatched
    die_with_parent()
    limit_address_space(args.memory_mb * 2**20)
    nb = nbg.read(args.notebook)
    with tempfile.TemporaryDirectory(prefix="vhostlab-grade-", dir=args.scratch) as tmp, \
            open(args.results, "a", encoding="utf-8") as results:
        # connection files too, so that nothing outlives a killed runner
        os.environ["JUPYTER_RUNTIME_DIR"] = str(Path(tmp) / "runtime")
        spec_dir = _kernel_spec_dir(Path(tmp) / "spec", args.memory_mb * 2**20)
        workdir = Path(tmp) / "work"
        workdir.mkdir()
        os.chdir(workdir)
        asyncio.run(Runner(nb, results, args.cell_timeout, workdir, spec_dir).run())
    return 0



if __name__ == "__main__":
    sys.exit(main())
