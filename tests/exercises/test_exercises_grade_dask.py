"""`vhostlab grade --scheduler` on a real dask.distributed cluster: a
`dask scheduler` and two `dask worker` processes started here, a class of
right, wrong and looping submissions graded there and here gives the same
CSV and feedback (apart from what each notebook cost), and so does a run in
which a worker is killed while it grades a notebook. `--scheduler local:2`
on 20 students x 3 exercises gives the local run's CSV too.

Needs dask.distributed (the `[nbgrader]` extra, which `make install` installs).
"""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import psutil
import pytest

pytest.importorskip("distributed", reason="dask.distributed is not installed; "
                                          "pip install -e '.[nbgrader]' to run this")

from test_exercises_grade import (LOOPS, REGION_WITHOUT_END_CHECK,  # noqa: E402
                                  RELEASE, SOURCE, USED_WITHOUT_IDX, replaced, source_nb)

from vhostlab.exercises import notebook as nbg  # noqa: E402
from vhostlab.exercises.cluster import ClusterError, local_workers  # noqa: E402
from vhostlab.exercises.grade import COST_COLUMNS, Limits, grade_class  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
LIMITS = Limits(cell_timeout=5, notebook_timeout=120)
LIMIT_ARGS = ("--cell-timeout", "5", "--notebook-timeout", "120")
TRAILING = '''\
def parse_vring_state(data):
    request, flags, size = parse_header(data)
    index, num = struct.unpack_from("<II", data, HEADER_SIZE)
    return request, index, num'''
RAISES = "def parse_header(data):\n    return {}['x']"

# exercise -> the ways a learner hands it in (right, released stub, wrong, looping)
VARIANTS = {
    "vhost_message": [
        lambda: source_nb("vhost_message"),
        lambda: nbg.read(RELEASE / "vhost_message" / "vhost_message.ipynb"),
        lambda: replaced("vhost_message", parse_vring_state=TRAILING),
        lambda: replaced("vhost_message", parse_header=RAISES),
        lambda: replaced("vhost_message", parse_vring_state=LOOPS),
    ],
    "dirty_log": [
        lambda: source_nb("dirty_log"),
        lambda: nbg.read(RELEASE / "dirty_log" / "dirty_log.ipynb"),
        lambda: replaced("dirty_log", log_used=USED_WITHOUT_IDX),
    ],
    "descriptor_chain": [
        lambda: source_nb("descriptor_chain"),
        lambda: replaced("descriptor_chain", find_region=REGION_WITHOUT_END_CHECK),
        lambda: nbg.read(RELEASE / "descriptor_chain" / "descriptor_chain.ipynb"),
    ],
}


def write_small_class(root: Path) -> set[str]:
    """Right, released, wrong and looping notebooks of two exercises (7 to run)."""
    books = {
        "right": {"vhost_message": VARIANTS["vhost_message"][0],
                  "dirty_log": VARIANTS["dirty_log"][0]},
        "fresh": {"vhost_message": VARIANTS["vhost_message"][1],
                  "dirty_log": VARIANTS["dirty_log"][1]},
        "wrong": {"vhost_message": VARIANTS["vhost_message"][2],
                  "dirty_log": VARIANTS["dirty_log"][2]},
        "looper": {"vhost_message": VARIANTS["vhost_message"][4]},  # dirty_log not handed in
    }
    for student, mine in books.items():
        for name, make in mine.items():
            nbg.write(make(), root / student / f"{name}.ipynb")
    return {"vhost_message", "dirty_log"}


def write_big_class(root: Path, students: int = 20) -> set[str]:
    """`students` learners x 3 exercises, each notebook one of its VARIANTS."""
    for i in range(students):
        for k, (name, ways) in enumerate(VARIANTS.items()):
            nbg.write(ways[(i + k) % len(ways)](), root / f"s{i:02d}" / f"{name}.ipynb")
    return set(VARIANTS)


def table(csv_path: Path) -> list[dict]:
    with open(csv_path, newline="") as f:
        return list(csv.DictReader(f))


