"""Set-up for the lab notebooks: who plays QEMU's part, and cleaning up after.

A lab notebook begins with::

    from vhostlab import labkit
    lab = labkit.open_lab("04_virtqueues")

``open_lab`` picks the front-end that plays QEMU's part: a real
``qemu-system-x86_64`` when one is installed, else the kit's built-in Python
front-end. The rule is doctor's ``choose_frontend`` (vhostlab/doctor.py), so
the notebooks and ``vhostlab doctor`` always agree; the environment variable
``VHOSTLAB_FRONTEND=qemu|builtin|auto`` overrides it.

The lab starts what the cells need and keeps the plumbing out of them:
``lab.start_backend()`` (the vhost-user-net back-end, in a thread of this
kernel), ``lab.connect_ops(backend)`` (the built-in ``VhostOps``, one op per
call), ``lab.builtin_guest()`` (memfd guest RAM and a virtio-net driver),
``lab.start_device()`` (a back-end with a front-end attached, the device at
DRIVER_OK), ``lab.migration()`` (a live migration by the lab's front-end).

Everything started through ``lab`` is registered with it and stopped, newest
first, by ``lab.close()``, which each notebook's last code cell calls, and by
``atexit`` when the kernel shuts down. Running the first cell again closes the
previous lab first, so re-running a notebook never leaves a second copy of
anything behind. Waiting on the back-end's thread sleeps (``wait_until``);
nothing here spins.

The kit is four parts: the registry (``registry``: ``open_lab``, ``Lab``),
who plays QEMU's part (``frontends``: a ``Frontend`` per front-end, so that
nothing else asks which one it is), what the cells hold (``device``:
``LabDevice``, ``LoggingWindow``, ``LabMigration``) and the fixtures of
single labs (``fixtures``). Everything is importable from here.
"""
from __future__ import annotations

from .base import RAM_SIZE, LabSetupError, child_processes, wait_until
from .compare import BackendComparison, compare_backends
from .device import LabDevice, LabMigration, LoggingWindow, vring_view
from .fixtures import OpReference, TxRing, llvm_ir
from .frontends import BuiltinFrontend, Frontend, QemuFrontend, frontend_named
from .registry import FRONTENDS, Lab, choose_frontend, open_lab

__all__ = [
    "FRONTENDS", "RAM_SIZE", "LabSetupError", "Lab", "LabDevice", "LoggingWindow",
    "LabMigration", "OpReference", "TxRing", "choose_frontend", "open_lab",
    "child_processes", "wait_until", "vring_view", "llvm_ir",
    "Frontend", "QemuFrontend", "BuiltinFrontend", "frontend_named",
    "BackendComparison", "compare_backends",
]
