"""`vhostlab grade SUBMISSIONS_DIR --source SOURCE_DIR --out grades.csv`.

Grades every submitted notebook against the instructor's source:

1. Match. ``SUBMISSIONS_DIR/<student>/<exercise>.ipynb`` (flat) or nbgrader's
   ``submitted/<student>/<assignment>/<notebook>.ipynb`` is matched to
   ``SOURCE_DIR/<exercise>/<notebook>.ipynb``.
2. Merge. The notebook that runs is the source's, cell for cell: the
   learner's solution cells are taken by ``grade_id``, every locked and test
   cell comes from the source (hidden tests included, which the learner's copy
   never had), cells the learner added stay where the learner put them.
   A test cell whose ``grade_id`` is gone from the submission scores 0
   ("missing"): deleting or renaming a cell costs that question.
3. Run. Each notebook runs in its own child process (``runner``) with a
   fresh kernel, an address-space limit (RLIMIT_AS), a per-cell time limit
   and a per-notebook wall-clock limit. Results stream back cell by cell, so
   a loop, an exception, ``os._exit``, a segfault or the memory limit costs
   only the questions it broke, and the batch goes on. The kernel gets the
   student's id as ``VHOSTLAB_STUDENT`` (per-student exercises). Cells tagged
   ``grader-skip`` (the learner's self-checks and demos) are not run.
4. Report. One CSV row per student, exercise and graded cell (student,
   exercise, grade_id, points, max_points, status, and the notebook's
   seconds and peak_mib: wall time and peak resident memory of its runner,
   kernel and whatever they started) and one markdown feedback file per
   student in ``feedback/`` next to the CSV, in submission order.

Each notebook is one task of ``grade_task``, which takes the notebooks' bytes
and returns the rows: it runs here (``--jobs N`` at once) or on a Dask
cluster's workers (``--scheduler``, see ``cluster``), and the same rows come
back either way; the files are written here.

Statuses: passed, failed, not_attempted (NotImplementedError), timeout,
kernel_died, not_run (the notebook hit its time limit first), missing
(grade_id deleted or renamed), not_submitted, manual (a written answer a
person grades; worth what the source says, scored 0 here), not_graded (the
grading task itself failed, on a cluster after its retries: no fault of the
notebook's; grade it again).
"""
from __future__ import annotations

import argparse
import copy
import csv
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from nbformat import NotebookNode

from vhostlab.command import standalone
from vhostlab.errors import VhostlabError
from vhostlab.exercises import notebook as nbg
from vhostlab.exercises.rss import PeakRss, parent_of

CSV_COLUMNS = ("student", "exercise", "grade_id", "points", "max_points", "status",
               "seconds", "peak_mib")
#: the columns that differ from run to run of the same class (what it cost)
COST_COLUMNS = ("seconds", "peak_mib")


@dataclass(frozen=True)
class Limits:
    """What one notebook may use while it is graded."""

    cell_timeout: float = 120.0     # seconds per cell
    notebook_timeout: float = 600.0  # seconds per notebook, kernel start-ups included
    memory_mb: int = 4096           # RLIMIT_AS of the runner and its kernel (address
                                    # space, not RAM: guest memory is mapped twice)


@dataclass(frozen=True)
class Row:
    """One graded cell of one student's exercise (a CSV row, plus the message
    the feedback file shows)."""

    student: str
    exercise: str
    grade_id: str
    points: float
    max_points: float
    status: str
    message: str = ""
    seconds: float = 0.0   # the notebook's wall time (its runner's life)
    peak_mib: float = 0.0  # the notebook's peak resident memory, process tree


@dataclass(frozen=True)
class Submission:
    """One (student, exercise) to grade, and where its notebooks are."""

    student: str
    exercise: str
    source: Path
    path: Path | None  # None: not submitted


@dataclass(frozen=True)
class Task:
    """One notebook to grade, carried by value: a worker needs no shared files."""

    student: str
    exercise: str
    source: bytes             # the instructor's notebook
    submitted: bytes | None   # the learner's, None: not submitted


@dataclass(frozen=True)
class Usage:
    """What running one notebook cost."""

    seconds: float
    peak_mib: float


# ---------------------------------------------------------------- matching

