"""QMP, the QEMU Machine Protocol, usable from a script and from a notebook cell.

What was found (qemu.qmp 0.0.6, ipykernel 7, Python 3.11):

- ``qemu.qmp.legacy.QEMUMonitorProtocol`` runs its own event loop with
  ``run_until_complete``; in a Jupyter kernel's main thread, whose asyncio
  loop is already running, it fails with "This event loop is already
  running". In a worker thread it works.
- The async ``qemu.qmp.QMPClient`` works with top-level ``await`` in a cell,
  but then every caller must be async, and a plain script needs
  ``asyncio.run`` around everything.

So :class:`QMP` runs one ``QMPClient`` on a private event loop in its own
daemon thread. Synchronous callers (scripts, worker threads, a notebook's
main thread) use :meth:`QMP.execute`, which hands the coroutine to that loop
and waits on a ``concurrent.futures`` future with a timeout; it never touches
the caller's loop, so it works inside a running kernel (verified by
tests/qemu/test_qemu_notebook.py, which runs these calls in a live ipykernel
through nbclient). Async callers can ``await QMP.aexecute(...)`` instead,
which does not block the kernel's loop while QEMU works.

Events (STOP, RESUME, MIGRATION, SHUTDOWN ...) are recorded, with QEMU's
timestamp and the local arrival time, as :class:`QmpEvent` in arrival order;
:meth:`QMP.wait_event` hands each one out once, so an event that arrived
before the wait started is not missed.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from qemu.qmp import ConnectError, ExecInterruptedError, ExecuteError, QMPClient, QMPError

from .errors import QmpCommandError, QmpConnectionError

__all__ = ["QMP", "QmpEvent"]


@dataclass(frozen=True)
class QmpEvent:
    """One QMP event: its name, data, QEMU's timestamp (s) and ``time.monotonic()`` on arrival."""

    name: str
    data: dict = field(default_factory=dict)
    timestamp: float = 0.0
    received: float = 0.0


