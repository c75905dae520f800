"""Grading on a Dask cluster: `vhostlab grade ... --scheduler ADDRESS`.

When a class outgrows one machine, each notebook becomes one task of
``grade.grade_task`` on an existing ``dask.distributed`` cluster rather than
on a scheduler of the kit's own. The task carries the notebooks' bytes and
returns the rows (scores, messages, seconds, peak memory), so workers need no
shared filesystem: this process reads the submissions and writes the CSV and
the feedback, in submission order, the same files as a local run.

Each worker still runs its notebooks as the local grader does: a runner
process per notebook with the same limits (cell and notebook time,
RLIMIT_AS). So a worker needs the kit and QEMU installed (the Binder image,
or ``make install``), and the same dask as this client.

Failures: a worker that dies mid-notebook (and takes its runner and kernel
with it, ``PR_SET_PDEATHSIG``) costs that notebook a retry: the scheduler
runs the task again elsewhere, up to its ``distributed.scheduler.allowed-
failures`` (3 by default) worker deaths; an exception in the task is retried
``retries`` times (``Client.submit(retries=)``). A task that still fails
gets ``not_graded`` rows saying why; the batch goes on.

``local:N`` starts a LocalCluster of N worker processes (one thread each)
here and closes it at the end: the same path, for one machine.
"""
from __future__ import annotations

import uuid
from contextlib import ExitStack

from vhostlab.errors import VhostlabError
from vhostlab.exercises import notebook as nbg
from vhostlab.exercises.grade import Limits, Row, Task, grade_task, log_graded, zero_rows

#: Dask's retries of a grading task that raised (not of a notebook that failed:
#: that is a grade, not an error)
RETRIES = 2
LOCAL = "local:"


class ClusterError(VhostlabError):
    """The Dask cluster cannot be used: dask missing, a bad address, no scheduler."""


def local_workers(address: str) -> int | None:
    """N for ``local:N``, None for a scheduler's address."""
    if not address.startswith(LOCAL):
        return None
    text = address[len(LOCAL):]
    if not text.isdigit() or int(text) < 1:
        raise ClusterError("a local cluster needs a positive number of workers",
                           what="--scheduler", field="local", value=text, limit=">= 1")
    return int(text)


def _distributed():
    try:
        import distributed
    except ImportError as exc:
        raise ClusterError(f"--scheduler needs dask.distributed ({exc}): "
                           "pip install 'dask[distributed]', or the kit's [nbgrader] extra") \
            from None
    return distributed


def not_graded(task: Task, error: BaseException) -> list[Row]:
    """The rows of a task that failed for good: 0 points, and why."""
    why = f"{type(error).__name__}: {error}".strip()
    return zero_rows(task, nbg.reads(task.source), "not_graded",
                     f"the grading task failed after its retries, no fault of the "
                     f"notebook's; grade it again ({why})")


def grade_on_dask(tasks: list[Task], limits: Limits, address: str, log=None,
                  retries: int = RETRIES) -> list[list[Row]]:
    """Each task's rows, in task order, graded on the cluster at `address`."""
    distributed = _distributed()
    workers = local_workers(address)
    with ExitStack() as stack:
        if workers is not None:
            # memory_limit=0: each notebook has its own RLIMIT_AS in its runner;
            # the nanny's limit would count the worker only, and restart it
            target = stack.enter_context(distributed.LocalCluster(
                n_workers=workers, processes=True, threads_per_worker=1, memory_limit=0,
                dashboard_address=":0"))
        else:
            target = address
        try:
            client = stack.enter_context(distributed.Client(target, timeout="30s"))
        except (OSError, TimeoutError) as exc:
            raise ClusterError(f"no Dask scheduler answers: {exc}", what="--scheduler",
                               value=address) from None
        run = uuid.uuid4().hex[:8]
        futures = {client.submit(grade_task, task, limits, retries=retries, pure=False,
                                 key=f"grade-{run}-{i}-{task.student}-{task.exercise}"): i
                   for i, task in enumerate(tasks)}
        graded: list[list[Row] | None] = [None] * len(tasks)
        for fut in distributed.as_completed(futures):
            i = futures[fut]
            try:
                graded[i] = fut.result()
            except Exception as exc:  # KilledWorker, or the task's own error after retries
                graded[i] = not_graded(tasks[i], exc)
            log_graded(log, graded[i])
        return graded
