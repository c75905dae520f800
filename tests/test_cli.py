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


def test_doctor_reports_the_qemu_version_and_whether_ci_covers_it(requires_qemu):
    import os
    report = json.loads(vhostlab("doctor", "--json", env=dict(os.environ, VHOSTLAB_QEMU=requires_qemu)).stdout)
    qemu = report["qemu"]
    assert qemu["path"] == requires_qemu and qemu["usable"]
    version = subprocess.run([requires_qemu, "--version"], capture_output=True, text=True).stdout
    assert f"version {qemu['version']}" in version
    assert qemu["ci"] in ("tested", "in range", "untested") and "7.2" in qemu["ci_releases"]
    if os.environ.get("VHOSTLAB_REQUIRE_QEMU") == "1":   # CI runs only the releases it lists
        assert qemu["ci"] == "tested", qemu
    assert qemu["version"] in report["checks"]["qemu"]["detail"]


def test_doctor_names_the_fix_for_a_missing_qemu(tmp_path):
    import os
    env = dict(os.environ, PATH=str(tmp_path), VHOSTLAB_QEMU="")
    out = vhostlab("doctor", env=env)
    assert out.returncode == 0
    assert "apt-get install" in out.stdout and "qemu-system-x86" in out.stdout
    assert "built-in front-end" in out.stdout


def test_help_lists_the_subcommands():
    out = vhostlab("--help")
    for sub in ("doctor", "demo", "serve", "bench", "lab", "assign", "grade"):
        assert sub in out.stdout


def _demo_json(*args: str) -> tuple[dict, int]:
    out = vhostlab("demo", "--json", *args)
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1, f"expected one JSON line on stdout, got {out.stdout!r}\n{out.stderr}"
    return json.loads(lines[0]), out.returncode


def test_demo_builtin_delivers_every_frame():
    summary, code = _demo_json("--frontend", "builtin")
    assert code == 0
    assert summary["frontend"] == "builtin" and summary["integrity"] == "ok"
    frames = summary["frames"]
    assert frames["sent"] > 0 and frames["delivered"] == frames["sent"]
    assert frames["lost"] == frames["corrupted"] == 0
    assert summary["migration"]["status"] == "completed"
    assert summary["vhost_log"]["pages_logged"] > 0 and summary["vhost_log"]["syncs"] >= 1
    assert "vhost_set_log_base" in summary["ops_called"]


def test_demo_builtin_with_broken_logging_is_caught():
    summary, code = _demo_json("--frontend", "builtin", "--break-logging")
    assert code == 3
    assert summary["integrity"] == "corrupted"
    assert summary["frames"]["lost"] + summary["frames"]["corrupted"] > 0


def test_demo_builtin_against_dpdk_back_ends(requires_dpdk):
    summary, code = _demo_json("--frontend", "builtin", "--backend", "dpdk")
    assert code == 0, summary
    assert summary["backend"] == "dpdk" and summary["integrity"] == "ok"
    frames = summary["frames"]
    assert frames["sent"] > 0 and frames["delivered"] == frames["sent"]
    assert frames["lost"] == frames["corrupted"] == frames["duplicated"] == 0
    assert summary["vhost_log"]["pages_logged"] > 0          # DPDK marked the log
    assert summary["migration"]["pages_mismatched"] == 0
    assert summary["rarp_frames"] == 1                       # DPDK's answer to SEND_RARP
    assert "vhost_get_vring_base" in summary["ops_called"]


def test_demo_against_dpdk_ignoring_its_log_is_caught(requires_dpdk):
    summary, code = _demo_json("--frontend", "builtin", "--backend", "dpdk", "--break-logging")
    assert code == 3 and summary["integrity"] == "corrupted"
    assert summary["frames"]["lost"] + summary["frames"]["corrupted"] > 0


def test_doctor_says_whether_dpdk_is_usable(requires_dpdk):
    report = json.loads(vhostlab("doctor", "--json").stdout)
    check = report["checks"]["dpdk-testpmd"]
    assert check["ok"] and "vhost port started" in check["detail"], check


def test_demo_qemu_migrates_with_integrity(requires_qemu):
    summary, code = _demo_json("--frontend", "qemu")
    assert code == 0, summary
    assert summary["frontend"] == "qemu" and summary["integrity"] == "ok"
    assert summary["migration"]["status"] == "completed"
    assert summary["dirty_sync_count"] >= 3
    assert summary["frames"]["lost"] == summary["frames"]["corrupted"] == 0
    for key in ("qemu_version", "total_time_ms", "downtime_ms", "frames_by_direction"):
        assert key in summary


def test_demo_qemu_with_broken_logging_exits_3(requires_qemu):
    summary, code = _demo_json("--frontend", "qemu", "--break-logging")
    assert code == 3 and summary["integrity"] == "corrupted"


def test_demo_recorded_narrates_the_seed_sequence():
    out = vhostlab("demo", "--frontend", "recorded")
    assert out.returncode == 0
    text = out.stdout
    assert text.index("SET_LOG_BASE") < text.index("GET_VRING_BASE")


def test_demo_recorded_narrates_every_message_as_every_narration_does():
    from vhostlab.demo import narrate, run_recorded
    from vhostlab.protocol.recorded import QEMU_7_2_SEQUENCE
    lines: list[str] = []
    summary, code = run_recorded(out=lines.append)
    assert code == 0 and summary["messages"] == len(QEMU_7_2_SEQUENCE)
    for entry in QEMU_7_2_SEQUENCE:
        assert "  " + narrate(entry) in lines
    mem = next(line for line in lines if "-> SET_MEM_TABLE" in line)
    assert mem.endswith("(need_reply) + 3 fds") and "guest_phys_addr=0x100000" in mem
    assert "memory_size=0xff00000" in mem
    assert "  -> SET_LOG_BASE {mmap_size=0x2000, mmap_offset=0x0} + 1 fd" in lines
    summary, code = run_recorded(break_logging=True, out=lines.append)
    assert code == 2 and "error" in summary
