"""The root of every error the kit raises: :class:`VhostlabError`.

Each layer has its own family (``ProtocolError``, ``RingError``,
``GuestMemoryError``, ``BackendError``, ``QemuError``...), and every one of
them derives from this class, so a notebook cell or a test can catch "the
kit refused this" in one ``except`` and still read what failed, the value
that failed it and the limit or expectation it broke:

    try:
        backend.handle(msg)
    except VhostlabError as err:
        print(err.what, err.field, err.value, err.limit)

The message is printed one way everywhere (:func:`show_value` for numbers,
so a GPA reads ``4096 (0x1000)``)::

    SET_VRING_NUM: num=1000 (0x3e8): not a power of 2 (limit: 32768 (0x8000))

This module imports nothing of the kit's, so every layer can import it.
"""
from __future__ import annotations

from typing import Any

__all__ = ["VhostlabError", "show_value"]


def show_value(value: Any) -> str:
    """A value as an error message shows it: ints from 256 up in decimal and
    hex (addresses and sizes are read in hex, counts in decimal), strings
    and everything else as ``repr``."""
    if isinstance(value, bool) or not isinstance(value, int):
        return repr(value)
    if value >= 256:
        return f"{value} (0x{value:x})"
    return str(value)


class VhostlabError(Exception):
    """Base of every exception the kit raises on purpose.

    Attributes (each None where it does not apply):

    * ``what``: what failed: a request (``SET_VRING_NUM``), an op
      (``vhost_set_log_base``), a queue, a region, a QEMU command;
    * ``field``: which of its fields or arguments;
    * ``value``: the value that arrived;
    * ``limit``: the limit it broke, or what was expected instead;
    * ``reason``: why that is wrong, in words.

    A subclass may pass a complete sentence as ``reason`` and no fields;
    ``str(err)`` is then that sentence.
    """

    def __init__(self, reason: str = "", *, what: Any = None, field: str | None = None,
                 value: Any = None, limit: Any = None) -> None:
        self.reason = reason
        self.what = what
        self.field = field
        self.value = value
        self.limit = limit
        super().__init__(reason)

    def __str__(self) -> str:
        return self.render()

    def render(self) -> str:
        """``what: field=value: reason (limit: limit)``, leaving out what is None."""
        parts = []
        if self.what is not None:
            parts.append(str(self.what))
        if self.field is not None:
            parts.append(f"{self.field}={show_value(self.value)}")
        if self.reason:
            parts.append(self.reason)
        text = ": ".join(parts)
        if self.limit is not None:
            limit = self.limit if isinstance(self.limit, str) else show_value(self.limit)
            text += f" (limit: {limit})"
        return text