class QMP:
    """A synchronous face on ``qemu.qmp.QMPClient``, safe in any thread.

    ``path`` is QEMU's ``-qmp unix:PATH,server=on,wait=off`` socket.
    ``timeout`` bounds every command. ``diagnose`` (optional) explains a lost
    connection: it returns a sentence and keyword arguments for the error.
    """

    def __init__(self, path: str, *, name: str = "qemu", timeout: float = 10.0,
                 diagnose: Callable[[], tuple[str, dict]] | None = None):
        self.path = path
        self.name = name
        self.timeout = timeout
        self._diagnose = diagnose
        self._events: list[QmpEvent] = []
        self._handed_out: set[int] = set()
        self._cond = threading.Condition()
        self._client: QMPClient | None = None
        self._pump: asyncio.Task | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run_loop, name=f"vhostlab-qmp-{name}",
                                        daemon=True)
        self._thread.start()
        self._closed = False

    # -- the private loop ----------------------------------------------------
    def _run_loop(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()
        self._loop.close()

    def _submit(self, coro) -> concurrent.futures.Future:
        if self._closed:
            coro.close()
            raise QmpConnectionError(f"QMP connection to {self.name} is closed")
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def _wait(self, coro, timeout: float, what: str) -> Any:
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("QMP.execute called from the QMP loop itself; use aexecute")
        fut = self._submit(coro)
        try:
            return fut.result(timeout)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise QmpConnectionError(f"{what}: no answer within {timeout:g} s",
                                     hint="QEMU may be hung; close it and start again") from None

    # -- connection ----------------------------------------------------------
    def connect(self, timeout: float | None = None,
                alive: Callable[[], bool] = lambda: True) -> None:
        """Connect and negotiate, retrying until QEMU has created the socket.

        Gives up after ``timeout`` s, or at once when ``alive()`` turns false.
        """
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._wait(self._aconnect(), timeout, f"QMP connect to {self.path}")
                return
            except ConnectError as exc:
                if not alive():
                    raise self._lost("QMP connect", "QEMU exited before QMP answered") from None
                if time.monotonic() > deadline:
                    raise QmpConnectionError(
                        f"could not connect to QMP at {self.path} within {timeout:g} s: {exc}"
                    ) from None
                time.sleep(0.05)  # the socket appears once QEMU's monitor is up

    async def _aconnect(self) -> None:
        client = QMPClient(self.name)
        try:
            await client.connect(self.path)
        except BaseException:
            await client.disconnect()
            raise
        self._client = client
        self._pump = asyncio.get_running_loop().create_task(self._pump_events(client))

    async def _pump_events(self, client: QMPClient) -> None:
        while True:
            msg = await client.events.get()
            ts = msg.get("timestamp", {})
            ev = QmpEvent(name=msg["event"], data=dict(msg.get("data", {})),
                          timestamp=ts.get("seconds", 0) + ts.get("microseconds", 0) / 1e6,
                          received=time.monotonic())
            with self._cond:
                self._events.append(ev)
                self._cond.notify_all()

    def close(self) -> None:
        """Disconnect and stop the loop thread. Idempotent."""
        if self._closed:
            return
        if self._thread.is_alive():
            try:
                self._wait(self._aclose(), 3.0, "QMP disconnect")
            except Exception:  # a dead QEMU may make disconnect complain; it is gone anyway
                pass
            self._closed = True
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=3.0)
        self._closed = True

    async def _aclose(self) -> None:
        if self._pump is not None:
            self._pump.cancel()
        if self._client is not None:
            try:
                await self._client.disconnect()
            except Exception:
                pass

    def _lost(self, what: str, why: str) -> QmpConnectionError:
        extra, info = self._diagnose() if self._diagnose else ("", {})
        return QmpConnectionError(f"{what}: {why}" + (f"; {extra}" if extra else ""), **info)

    # -- commands ------------------------------------------------------------
    async def _aexecute(self, cmd: str, arguments: dict | None) -> Any:
        if self._client is None:
            raise QmpConnectionError(f"QMP {cmd}: not connected")
        try:
            return await self._client.execute(cmd, arguments)
        except ExecuteError as exc:
            raise QmpCommandError(cmd, arguments, exc.error_class, str(exc)) from None
        except (ExecInterruptedError, EOFError, OSError, QMPError) as exc:
            raise self._lost(f"QMP {cmd}", f"connection lost ({exc!r})") from None

    def execute(self, cmd: str, **arguments: Any) -> Any:
        """Run QMP command ``cmd`` with ``arguments``; return its ``return`` value.

        Raises QmpCommandError when QEMU refuses, QmpConnectionError when the
        connection is gone or no answer came within ``timeout``.
        """
        return self._wait(self._aexecute(cmd, arguments or None), self.timeout, f"QMP {cmd}")

    async def aexecute(self, cmd: str, **arguments: Any) -> Any:
        """``execute`` for ``await`` in a notebook cell: the kernel's loop stays free."""
        fut = self._submit(self._aexecute(cmd, arguments or None))
        try:
            return await asyncio.wait_for(asyncio.wrap_future(fut), self.timeout)
        except asyncio.TimeoutError:
            raise QmpConnectionError(f"QMP {cmd}: no answer within {self.timeout:g} s") from None

    # -- events --------------------------------------------------------------
    @property
    def events(self) -> list[QmpEvent]:
        """Every event received so far, oldest first."""
        with self._cond:
            return list(self._events)

    def wait_event(self, name: str, timeout: float = 10.0, **match: Any) -> QmpEvent:
        """Return the oldest not yet returned event called ``name`` whose data has ``match``.

        Waits up to ``timeout`` s. Example: ``wait_event("MIGRATION",
        status="completed")``. Raises QmpConnectionError on timeout.
        """
        def find() -> int | None:
            for i, ev in enumerate(self._events):
                if i not in self._handed_out and ev.name == name and \
                        all(ev.data.get(k) == v for k, v in match.items()):
                    return i
            return None

        with self._cond:
            found = self._cond.wait_for(lambda: find() is not None, timeout)
            if not found:
                want = f"{name} {match}" if match else name
                raise QmpConnectionError(
                    f"no QMP event {want} within {timeout:g} s "
                    f"(received: {[e.name for e in self._events][-8:]})")
            i = find()
            self._handed_out.add(i)
            return self._events[i]

    # -- helpers named after the QMP commands --------------------------------
    def query_status(self) -> dict:
        """``query-status``: e.g. ``{'status': 'running', 'running': True}``."""
        return self.execute("query-status")

    def stop(self) -> None:
        """``stop``: pause the vCPUs (QEMU emits STOP)."""
        self.execute("stop")

    def cont(self) -> None:
        """``cont``: resume the vCPUs (QEMU emits RESUME)."""
        self.execute("cont")

    def migrate(self, uri: str, **arguments: Any) -> None:
        """``migrate uri=...``: start an outgoing migration (returns at once)."""
        self.execute("migrate", uri=uri, **arguments)

    def migrate_set_parameters(self, **parameters: Any) -> None:
        """``migrate-set-parameters``; ``max_bandwidth=...`` becomes ``max-bandwidth``."""
        self.execute("migrate-set-parameters",
                     **{k.replace("_", "-"): v for k, v in parameters.items()})

    def migrate_set_capabilities(self, capabilities: dict[str, bool] | None = None,
                                 **more: bool) -> None:
        """``migrate-set-capabilities``, e.g. ``migrate_set_capabilities(events=True)``."""
        caps = dict(capabilities or {})
        caps.update({k.replace("_", "-"): v for k, v in more.items()})
        self.execute("migrate-set-capabilities",
                     capabilities=[{"capability": k, "state": bool(v)} for k, v in caps.items()])

    def query_migrate(self) -> dict:
        """``query-migrate``: status, RAM counters, dirty-sync-count ..."""
        return self.execute("query-migrate")

    def quit(self) -> None:
        """``quit``: ask QEMU to exit. A connection that drops meanwhile is expected."""
        try:
            self.execute("quit")
        except QmpConnectionError:
            pass