def source_notebooks(source_dir: Path) -> dict[str, Path]:
    """exercise name -> source notebook (``<dir>/<dir>.ipynb`` is named ``dir``)."""
    found = {}
    for path in sorted(Path(source_dir).glob("*/*.ipynb")):
        found[exercise_name(path.parent.name, path.stem)] = path
    return found


def exercise_name(assignment: str, notebook: str) -> str:
    return assignment if assignment == notebook else f"{assignment}/{notebook}"


def _visible(path: Path) -> bool:
    return not path.name.startswith(".")


def find_submissions(submissions_dir: Path, source_dir: Path,
                     only: set[str] | None = None) -> tuple[list[Submission], list[str]]:
    """Every (student, exercise) to grade, and warnings about unknown notebooks."""
    sources = source_notebooks(source_dir)
    by_stem = {}
    for name, path in sources.items():
        by_stem.setdefault(path.stem, name)
    subs, warnings = [], []
    for student_dir in sorted(p for p in Path(submissions_dir).iterdir()
                              if p.is_dir() and _visible(p)):
        mine: dict[str, Path] = {}
        for path in sorted(student_dir.glob("*.ipynb")):
            name = by_stem.get(path.stem)
            if name is None:
                warnings.append(f"{path}: no source notebook named {path.stem}.ipynb")
            else:
                mine[name] = path
        for path in sorted(student_dir.glob("*/*.ipynb")):
            if not _visible(path.parent):
                continue
            name = exercise_name(path.parent.name, path.stem)
            if name in sources:
                mine[name] = path
            else:
                warnings.append(f"{path}: no source notebook {path.parent.name}/{path.name}")
        for name, source in sources.items():
            if only is None or name in only:
                subs.append(Submission(student_dir.name, name, source, mine.get(name)))
    return subs, warnings


# ---------------------------------------------------------------- merging

def merge(source: NotebookNode, submitted: NotebookNode) -> tuple[NotebookNode, set[str]]:
    """The notebook to run, and the source grade_ids the submission lacks.

    Source order and source content for every locked and test cell; the
    learner's text for solution cells (by grade_id) and for free cells (by
    cell id); cells the learner added follow the cell they followed.
    """
    by_gid = {nbg.grade_id(c): c for c in submitted.cells if nbg.grade_id(c)}
    src_gids = {nbg.grade_id(c) for c in source.cells if nbg.grade_id(c)}
    src_ids = {c.get("id") for c in source.cells if c.get("id") and not nbg.grade_id(c)}
    by_id, extras_after, anchor = {}, {}, None
    for cell in submitted.cells:
        gid, cid = nbg.grade_id(cell), cell.get("id")
        if gid in src_gids:
            anchor = ("gid", gid)
        elif cid in src_ids:
            by_id[cid] = cell
            anchor = ("id", cid)
        else:
            extras_after.setdefault(anchor, []).append(_plain(cell))
    merged = copy.deepcopy(source)
    merged.cells = list(extras_after.get(None, []))
    for cell in source.cells:
        gid = nbg.grade_id(cell)
        key = ("gid", gid) if gid else ("id", cell.get("id"))
        chosen = _choose(cell, by_gid.get(gid) if gid else by_id.get(cell.get("id")))
        if chosen is not None:
            merged.cells.append(chosen)
        merged.cells.extend(extras_after.get(key, []))
    return merged, {g for g in src_gids if g not in by_gid}


def _choose(src: NotebookNode, mine: NotebookNode | None) -> NotebookNode | None:
    cell = copy.deepcopy(src)
    if nbg.is_solution(src) or not nbg.meta(src):
        if mine is None:
            return None if not nbg.meta(src) else _stubbed(cell)
        cell.source = mine.source
    if cell.cell_type == "code":
        cell.outputs, cell.execution_count = [], None
    return cell


def _stubbed(cell: NotebookNode) -> NotebookNode:
    from vhostlab.exercises.assign import release_cell
    return release_cell(cell)


def _plain(cell: NotebookNode) -> NotebookNode:
    """A learner's added cell, stripped of any nbgrader role it claims."""
    cell = copy.deepcopy(cell)
    cell.get("metadata", {}).pop("nbgrader", None)
    if cell.cell_type == "code":
        cell.outputs, cell.execution_count = [], None
    return cell


