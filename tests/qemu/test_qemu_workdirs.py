"""The clean-up parts QemuInstance and VhostUserHost share, without QEMU."""
from __future__ import annotations

import os
import stat

import pytest

from vhostlab.qemu import QemuExitedError, VhostUserHost
from vhostlab.qemu.launcher import WORKDIR_PREFIX, close_each, make_workdir, started


def test_make_workdir_is_private_and_named_for_the_sweep():
    path = make_workdir("q", closed=False)
    try:
        assert os.path.basename(path).startswith(f"{WORKDIR_PREFIX}{os.getpid()}-")
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o700
    finally:
        os.rmdir(path)


def test_a_closed_owner_makes_no_workdir():
    with pytest.raises(QemuExitedError, match="q is closed"):
        make_workdir("q", closed=True)


def test_close_each_runs_every_step_and_removes_the_workdir():
    path, ran = make_workdir("q", closed=False), []

    def broken():
        ran.append("broken")
        raise OSError("gone already")

    close_each(broken, lambda: ran.append("next"), workdir=path)
    assert ran == ["broken", "next"] and not os.path.exists(path)


def test_started_names_what_is_not_started():
    assert started(5, "x") == 5
    with pytest.raises(QemuExitedError, match="x: QEMU is not started"):
        started(None, "x: QEMU")


def test_a_host_that_was_never_started_says_so_and_closes_cleanly():
    host = VhostUserHost("h")
    workdir = os.path.dirname(host.socket_path)
    with pytest.raises(RuntimeError, match="h: the back-end is not started"):
        host.server
    with pytest.raises(RuntimeError, match="h: QEMU is not started"):
        host.qemu
    host.close()
    assert not os.path.exists(workdir)
    with pytest.raises(RuntimeError, match="h is closed"):
        host.socket_path
