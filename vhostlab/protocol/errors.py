"""The one exception the protocol layer raises for bad input."""
from __future__ import annotations

from typing import Any

from ..errors import VhostlabError

__all__ = ["ProtocolError"]


class ProtocolError(VhostlabError, ValueError):
    """A vhost-user message broke a rule of the protocol.

    ``request`` (the request name, or its id when the id itself is unknown)
    is what failed (``what``); ``field``, ``value`` and ``limit`` say which
    header or payload field, what arrived and what was allowed. Any of them
    may be None when it does not apply.
    """

    def __init__(self, reason: str, *, request: str | int | None = None,
                 field: str | None = None, value: Any = None,
                 limit: Any = None) -> None:
        super().__init__(reason, what=request if request is not None else "message",
                         field=field, value=value, limit=limit)
        self.request = request

    def with_request(self, request: str | int) -> "ProtocolError":
        """The same error, naming ``request`` if it named none yet."""
        if self.request is not None:
            return self
        err = ProtocolError(self.reason, request=request, field=self.field,
                            value=self.value, limit=self.limit)
        err.__cause__ = self.__cause__
        return err
