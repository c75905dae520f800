"""The back-end's errors: one hierarchy, each naming what was wrong.

A `RequestError` is a front-end request the device refuses (wrong queue
index, a feature that was not negotiated, an fd that is not an eventfd...).
What happens next follows the spec: with REPLY_ACK and need_reply the
front-end gets a non-zero u64 and the connection lives on; otherwise the
connection is closed with a log line naming the problem.
"""
from __future__ import annotations

from ..errors import VhostlabError


class BackendError(VhostlabError):
    """Base class of every error the back-end raises on purpose."""


class SocketPathError(BackendError):
    """The socket path or its directory is unsafe or unusable."""


class PeerCredentialsError(BackendError):
    """The peer on the socket is not a process of an allowed user (SO_PEERCRED)."""

    def __init__(self, pid: int, uid: int, allowed: frozenset[int]):
        super().__init__(f"peer pid {pid} runs as uid {uid}; only uid(s) {sorted(allowed)} "
                         "may drive this device (SO_PEERCRED)",
                         what=f"peer pid {pid}", field="uid", value=uid, limit=sorted(allowed))
        self.pid, self.uid, self.allowed = pid, uid, allowed

    def render(self) -> str:
        return self.reason       # uids read in decimal


class TransportError(BackendError):
    """The connection itself broke: too many fds, truncated ancillary data, a stuck peer."""


class RequestError(BackendError):
    """A request the device refuses: names the request, the field, the value and the limit."""

    def __init__(self, request: str, field: str, value: object, limit: object, why: str = ""):
        super().__init__(f"refused: {why}" if why else "refused", what=request,
                         field=field, value=value, limit=limit)
        self.request = request