# ---------------------------------------------------------------- running

def run_notebook(nb: NotebookNode, limits: Limits,
                 student: str | None = None) -> tuple[list[dict], str]:
    """Execute `nb` in a child process under `limits`; (cell records, trouble)."""
    records, trouble, _usage = run_measured(nb, limits, student)
    return records, trouble


def run_measured(nb: NotebookNode, limits: Limits,
                 student: str | None = None) -> tuple[list[dict], str, Usage]:
    """Execute `nb` in a child process under `limits`; (cell records, trouble, usage).

    ``student`` reaches the kernel as ``VHOSTLAB_STUDENT``: exercises whose
    data differ per student (broken_migration's fault) read it there.

    `trouble` is empty when the runner finished; otherwise it says why not
    (the notebook time limit, or the runner's own last words). The child and
    everything it started are gone when this returns, whatever happened.
    """
    with tempfile.TemporaryDirectory(prefix="vhostlab-grade-") as tmp:
        nb_path, results = Path(tmp) / "graded.ipynb", Path(tmp) / "results.jsonl"
        nbg.write(nb, nb_path)
        results.touch()
        cmd = [sys.executable, "-m", "vhostlab.exercises.runner", str(nb_path), str(results),
               "--cell-timeout", str(limits.cell_timeout), "--memory-mb", str(limits.memory_mb),
               "--scratch", tmp]
        trouble = ""
        with open(Path(tmp) / "runner.log", "w+b") as log:
            # its own session: one killpg stops the runner and all it started
            env = dict(os.environ)
            env.pop("VHOSTLAB_STUDENT", None)
            if student is not None:
                env["VHOSTLAB_STUDENT"] = student
            began = time.monotonic()
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                    start_new_session=True, env=env)
            with PeakRss(proc.pid) as peak:
                try:
                    proc.wait(timeout=limits.notebook_timeout)
                except subprocess.TimeoutExpired:
                    trouble = f"notebook time limit ({limits.notebook_timeout:g} s) reached"
                finally:
                    if proc.poll() is None:
                        _kill_runner(proc, _read_records(results))
            usage = Usage(time.monotonic() - began, peak.mib)
            if not trouble and proc.returncode != 0:
                log.seek(0)
                tail = log.read().decode("utf-8", "replace").strip().splitlines()[-3:]
                trouble = f"grader runner exited {proc.returncode}: " + " | ".join(tail)
        records = _read_records(results)
        if not trouble and not any(r.get("event") == "done" for r in records):
            gave_up = [r for r in records if r.get("event") == "gave_up"]
            trouble = gave_up[-1]["reason"] if gave_up else "the runner stopped early"
        return records, trouble, usage


def _read_records(path: Path) -> list[dict]:
    records = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue  # a line cut short by a kill
    return records


def _kill_runner(proc: subprocess.Popen, records: list[dict]) -> None:
    """Kill the runner's session (its process group) and any kernel it still has."""
    for rec in records:
        pid = rec.get("pid") if rec.get("event") == "kernel" else None
        if pid and parent_of(pid) == proc.pid:
            _killpg(pid)
    _killpg(proc.pid)
    proc.wait()