def graded_part(csv_path: Path) -> list[dict]:
    """The CSV without what each notebook cost (seconds, memory)."""
    return [{k: v for k, v in row.items() if k not in COST_COLUMNS} for row in table(csv_path)]


def feedback(out: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted((out.parent / "feedback").glob("*.md"))}


def assert_same_grades(ours: Path, theirs: Path) -> None:
    assert graded_part(ours) == graded_part(theirs)
    assert feedback(ours) == feedback(theirs)
    for row in table(ours):
        ran = row["status"] != "not_submitted"
        assert (float(row["seconds"]) > 0) == ran and (float(row["peak_mib"]) > 0) == ran, row


@pytest.fixture(scope="module")
def small_class(tmp_path_factory):
    root = tmp_path_factory.mktemp("small")
    only = write_small_class(root / "submitted")
    out = root / "local" / "grades.csv"
    grade_class(root / "submitted", SOURCE, out, LIMITS, jobs=2, only=only)
    statuses = {r["status"] for r in table(out)}
    # the class is worth comparing: every kind of outcome is in it
    assert {"passed", "failed", "not_attempted", "timeout", "not_submitted"} <= statuses
    return root / "submitted", only, out


# ------------------------------------------------------------ a real cluster
def _dask() -> list[str]:
    beside = Path(sys.executable).with_name("dask")
    return [str(beside)] if beside.exists() else [sys.executable, "-m", "dask"]


