"""QMP and qtest from inside a running ipykernel (nbclient), and a killed kernel's QEMU."""
from __future__ import annotations

import ctypes
import json
import os
import signal
import time

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
from nbclient.exceptions import DeadKernelError  # noqa: E402

pytestmark = pytest.mark.qemu

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_notebook(cells: list[str]):
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    client = nbclient.NotebookClient(nb, timeout=60, kernel_name="python3",
                                     resources={"metadata": {"path": ROOT}})
    return nb, client


def last_json(nb) -> dict:
    for out in nb.cells[-1].outputs:
        if out.get("name") == "stdout":
            return json.loads(out["text"].strip().splitlines()[-1])
    raise AssertionError(f"no stdout in last cell: {nb.cells[-1].outputs}")


def gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_qmp_and_qtest_inside_a_running_kernel(requires_qemu):
    nb, client = run_notebook([
        f"QEMU = {requires_qemu!r}",
        # The kernel's main thread runs an asyncio loop while a cell executes:
        # the situation in which qemu.qmp's legacy client fails.
        "import asyncio, json, os, threading\n"
        "loop_running = asyncio.get_running_loop().is_running()\n"
        "from vhostlab.qemu import QemuInstance\n"
        "q = QemuInstance(None, qemu=QEMU).start()",
        "status = q.qmp.query_status()['status']",
        "q.qmp.stop(); stop = q.qmp.wait_event('STOP', 10)\n"
        "paused = q.qmp.query_status()['status']\n"
        "q.qmp.cont(); resume = q.qmp.wait_event('RESUME', 10)",
        "awaited = (await q.qmp.aexecute('query-status'))['status']",
        "box = []\n"
        "t = threading.Thread(target=lambda: box.append(q.qmp.query_status()['status']))\n"
        "t.start(); t.join(30)",
        "guest = q.guest(); driver_status = guest.status()",
        "pid, workdir = q.pid, q.workdir\n"
        "q.close()\n"
        "print(json.dumps(dict(loop_running=loop_running, status=status, paused=paused,\n"
        "    events=[stop.name, resume.name], awaited=awaited, worker=box,\n"
        "    driver_status=driver_status, pid=pid, workdir=workdir,\n"
        "    workdir_left=os.path.exists(workdir))))",
    ])
    client.execute()
    r = last_json(nb)
    assert r["loop_running"] is True
    assert r["status"] == "running" and r["paused"] == "paused"
    assert r["events"] == ["STOP", "RESUME"]
    assert r["awaited"] == "running" and r["worker"] == ["running"]
    assert r["driver_status"] == 7
    assert not r["workdir_left"] and gone(r["pid"])


PR_SET_CHILD_SUBREAPER = 36


def _subreaper(on: bool) -> None:
    # The kernel's orphaned QEMU is re-parented to us, so we can reap it.
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0)


def test_killed_kernel_takes_qemu_with_it(requires_qemu, tmp_path):
    pid_file = str(tmp_path / "qemu.pid")
    nb, client = run_notebook([
        "from vhostlab.qemu import QemuInstance\n"
        f"q = QemuInstance(None, qemu={requires_qemu!r}).start()\n"
        f"open({pid_file!r}, 'w').write(str(q.pid))",
        "import os, signal; os.kill(os.getpid(), signal.SIGKILL)",
    ])
    pid = None
    _subreaper(True)
    try:
        with pytest.raises(DeadKernelError):
            client.execute()
        with open(pid_file) as f:
            pid = int(f.read())
        end = time.monotonic() + 10
        while not gone(pid) and time.monotonic() < end:
            time.sleep(0.05)
        assert gone(pid), f"QEMU {pid} outlived its killed kernel"
    finally:
        if pid is not None and not gone(pid):
            os.kill(pid, signal.SIGKILL)
        if pid is not None:
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
        _subreaper(False)