def _killpg(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


# ---------------------------------------------------------------- scoring

def score(sub: Submission | Task, source: NotebookNode, missing: set[str],
          records: list[dict], trouble: str, usage: Usage = Usage(0.0, 0.0)) -> list[Row]:
    """One Row per grade cell of the source, from the runner's cell records."""
    by_gid, running = {}, None
    for rec in records:
        if rec.get("event") == "start":
            running = rec
        elif rec.get("event") == "cell":
            running = None
            if rec.get("grade_id"):
                by_gid[rec["grade_id"]] = rec
    if running is not None and running.get("grade_id") and trouble:
        # the notebook's time ran out while this cell ran: it is the one that looped
        by_gid[running["grade_id"]] = {"status": "timeout", "evalue": trouble}
    rows = []
    for cell in source.cells:
        if not nbg.is_grade(cell):
            continue
        gid, most = nbg.grade_id(cell), nbg.points(cell)
        status, message = _status(cell, gid, missing, by_gid.get(gid), trouble)
        rows.append(Row(sub.student, sub.exercise, gid,
                        most if status == "passed" else 0.0, most, status, message,
                        usage.seconds, usage.peak_mib))
    return rows


def _status(cell, gid: str, missing: set[str], rec: dict | None, trouble: str) -> tuple[str, str]:
    if gid in missing and not nbg.is_solution(cell):
        return "missing", f"the cell {gid!r} is gone from the submission (deleted or renamed)"
    if cell.cell_type != "code" or nbg.is_solution(cell):
        return "manual", "a written answer: read and scored by the instructor"
    if rec is None:
        return "not_run", trouble or "the cell did not run"
    if rec["status"] == "ok":
        return "passed", ""
    if rec["status"] == "timeout":
        return "timeout", ("the cell ran past its time limit"
                           + (f": {rec['evalue']}" if "notebook" in rec.get("evalue", "") else ""))
    if rec["status"] == "died":
        return "kernel_died", "the kernel died (os._exit, a crash, or the memory limit)"
    if rec.get("ename") == "NotImplementedError":
        return "not_attempted", "NotImplementedError: the solution is still the stub"
    return "failed", f"{rec.get('ename')}: {rec.get('evalue')}".strip()


def task_of(sub: Submission) -> Task:
    """The notebooks' bytes, read here so that no worker needs this filesystem."""
    return Task(sub.student, sub.exercise, sub.source.read_bytes(),
                None if sub.path is None else sub.path.read_bytes())


def grade_task(task: Task, limits: Limits) -> list[Row]:
    """Grade one notebook (or score a missing one 0): the unit of work, local or
    on a cluster's worker."""
    source = nbg.reads(task.source)
    if task.submitted is None:
        return zero_rows(task, source, "not_submitted", "no notebook submitted")
    try:
        submitted = nbg.reads(task.submitted)
    except Exception as exc:  # not JSON, not a notebook: the whole exercise is 0
        return zero_rows(task, source, "failed", f"the notebook could not be read: {exc}")
    merged, missing = merge(source, submitted)
    merged.cells = [c for c in merged.cells
                    if not (nbg.is_grade(c) and nbg.grade_id(c) in missing
                            and not nbg.is_solution(c))]
    records, trouble, usage = run_measured(merged, limits, student=task.student)
    return score(task, source, missing, records, trouble, usage)


def grade_one(sub: Submission, limits: Limits) -> list[Row]:
    """Grade one submission here."""
    return grade_task(task_of(sub), limits)


def zero_rows(task: Task, source: NotebookNode, status: str, message: str) -> list[Row]:
    """Every grade cell of `source` at 0 points with `status`."""
    return [Row(task.student, task.exercise, nbg.grade_id(c), 0.0, nbg.points(c),
                status, message) for c in source.cells if nbg.is_grade(c)]


# ---------------------------------------------------------------- reporting

def write_csv(rows: list[Row], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_COLUMNS)
        for r in rows:
            writer.writerow([r.student, r.exercise, r.grade_id, f"{r.points:g}",
                             f"{r.max_points:g}", r.status, f"{r.seconds:.2f}",
                             f"{r.peak_mib:.1f}"])


def feedback_markdown(student: str, rows: list[Row]) -> str:
    """A learner's feedback: points per question and what went wrong."""
    got, most = sum(r.points for r in rows), sum(r.max_points for r in rows)
    lines = [f"# Feedback for {student}", "", f"Total: **{got:g} / {most:g}** points", ""]
    for exercise in dict.fromkeys(r.exercise for r in rows):
        mine = [r for r in rows if r.exercise == exercise]
        lines += [f"## {exercise}: {sum(r.points for r in mine):g} / "
                  f"{sum(r.max_points for r in mine):g}", "",
                  "| question | points | status | what happened |", "|---|---|---|---|"]
        for r in mine:
            lines.append(f"| `{r.grade_id}` | {r.points:g} / {r.max_points:g} | {r.status} | "
                         f"{_md_cell(r.message)} |")
        lines.append("")
    return "\n".join(lines)


def _md_cell(text: str) -> str:
    text = " ".join(text.split())
    return text.replace("|", "\\|").replace("<", "&lt;")[:600]


def write_feedback(rows: list[Row], feedback_dir: Path) -> list[Path]:
    feedback_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for student in dict.fromkeys(r.student for r in rows):
        path = feedback_dir / f"{student}.md"
        path.write_text(feedback_markdown(student, [r for r in rows if r.student == student]),
                        encoding="utf-8")
        written.append(path)
    return written


def log_graded(log, rows: list[Row], where: str = "") -> None:
    if log and rows:
        got, most = sum(r.points for r in rows), sum(r.max_points for r in rows)
        log(f"{rows[0].student} {rows[0].exercise}: {got:g} / {most:g}{where}")


def grade_here(tasks: list[Task], limits: Limits, jobs: int = 1, log=None) -> list[list[Row]]:
    """Each task's rows, in task order, graded `jobs` at a time on this machine."""
    lock = threading.Lock()

    def one(task: Task) -> list[Row]:
        rows = grade_task(task, limits)
        with lock:
            log_graded(log, rows)
        return rows

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        return list(pool.map(one, tasks))


def grade_class(submissions_dir: str | Path, source_dir: str | Path, out: str | Path,
          limits: Limits = Limits(), jobs: int = 1, only: set[str] | None = None,
          log=None, scheduler: str | None = None) -> list[Row]:
    """Grade a class; write the CSV at `out` and feedback/ next to it.

    ``scheduler``: a Dask scheduler's address, or ``local:N`` for a cluster of
    N worker processes on this machine; None grades here, `jobs` at a time.
    """
    subs, warnings = find_submissions(Path(submissions_dir), Path(source_dir), only)
    for w in warnings:
        if log:
            log(f"warning: {w}")
    tasks = [task_of(s) for s in subs]
    if scheduler:
        from vhostlab.exercises.cluster import grade_on_dask
        graded = grade_on_dask(tasks, limits, scheduler, log=log)
    else:
        graded = grade_here(tasks, limits, jobs, log=log)
    rows = [r for task_rows in graded for r in task_rows]
    out = Path(out)
    write_csv(rows, out)
    write_feedback(rows, out.parent / "feedback")
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = Limits()
    parser.add_argument("submissions_dir", metavar="SUBMISSIONS_DIR",
                        help="<student>/<exercise>.ipynb, or nbgrader's "
                             "submitted/<student>/<assignment>/<notebook>.ipynb")
    parser.add_argument("--source", required=True, metavar="SOURCE_DIR",
                        help="instructor notebooks: SOURCE_DIR/<exercise>/<exercise>.ipynb")
    parser.add_argument("--out", default="grades.csv", help="CSV to write (feedback/ goes next to it)")
    parser.add_argument("--exercise", action="append", metavar="NAME",
                        help="grade only this exercise (repeatable)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="notebooks graded at once (default 1: Binder has one CPU)")
    parser.add_argument("--scheduler", metavar="ADDRESS",
                        help="grade on a Dask cluster: its scheduler's address "
                             "(tcp://host:8786), or local:N for N worker processes here "
                             "(needs dask[distributed]; --jobs is then unused)")
    parser.add_argument("--cell-timeout", type=float, default=d.cell_timeout,
                        help=f"seconds per cell (default {d.cell_timeout:g})")
    parser.add_argument("--notebook-timeout", type=float, default=d.notebook_timeout,
                        help=f"seconds per notebook (default {d.notebook_timeout:g})")
    parser.add_argument("--memory-mb", type=int, default=d.memory_mb,
                        help=f"address-space limit per notebook in MiB (default {d.memory_mb})")


def run(args: argparse.Namespace) -> int:
    for name in ("submissions_dir", "source"):
        if not Path(getattr(args, name)).is_dir():
            print(f"vhostlab grade: {getattr(args, name)} is not a directory", file=sys.stderr)
            return 2
    limits = Limits(args.cell_timeout, args.notebook_timeout, args.memory_mb)
    try:
        rows = grade_class(args.submissions_dir, args.source, args.out, limits, args.jobs,
                           set(args.exercise) if args.exercise else None,
                           log=lambda s: print(s, file=sys.stderr), scheduler=args.scheduler)
    except VhostlabError as exc:
        print(f"vhostlab grade: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} ({len(rows)} rows) and {Path(args.out).parent / 'feedback'}/")
    return 0


main = standalone("grade", __doc__, add_arguments, run)


if __name__ == "__main__":
    sys.exit(main())