class Cluster:
    """A `dask scheduler` and `dask worker`s, each its own process (and session)."""

    def __init__(self, tmp: Path, workers: int, tag: str):
        self.tmp, self.tag = tmp, tag
        self.env = dict(os.environ, VHOSTLAB_TEST_TAG=tag,
                        PYTHONPATH=os.pathsep.join(
                            [str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
        self.procs: list[subprocess.Popen] = []
        self.scheduler_file = tmp / "scheduler.json"
        # port 0: the system picks a free port; the file says which
        self._start("scheduler", "scheduler", "--host", "127.0.0.1", "--port", "0",
                    "--no-dashboard", "--dashboard-address", "127.0.0.1:0",
                    "--scheduler-file", str(self.scheduler_file))
        self.address = self._wait_for_address()
        self.workers = [self._start(f"worker{i}", "worker", self.address, "--name", f"w{i}",
                                    "--nthreads", "1", "--no-nanny", "--no-dashboard",
                                    "--dashboard-address", "127.0.0.1:0",
                                    "--memory-limit", "0", "--host", "127.0.0.1",
                                    "--local-directory", str(tmp / f"w{i}"))
                        for i in range(workers)]
        from distributed import Client
        with Client(self.address, timeout="60s") as client:
            client.wait_for_workers(workers, timeout=120)

    def _start(self, log: str, *args: str) -> subprocess.Popen:
        out = open(self.tmp / f"{log}.log", "wb")
        proc = subprocess.Popen(_dask() + list(args), stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, env=self.env, cwd=self.tmp,
                                start_new_session=True)
        out.close()
        self.procs.append(proc)
        return proc

    def _wait_for_address(self) -> str:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.procs[0].poll() is not None:
                raise RuntimeError((self.tmp / "scheduler.log").read_text())
            try:
                return json.loads(self.scheduler_file.read_text())["address"]
            except (OSError, ValueError, KeyError):
                time.sleep(0.2)
        raise RuntimeError("the dask scheduler wrote no address in 60 s")

    def close(self) -> None:
        for proc in reversed(self.procs):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    tag = uuid.uuid4().hex
    c = Cluster(tmp_path_factory.mktemp("cluster"), workers=2, tag=tag)
    try:
        yield c
    finally:
        c.close()
        assert not _graders_left(tag)


def _graders_left(tag: str) -> list[psutil.Process]:
    """Runners and kernels carrying `tag` that are still alive."""
    found = []
    for p in psutil.process_iter():
        try:
            if p.environ().get("VHOSTLAB_TEST_TAG") == tag \
                    and p.status() != psutil.STATUS_ZOMBIE \
                    and any(m in " ".join(p.cmdline()) for m in
                            ("vhostlab.exercises.runner", "vhostlab.exercises.kernel")):
                found.append(p)
        except (psutil.Error, OSError):
            continue
    return found


def test_the_cluster_grades_as_this_machine_does(small_class, cluster, tmp_path):
    submitted, only, local = small_class
    out = tmp_path / "grades.csv"
    grade_class(submitted, SOURCE, out, LIMITS, only=only, scheduler=cluster.address)
    assert_same_grades(out, local)


def _runner_under(workers: list[subprocess.Popen]) -> subprocess.Popen | None:
    """A worker that is running a notebook now (its runner has started a kernel)."""
    for worker in workers:
        try:
            for child in psutil.Process(worker.pid).children():
                if "vhostlab.exercises.runner" in " ".join(child.cmdline()) \
                        and child.children():
                    return worker
        except psutil.Error:
            continue
    return None


def test_a_worker_killed_mid_notebook_costs_that_notebook_a_retry(small_class, cluster,
                                                                   tmp_path):
    submitted, only, local = small_class
    out = tmp_path / "grades.csv"
    failed: list[BaseException] = []

    def grade() -> None:
        try:
            grade_class(submitted, SOURCE, out, LIMITS, only=only, scheduler=cluster.address)
        except BaseException as exc:  # re-raised below, in the test's thread
            failed.append(exc)

    thread = threading.Thread(target=grade)
    thread.start()
    victim = None
    while victim is None and thread.is_alive():
        victim = _runner_under(cluster.workers)
        time.sleep(0.1)
    assert victim is not None, "no worker was seen grading a notebook"
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    thread.join(timeout=300)
    assert not thread.is_alive() and not failed, failed
    assert victim.returncode == -signal.SIGKILL
    assert_same_grades(out, local)
    time.sleep(0.5)
    assert not _graders_left(cluster.tag), "the killed worker's notebook still runs"


# ------------------------------------------------------------ local:N
# A LocalCluster runs in the `vhostlab grade` process, as an instructor runs it;
# here that is a child process, because multiprocessing leaves its resource
# tracker running until the process that used it exits (the labs' tests, later in
# the same pytest process, count every child).
def _vhostlab_grade(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vhostlab", "grade", *args],
                          capture_output=True, text=True, timeout=900)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_local_cluster_grades_a_class_as_the_local_run_does(tmp_path):
    only = write_big_class(tmp_path / "submitted")
    here, there = tmp_path / "here" / "grades.csv", tmp_path / "there" / "grades.csv"
    grade_class(tmp_path / "submitted", SOURCE, here, LIMITS, jobs=2, only=only)
    exercises = [a for name in only for a in ("--exercise", name)]
    done = _vhostlab_grade(str(tmp_path / "submitted"), "--source", str(SOURCE),
                           "--out", str(there), *exercises, *LIMIT_ARGS,
                           "--scheduler", "local:2")
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(table(here)) == 20 * sum(
        sum(nbg.is_grade(c) for c in source_nb(n).cells) for n in only)
    assert {"passed", "failed", "not_attempted", "timeout"} <= {r["status"] for r in table(here)}
    assert_same_grades(there, here)


def test_scheduler_addresses():
    assert local_workers("local:3") == 3
    assert local_workers("tcp://10.0.0.1:8786") is None
    for bad in ("local:0", "local:", "local:two"):
        with pytest.raises(ClusterError, match="positive number of workers"):
            local_workers(bad)


def test_command_line_with_a_local_cluster(small_class, tmp_path):
    submitted, _, local = small_class
    out = tmp_path / "grades.csv"
    done = _vhostlab_grade(str(submitted), "--source", str(SOURCE), "--out", str(out),
                           "--exercise", "vhost_message", "--exercise", "dirty_log",
                           "--cell-timeout", "5", "--notebook-timeout", "120",
                           "--scheduler", "local:2")
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_grades(out, local)
    bad = _vhostlab_grade(str(submitted), "--source", str(SOURCE), "--out", str(out),
                          "--scheduler", "local:none")
    assert bad.returncode == 2 and "positive number of workers" in bad.stderr
