"""The one exception the protocol layer raises for bad input."""
from __future__ import annotations

from typing import Any

__all__ = ["ProtocolError"]


def _show(value: Any) -> str:
    """Render a value for an error message: big ints in hex as well."""
    if isinstance(value, bool) or not isinstance(value, int):
        return repr(value)
    if value >= 256:
        return f"{value} (0x{value:x})"
    return str(value)


class ProtocolError(ValueError):
    """A vhost-user message broke a rule of the protocol.

    Attributes name what broke: ``request`` (the request name, or its id
    when the id itself is unknown), ``field`` (which header or payload
    field), ``value`` (what arrived) and ``limit`` (what was allowed).
    Any of them may be None when it does not apply.
    """

    def __init__(self, reason: str, *, request: str | int | None = None,
                 field: str | None = None, value: Any = None,
                 limit: Any = None) -> None:
        self.reason = reason
        self.request = request
        self.field = field
        self.value = value
        self.limit = limit
        super().__init__(self._render())

    def _render(self) -> str:
        where = str(self.request) if self.request is not None else "message"
        parts = [where]
        if self.field is not None:
            parts.append(f"{self.field}={_show(self.value)}")
        text = ": ".join(parts) + f": {self.reason}"
        if self.limit is not None:
            text += f" (limit: {_show(self.limit)})"
        return text

    def with_request(self, request: str | int) -> "ProtocolError":
        """The same error, naming ``request`` if it named none yet."""
        if self.request is not None:
            return self
        err = ProtocolError(self.reason, request=request, field=self.field,
                            value=self.value, limit=self.limit)
        err.__cause__ = self.__cause__
        return err
