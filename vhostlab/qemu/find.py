"""Find QEMU and probe what it can do, before anything is started.

:func:`find_qemu` looks at an explicit path, then $VHOSTLAB_QEMU, then
``qemu-system-x86_64`` on PATH, and asks the binary (``--version``,
``-object help``, ``-device help``, ``-netdev help``, ``-accel help``)
whether the lab's recipe can run on it: a memfd-backed RAM and a
virtio-net-pci device, QEMU 5.0 or later. The answers are cached per binary
(path, mtime, size). :func:`ci_coverage` says how CI covers a version.
"""
from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
from dataclasses import dataclass

from .errors import QemuNotFoundError

__all__ = ["QemuInfo", "find_qemu", "require_qemu", "ci_coverage", "QEMU_ENV", "QEMU_BINARY",
           "MIN_QEMU_VERSION", "CI_QEMU_RELEASES"]

QEMU_ENV = "VHOSTLAB_QEMU"
QEMU_BINARY = "qemu-system-x86_64"
#: ``-machine memory-backend=`` appeared in QEMU 5.0.
MIN_QEMU_VERSION = (5, 0, 0)
#: The QEMU releases CI runs the QEMU tests and the labs against (Debian 11, 12
#: and 13: ``.ci/run`` and ``scripts/debian-qemu.sh``). Binder's Ubuntu QEMU
#: (6.2 on 22.04, 8.2 on 24.04) lies between them.
CI_QEMU_RELEASES = ((5, 2), (7, 2), (10, 0))


@dataclass(frozen=True)
class QemuInfo:
    """What ``qemu-system-x86_64`` at ``path`` can do; ``problems`` empty means usable."""

    path: str
    version: tuple[int, int, int]
    has_memfd: bool
    has_virtio_net_pci: bool
    netdevs: tuple[str, ...] = ()
    accelerators: tuple[str, ...] = ()
    problems: tuple[str, ...] = ()

    @property
    def usable(self) -> bool:
        """True when the vhostlab recipe can run on this QEMU."""
        return not self.problems

    @property
    def version_string(self) -> str:
        return ".".join(map(str, self.version))


def ci_coverage(version: tuple[int, ...]) -> str:
    """How CI covers a QEMU version: "tested" (a release CI runs), "in range", or "untested"."""
    release = tuple(version[:2])
    if release in CI_QEMU_RELEASES:
        return "tested"
    if CI_QEMU_RELEASES[0] < release < CI_QEMU_RELEASES[-1]:
        return "in range"
    return "untested"


def _run_help(path: str, *args: str) -> str:
    res = subprocess.run([path, *args], stdin=subprocess.DEVNULL, capture_output=True,
                         text=True, timeout=20, check=False)
    return res.stdout


@functools.lru_cache(maxsize=8)
def _probe(path: str, mtime_ns: int, size: int) -> QemuInfo:
    # mtime and size are in the key so an upgraded binary is probed afresh.
    m = re.search(r"version (\d+)\.(\d+)(?:\.(\d+))?", _run_help(path, "--version"))
    version = (int(m[1]), int(m[2]), int(m[3] or 0)) if m else (0, 0, 0)
    objects = _run_help(path, "-object", "help")
    devices = _run_help(path, "-device", "help")
    # Both lists are a title line, then one name per line.
    netdevs = tuple(_run_help(path, "-netdev", "help").split("\n", 1)[-1].split())
    accels = tuple(_run_help(path, "-accel", "help").split("\n", 1)[-1].split())
    problems = []
    if not m:
        problems.append(f"{path} --version did not print a QEMU version")
    elif version < MIN_QEMU_VERSION:
        problems.append(f"QEMU {'.'.join(map(str, version))} is older than "
                        f"{'.'.join(map(str, MIN_QEMU_VERSION))}")
    has_memfd = "memory-backend-memfd" in objects
    has_vnet = '"virtio-net-pci"' in devices
    if not has_memfd:
        problems.append("no memory-backend-memfd object (guest RAM must be a shareable fd)")
    if not has_vnet:
        problems.append("no virtio-net-pci device")
    return QemuInfo(path, version, has_memfd, has_vnet, netdevs, accels, tuple(problems))


def find_qemu(path: str | None = None) -> QemuInfo | None:
    """Find and probe QEMU: ``path``, else $VHOSTLAB_QEMU, else ``qemu-system-x86_64`` on PATH.

    Returns None when there is no such executable. The answers of
    ``--version`` / ``-object help`` / ``-device help`` are cached.
    """
    path = path or os.environ.get(QEMU_ENV) or shutil.which(QEMU_BINARY)
    if not path:
        return None
    path = shutil.which(path) or path
    try:
        st = os.stat(path)
        return _probe(os.path.realpath(path), st.st_mtime_ns, st.st_size)
    except (OSError, subprocess.SubprocessError):
        return None


def require_qemu(path: str | None = None) -> QemuInfo:
    """Like :func:`find_qemu`, but raise QemuNotFoundError when QEMU is absent or unusable."""
    info = find_qemu(path)
    hint = ("install it (Debian/Ubuntu: apt-get install --no-install-recommends "
            f"qemu-system-x86) or point ${QEMU_ENV} at a qemu-system-x86_64")
    if info is None:
        raise QemuNotFoundError(f"{QEMU_BINARY} not found (${QEMU_ENV} unset or wrong)", hint=hint)
    if not info.usable:
        raise QemuNotFoundError(f"QEMU at {info.path} cannot run the lab: "
                                + "; ".join(info.problems), hint=hint)
    return info
