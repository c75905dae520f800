"""The `vhostlab` command as a user runs it: a real subprocess."""
from __future__ import annotations

import json
import subprocess
import sys


def vhostlab(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vhostlab", *args],
                          capture_output=True, text=True, timeout=120, **kw)


def test_doctor_json_is_valid_and_reports_real_checks():
    out = vhostlab("doctor", "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["python"].count(".") == 2
    for name in ("memfd", "eventfd", "fd_passing", "qemu", "dpdk-testpmd", "/dev/kvm", "/dev/vhost-net"):
        assert name in report["checks"]
    # The three kernel facilities vhost-user stands on must work on any Linux the kit supports.
    assert all(report["checks"][n]["ok"] for n in ("memfd", "eventfd", "fd_passing"))
    assert report["frontend"] in ("qemu", "builtin")


def test_doctor_frontend_follows_override():
    import os
    env = dict(os.environ, VHOSTLAB_FRONTEND="builtin")
    report = json.loads(vhostlab("doctor", "--json", env=env).stdout)
    assert report["frontend"] == "builtin"


def test_doctor_names_the_fix_for_a_missing_qemu(tmp_path):
    import os
    env = dict(os.environ, PATH=str(tmp_path), VHOSTLAB_QEMU="")
    out = vhostlab("doctor", env=env)
    assert out.returncode == 0
    assert "apt-get install" in out.stdout and "qemu-system-x86" in out.stdout
    assert "built-in front-end" in out.stdout


def test_help_lists_the_subcommands():
    out = vhostlab("--help")
    for sub in ("doctor", "demo", "bench", "lab"):
        assert sub in out.stdout
