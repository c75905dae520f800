"""`vhostlab doctor`: what this machine offers the labs, and how to get what is missing.

Every check is a real attempt (create a memfd, pass an fd over a socket), not a
guess from the platform name, because Binder images and laptops differ in just
these details.
"""
from __future__ import annotations

import contextlib
import json
import mmap
import os
import platform
import socket
import sys
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator

from vhostlab.backend.dpdk import dpdk_usable, find_testpmd

APT_QEMU = "sudo apt-get install -y --no-install-recommends qemu-system-x86"
APT_DPDK = "sudo apt-get install -y --no-install-recommends dpdk dpdk-dev"


@dataclass
class Check:
    """One line of the report: what was checked, whether it holds, and how to fix it."""

    name: str
    ok: bool
    detail: str = ""
    fix: str = ""
    required: bool = False


@dataclass
class Report:
    python: str
    numpy: str
    numba: str
    qemu: dict | None
    dpdk_testpmd: str | None
    frontend: str
    checks: list[Check] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["checks"] = {c.name: {"ok": c.ok, "detail": c.detail, "fix": c.fix} for c in self.checks}
        return d


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except Exception as exc:  # a broken install is exactly what doctor reports
        return f"unavailable ({exc.__class__.__name__}: {exc})"


def qemu_info() -> dict | None:
    """Path, version and usability of the QEMU the labs would start, or None."""
    try:
        from vhostlab.qemu.launcher import CI_QEMU_RELEASES, ci_coverage, find_qemu
        info = find_qemu()
    except Exception as exc:  # a broken layer below is what doctor is for
        return {"path": None, "version": None, "usable": False, "problems": [repr(exc)]}
    if info is None:
        return None
    return {"path": info.path, "version": info.version_string, "usable": info.usable,
            "problems": list(info.problems), "ci": ci_coverage(info.version),
            "ci_releases": [".".join(map(str, r)) for r in CI_QEMU_RELEASES]}


@contextlib.contextmanager
def _opened(fd: int) -> Iterator[int]:
    try:
        yield fd
    finally:
        os.close(fd)


def _attempt(name: str, works: Callable[[], bool], detail: str, fix: str,
             errors: tuple = (OSError, AttributeError)) -> Check:
    """A required check: ``works()`` tries the facility for real; what it raises is the detail."""
    try:
        return Check(name, works(), detail, required=True)
    except errors as exc:
        return Check(name, False, str(exc), fix, True)


def _memfd_maps() -> bool:
    with _opened(os.memfd_create("vhostlab-doctor", os.MFD_CLOEXEC)) as fd:
        os.ftruncate(fd, 4096)
        with mmap.mmap(fd, 4096, mmap.MAP_SHARED) as m:
            m[0:4] = b"ping"
    return True


def _eventfd_counts() -> bool:
    with _opened(os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)) as fd:
        os.eventfd_write(fd, 3)
        return os.eventfd_read(fd) == 3


def _memfd_passes() -> bool:
    """Send a memfd over a unix socket (SCM_RIGHTS) and see the same memory on the other side."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b, _opened(os.memfd_create("vhostlab-doctor-pass", os.MFD_CLOEXEC)) as fd:
        os.ftruncate(fd, 4096)
        socket.send_fds(a, [b"x"], [fd])
        _, fds, _, _ = socket.recv_fds(b, 1, 1)
        with _opened(fds[0]) as received:
            os.pwrite(fd, b"vhost", 0)
            return os.pread(received, 5, 0) == b"vhost"


def check_memfd() -> Check:
    return _attempt("memfd", _memfd_maps, "memfd_create + shared mmap work",
                    "guest RAM needs memfd_create (Linux >= 3.17)")


def check_eventfd() -> Check:
    return _attempt("eventfd", _eventfd_counts, "kick/call notifications use eventfds",
                    "needs Linux eventfd and Python >= 3.10")


def check_fd_passing() -> Check:
    return _attempt("fd_passing", _memfd_passes, "SCM_RIGHTS over AF_UNIX carries memory-table fds",
                    "vhost-user needs AF_UNIX fd passing", (OSError, AttributeError, IndexError))


def _device(path: str, why: str) -> Check:
    present = os.path.exists(path)
    return Check(path, present, why if present else f"absent: {why}",
                 "" if present else "not needed: the labs run on TCG and a userspace back-end")


def _qemu_check(qemu: dict | None) -> Check:
    if qemu is None:
        return Check("qemu", False, "not found", f"labs use the built-in front-end; for real QEMU: {APT_QEMU}")
    if not qemu["usable"]:
        return Check("qemu", False, f"{qemu['path']}: " + "; ".join(qemu["problems"]),
                     f"labs use the built-in front-end; a QEMU >= 7.2 with memfd: {APT_QEMU}")
    tested = ", ".join(qemu["ci_releases"])
    coverage = {"tested": f"a release CI runs ({tested})",
                "in range": f"between the releases CI runs ({tested})",
                "untested": f"outside the releases CI runs ({tested}): the labs may differ"}
    return Check("qemu", True, f"{qemu['path']} {qemu['version']}, {coverage[qemu['ci']]}")


def choose_frontend(qemu: dict | None) -> str:
    """Which front-end the labs use: VHOSTLAB_FRONTEND wins, else real QEMU when present."""
    forced = os.environ.get("VHOSTLAB_FRONTEND", "auto")
    if forced in ("qemu", "builtin"):
        return forced
    return "qemu" if qemu and qemu.get("usable") else "builtin"


def collect() -> Report:
    qemu = qemu_info()
    testpmd = find_testpmd()
    # With a testpmd, start its vhost port once on a scratch socket (about a
    # second): "installed" is not "usable" (EAL may refuse this machine).
    dpdk_ok, dpdk_why = dpdk_usable(probe=testpmd is not None)
    checks = [check_memfd(), check_eventfd(), check_fd_passing(),
              _qemu_check(qemu),
              Check("dpdk-testpmd", dpdk_ok, dpdk_why,
                    "" if dpdk_ok else "only VHOSTLAB_BACKEND=dpdk, `demo --backend dpdk`, the "
                    f"DPDK tests and `bench --peer dpdk` need it: {APT_DPDK}"),
              _device("/dev/kvm", "KVM acceleration (unused: QEMU runs with TCG)"),
              _device("/dev/vhost-net", "the in-kernel vhost-net back-end (VHOST_BACKEND_TYPE_KERNEL)")]
    return Report(python=platform.python_version(), numpy=_version("numpy"), numba=_version("numba"),
                  qemu=qemu, dpdk_testpmd=testpmd, frontend=choose_frontend(qemu), checks=checks)


def render(report: Report) -> str:
    lines = [f"python          {report.python} ({sys.executable})",
             f"numpy           {report.numpy}",
             f"numba           {report.numba}"]
    for c in report.checks:
        mark = "ok " if c.ok else ("MISSING" if c.required else "no ")
        lines.append(f"{c.name:<16}{mark:<8}{c.detail}")
        if c.fix:
            lines.append(f"{'':<24}-> {c.fix}")
    lines.append(f"labs will use: {'real QEMU' if report.frontend == 'qemu' else 'the built-in front-end'}"
                 f" (override with VHOSTLAB_FRONTEND=qemu|builtin)")
    return "\n".join(lines)


def add_arguments(parser) -> None:
    parser.add_argument("--json", action="store_true", help="machine-readable report")


def run(args) -> int:
    """Print the report; always 0, because a missing piece has a fallback or a fix line."""
    report = collect()
    print(json.dumps(report.to_dict(), indent=2) if args.json else render(report))
    return 0
