"""Run a notebook through a Jupyter server's API, as a browser would.

A kernel is started with the server's REST API (``POST api/kernels``) and the
notebook's code cells are sent over the kernel websocket
(``api/kernels/<id>/channels``), one ``execute_request`` at a time, in the
JSON message protocol JupyterLab uses. The same code talks to a JupyterLab on
a loopback port (``scripts/student_cost.py``) and to a single-user server
behind JupyterHub's proxy (``tests/hub/``): only the base URL and the token
differ.

A developer tool, not part of the installed kit. It needs ``websocket-client``,
which jupyter_server itself depends on.
"""
from __future__ import annotations

import json
import struct
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import nbformat
import websocket

PROTOCOL_VERSION = "5.3"
OUTPUTS = ("stream", "display_data", "execute_result", "error")


class ServerAPI:
    """The REST API of one Jupyter server at ``base_url`` (ending in ``/``)."""

    def __init__(self, base_url: str, token: str) -> None:
        self.base_url = base_url if base_url.endswith("/") else base_url + "/"
        self.token = token

    def call(self, method: str, path: str, body=None, timeout: float = 30.0):
        """The decoded JSON reply (None when empty); an HTTP error raises, with its body."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base_url + path, data=data, method=method, headers={
            "Authorization": f"token {self.token}", "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as reply:
                raw = reply.read()
        except urllib.error.HTTPError as exc:
            raise RuntimeError(f"{method} {self.base_url}{path}: HTTP {exc.code} "
                               f"{exc.read()[:500]!r}") from None
        return json.loads(raw) if raw.strip() else None

    def start_kernel(self, path: str = "", name: str = "python3") -> str:
        """A new kernel whose working directory is ``path`` (relative to the
        server's root); its id."""
        return self.call("POST", "api/kernels", {"name": name, "path": path})["id"]

    def shutdown_kernel(self, kernel_id: str) -> None:
        """Ask the server to shut the kernel down (its ``atexit`` hooks run)."""
        self.call("DELETE", f"api/kernels/{kernel_id}", timeout=60)

    def kernel(self, kernel_id: str, timeout: float = 30.0) -> "KernelSocket":
        return KernelSocket(self, kernel_id, timeout)


def _decode(frame) -> dict:
    """One websocket frame: JSON text, or the binary form (a count, offsets,
    then the JSON message and its buffers) used when a message has buffers."""
    if isinstance(frame, str):
        return json.loads(frame)
    count = struct.unpack("!I", frame[:4])[0]
    offsets = struct.unpack(f"!{count}I", frame[4:4 + 4 * count])
    end = offsets[1] if count > 1 else len(frame)
    return json.loads(frame[offsets[0]:end])


@dataclass
class CellRun:
    """What one code cell did: the reply's status and every output it sent."""
    index: int
    status: str
    outputs: list = field(default_factory=list)

    def errors(self) -> list[str]:
        """What a learner would see go wrong: error outputs and tracebacks on stderr."""
        found = [f"{o['ename']}: {o['evalue']}" for o in self.outputs
                 if o["output_type"] == "error"]
        found += [o["text"][-800:] for o in self.outputs if o["output_type"] == "stream"
                  and o.get("name") == "stderr" and "Traceback" in o["text"]]
        if self.status != "ok" and not found:
            found.append(f"execute_reply status {self.status}")
        return found

    def text(self) -> str:
        """Every text the cell showed (streams and text/plain), joined."""
        return "".join(o.get("text", "") + o.get("data", {}).get("text/plain", "")
                       for o in self.outputs)


class KernelSocket:
    """The websocket of one kernel: send code, collect its outputs."""

    def __init__(self, api: ServerAPI, kernel_id: str, timeout: float = 30.0) -> None:
        self.session = uuid.uuid4().hex
        url = api.base_url.replace("http", "ws", 1) + \
            f"api/kernels/{kernel_id}/channels?session_id={self.session}"
        self.ws = websocket.create_connection(
            url, header=[f"Authorization: token {api.token}"], timeout=timeout)

    def _request(self, code: str) -> str:
        msg_id = uuid.uuid4().hex
        self.ws.send(json.dumps({
            "header": {"msg_id": msg_id, "msg_type": "execute_request", "username": "student",
                       "session": self.session, "version": PROTOCOL_VERSION,
                       "date": datetime.now(timezone.utc).isoformat()},
            "parent_header": {}, "metadata": {}, "channel": "shell", "buffers": [],
            "content": {"code": code, "silent": False, "store_history": True,
                        "user_expressions": {}, "allow_stdin": False, "stop_on_error": True}}))
        return msg_id

    def execute(self, code: str, index: int = 0, timeout: float = 300.0) -> CellRun:
        """Run ``code``; return once the kernel replied and went idle again.

        Raises TimeoutError when that takes longer than ``timeout`` seconds."""
        msg_id = self._request(code)
        run, replied, idle = CellRun(index, "?"), False, False
        deadline = time.monotonic() + timeout
        while not (replied and idle):
            if time.monotonic() > deadline:
                raise TimeoutError(f"cell {index} did not finish within {timeout:.0f} s")
            try:
                msg = _decode(self.ws.recv())
            except websocket.WebSocketTimeoutException:
                continue
            if msg.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            kind, content = msg["header"]["msg_type"], msg["content"]
            if msg["channel"] == "shell" and kind == "execute_reply":
                run.status, replied = content["status"], True
            elif kind == "status" and content["execution_state"] == "idle":
                idle = True
            elif kind in OUTPUTS:
                run.outputs.append(dict(content, output_type=kind))
        return run

    def close(self) -> None:
        self.ws.close()


@dataclass
class NotebookRun:
    """One notebook run through a kernel: its cells in order and its wall time."""
    name: str
    cells: list[CellRun]
    seconds: float

    def errors(self) -> list[str]:
        return [f"cell {c.index}: {e}" for c in self.cells for e in c.errors()]


def run_notebook(kernel: KernelSocket, notebook: Path, cell_timeout: float = 300.0) -> NotebookRun:
    """Every code cell of ``notebook`` in order, stopping at the first that fails."""
    nb = nbformat.read(str(notebook), as_version=4)
    cells, start = [], time.monotonic()
    for index, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        cells.append(kernel.execute(cell.source, index, cell_timeout))
        if cells[-1].errors():
            break
    return NotebookRun(Path(notebook).name, cells, time.monotonic() - start)
