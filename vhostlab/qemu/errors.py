"""Errors of the real-QEMU layer.

Every failure names what was being done, the value involved and, where QEMU
itself went away, its exit status and the last lines it wrote to stderr, so a
learner sees why a cell failed and what to try next.
"""
from __future__ import annotations

from ..errors import VhostlabError
from ..ring.driver import GuestDriverError  # both guests' driver error, re-exported

import signal

__all__ = [
    "QemuError",
    "QemuNotFoundError",
    "QemuStartError",
    "QemuExitedError",
    "QTestError",
    "QTestConnectionError",
    "QmpError",
    "QmpCommandError",
    "QmpConnectionError",
    "GuestDriverError",
    "describe_exit",
]


def describe_exit(returncode: int | None) -> str:
    """Say how a process ended: 'exit code 1', 'signal 9 (SIGKILL)', 'still running'."""
    if returncode is None:
        return "still running"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = "unknown signal"
        return f"signal {-returncode} ({name})"
    return f"exit code {returncode}"


class QemuError(VhostlabError, RuntimeError):
    """Base of every error raised by ``vhostlab.qemu``, but the guest driver's
    (GuestDriverError, which the built-in guest raises too).

    ``exit_code`` is QEMU's return code when it is known (negative: killed by
    that signal), ``stderr_tail`` the last lines QEMU wrote, ``hint`` what to
    do about it. Each is ``None`` when it does not apply.
    """

    def __init__(self, message: str, *, exit_code: int | None = None,
                 stderr_tail: str | None = None, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code
        self.stderr_tail = stderr_tail
        self.hint = hint

    def render(self) -> str:
        parts = [self.message]
        if self.stderr_tail:
            tail = "\n".join("    " + line for line in self.stderr_tail.splitlines())
            parts.append("QEMU's last words on stderr:\n" + tail)
        if self.hint:
            parts.append("What to do: " + self.hint)
        return "\n".join(parts)


class QemuNotFoundError(QemuError):
    """No usable qemu-system-x86_64 (absent, too old, or missing a feature)."""


class QemuStartError(QemuError):
    """QEMU exited or did not come up (qtest/QMP) while starting."""


class QemuExitedError(QemuError):
    """QEMU went away while it was being used."""


class QTestError(QemuError):
    """QEMU answered a qtest command with ``FAIL``."""

    def __init__(self, command: str, reply: str):
        self.command = command
        self.reply = reply
        super().__init__(f"qtest command {command!r} failed: {reply!r}")


class QTestConnectionError(QemuError):
    """The qtest connection broke or timed out (QEMU died, hung, or was closed)."""


class QmpError(QemuError):
    """Base of QMP failures."""


class QmpCommandError(QmpError):
    """QEMU answered a QMP command with an error."""

    def __init__(self, command: str, arguments: dict | None,
                 error_class: str, description: str):
        self.command = command
        self.arguments = arguments or {}
        self.error_class = error_class
        self.description = description
        super().__init__(f"QMP {command} {self.arguments} failed: "
                         f"{error_class}: {description}")


class QmpConnectionError(QmpError):
    """The QMP connection could not be made, broke, or a command timed out."""

