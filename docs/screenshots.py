"""Regenerate the README's screenshots: labs run and rendered in JupyterLab, in headless Chromium.

    .venv/bin/python docs/screenshots.py                      # writes docs/img/*.png
    .venv/bin/python docs/screenshots.py --frontend builtin   # without QEMU

Needs the kit's venv (``make install``: JupyterLab, Pillow, tornado, psutil)
and a Chromium: Debian ``apt-get install -y --no-install-recommends
chromium``, or any Chrome named by ``--chromium`` or ``$CHROMIUM``. It is a
developer tool, not part of the kit; it takes under a minute.

What it does, end to end:

1. copy the labs it needs into a temporary directory;
2. start JupyterLab there on a free loopback port, with a fresh token and its
   own settings, workspace, config and runtime directories;
3. start headless Chromium and drive it over the DevTools protocol: open a
   lab, run all its cells in the notebook's own kernel (the front-end is the
   labs' choice: QEMU when installed), wait until every cell has run without
   error, do what a learner would (move a slider), and screenshot the cell
   that draws the view, cropped to its interesting part;
4. quantize each PNG to a small palette and write it to ``docs/img/``.

JupyterLab, its kernels and Chromium are stopped in ``finally`` blocks
whatever happens, and the temporary directory goes with them.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import psutil
from PIL import Image
from tornado.websocket import websocket_connect

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Shot:
    """One screenshot of a lab: the code cell whose source contains ``cell``.

    ``until``: a JavaScript expression (``out`` is the cell's output area)
    naming the element where the crop ends, or None for the whole cell.
    ``focus`` and ``keys``: an element of the output to focus (CSS selector)
    and the keys to press on it first, as a learner would.
    """
    lab: str
    cell: str
    png: str
    until: str | None = None
    focus: str | None = None
    keys: tuple[str, ...] = ()
    colors: int = 96


SHOTS = (
    # The TX ring of the lab's front-end's guest (with QEMU: read over qtest):
    # both rings with their pointers, the chains, the top of the table.
    Shot("04_virtqueues", "dev.vring_view(1)", "vring-view.png",
         until="[...out.querySelectorAll('table')].pop().rows[6]"),
    # The live migration view, its round slider moved back to round 2.
    Shot("07_live_migration", "mig.watch()", "migration-dashboard.png",
         focus=".widget-slider .noUi-handle", keys=("Home", "ArrowRight")),
)
WIDTH, HEIGHT = 1180, 1000      # browser window; the side bars are collapsed
SETTINGS = {                    # JupyterLab user settings
    "@jupyterlab/apputils-extension/notification":     # no news or update pop-ups
        {"fetchNews": "false", "checkForUpdates": False},
    "@jupyterlab/notebook-extension/tracker": {"windowingMode": "none"},  # every cell drawn
}
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--hide-scrollbars",
                  "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0")
KEY_CODES = {"Home": 36, "End": 35, "ArrowLeft": 37, "ArrowRight": 39}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what: str, ready, proc: subprocess.Popen, timeout: float = 60.0):
    """Call ``ready()`` every 0.2 s until it returns a true value, and return
    that; fail if ``proc`` exits first or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what}: the process exited with status {proc.returncode}")
        value = ready()
        if value:
            return value
        time.sleep(0.2)
    raise TimeoutError(f"{what}: not ready after {timeout:.0f} s")


def stop(proc: subprocess.Popen, name: str, graceful=None) -> None:
    """Stop ``proc`` and every process under it: ``graceful()`` first (if
    given), then SIGTERM, then SIGKILL; each one by its own pid."""
    children = []
    if proc.poll() is None:
        children = psutil.Process(proc.pid).children(recursive=True)
    try:
        if graceful is not None and proc.poll() is None:
            graceful()
        proc.wait(timeout=20)
    except Exception:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    _gone, alive = psutil.wait_procs(children, timeout=5)
    for p in alive:
        print(f"{name}: killing leftover pid {p.pid}", file=sys.stderr)
        p.kill()


class JupyterLab:
    """A JupyterLab server on a free loopback port, serving ``root``."""

    def __init__(self, root: Path, scratch: Path) -> None:
        self.port, self.token = free_port(), secrets.token_hex(16)
        self.root, self.scratch = root, scratch
        self.proc: subprocess.Popen | None = None

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def _env(self) -> dict:
        settings = self.scratch / "settings"
        for plugin, values in SETTINGS.items():
            file = settings / f"{plugin}.jupyterlab-settings"
            file.parent.mkdir(parents=True, exist_ok=True)
            file.write_text(json.dumps(values))
        return dict(os.environ, JUPYTERLAB_SETTINGS_DIR=str(settings),
                    JUPYTERLAB_WORKSPACES_DIR=str(self.scratch / "workspaces"),
                    JUPYTER_RUNTIME_DIR=str(self.scratch / "runtime"),
                    JUPYTER_CONFIG_DIR=str(self.scratch / "config"))

    def start(self) -> None:
        cmd = [sys.executable, "-m", "jupyterlab", "--no-browser",
               "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={self.port}",
               "--ServerApp.port_retries=0", f"--IdentityProvider.token={self.token}",
               f"--ServerApp.root_dir={self.root}", "--LabApp.expose_app_in_browser=True"]
        if os.geteuid() == 0:
            cmd.append("--allow-root")
        with open(self.scratch / "jupyterlab.log", "wb") as log:   # ^C is ours to handle
            self.proc = subprocess.Popen(cmd, env=self._env(), stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=log, start_new_session=True)
        wait_for("JupyterLab", lambda: self._api("GET", "/api/status"), self.proc)

    def _api(self, method: str, path: str):
        request = urllib.request.Request(self.url(path), method=method, headers={
            "Authorization": f"token {self.token}"})
        try:
            with urllib.request.urlopen(request, timeout=5) as reply:
                return json.loads(reply.read() or b"{}") or True
        except OSError:
            return None

    def stop(self) -> None:
        """Shut the kernels and the server down through the API, then make sure."""
        if self.proc is not None:
            stop(self.proc, "JupyterLab", lambda: self._api("POST", "/api/shutdown"))


class DevTools:
    """The Chrome DevTools protocol over one websocket, one page session (flat mode)."""

    def __init__(self, ws) -> None:
        self.ws, self.next_id, self.session = ws, 0, None

    @classmethod
    async def connect(cls, url: str) -> "DevTools":
        tools = cls(await websocket_connect(url, max_message_size=1 << 28))
        target = await tools.call("Target.createTarget", url="about:blank")
        attached = await tools.call("Target.attachToTarget", targetId=target["targetId"],
                                    flatten=True)
        tools.session = attached["sessionId"]
        return tools

    async def call(self, method: str, **params):
        """Send a command and return its result; events in between are dropped."""
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params}
        if self.session and not method.startswith(("Target.", "Browser.")):
            message["sessionId"] = self.session
        await self.ws.write_message(json.dumps(message))
        while True:
            raw = await self.ws.read_message()
            if raw is None:
                raise RuntimeError(f"{method}: Chromium closed the DevTools connection")
            reply = json.loads(raw)
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    async def evaluate(self, expression: str):
        """Evaluate JavaScript in the page (promises awaited); return its value."""
        result = await self.call("Runtime.evaluate", expression=expression,
                                 awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise RuntimeError(details.get("exception", {}).get("description")
                               or details.get("text"))
        return result["result"].get("value")

    async def press(self, key: str) -> None:
        """Press and release one key in the focused element."""
        for kind in ("rawKeyDown", "keyUp"):
            await self.call("Input.dispatchKeyEvent", type=kind, key=key, code=key,
                            windowsVirtualKeyCode=KEY_CODES[key])


def start_chromium(binary: str, profile: Path) -> tuple[subprocess.Popen, str]:
    """Start headless Chromium; return it and its DevTools websocket URL."""
    profile.mkdir()
    with open(profile.parent / "chromium.log", "wb") as log:
        proc = subprocess.Popen([binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                                 f"--window-size={WIDTH},{HEIGHT}", "about:blank"],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                start_new_session=True)
    active = profile / "DevToolsActivePort"
    wait_for("Chromium", lambda: active.exists() and len(active.read_text().split()) == 2,
             proc)
    port, path = active.read_text().split()
    return proc, f"ws://127.0.0.1:{port}{path}"


# In the page, with JupyterLab exposed as window.jupyterapp: wait for it to load.
WAIT_FOR_APP = """new Promise((resolve, reject) => {
  const t0 = Date.now();
  (function poll() {
    if (window.jupyterapp) return window.jupyterapp.restored.then(() => resolve(true));
    if (Date.now() - t0 > 60000) return reject(new Error('JupyterLab did not load'));
    setTimeout(poll, 200);
  })();
})"""
# Open a notebook, wait for its kernel, clear it and start running every cell
# (RUN_STATUS then says how far it got).
OPEN_AND_RUN = """(async () => {
  const app = window.jupyterapp;
  app.shell.collapseLeft(); app.shell.collapseRight();
  const panel = await app.commands.execute('docmanager:open', {path: %s});
  await panel.context.ready; await panel.sessionContext.ready;
  app.shell.activateById(panel.id);
  await app.commands.execute('notebook:clear-all-cell-outputs');
  app.commands.execute('notebook:run-all-cells');
  return true;
})()"""
RUN_STATUS = """(() => {
  const panel = window.jupyterapp.shell.currentWidget;
  const cells = panel.content.widgets.filter(c => c.model.type === 'code');
  for (const c of cells)
    for (const o of c.model.outputs.toJSON())
      if (o.output_type === 'error') return {error: o.ename + ': ' + o.evalue};
  const kernel = panel.sessionContext.session?.kernel;
  return {done: cells.every(c => c.model.executionCount !== null)
                && kernel?.status === 'idle', left: cells.filter(
                c => c.model.executionCount === null).length};
})()"""
FOCUS = """(() => {
  const el = (%s)?.querySelector(%s);
  if (el) el.focus();
  return !!el;
})()"""
# After a learner's keys: make the last cell the active one again, so that
# the shot's cell is drawn unselected (no blue bar, no cell toolbar).
DESELECT = """(() => {
  const notebook = window.jupyterapp.shell.currentWidget.content;
  document.activeElement?.blur();
  notebook.activeCellIndex = notebook.widgets.length - 1; notebook.mode = 'command';
  return true;
})()"""
CLOSE = """(async () => {
  const panel = window.jupyterapp.shell.currentWidget;
  await panel.sessionContext.shutdown();
  panel.context.model.dirty = false; panel.dispose(); return true;
})()"""
# The code cell whose source contains the marker.
CELL = """[...document.querySelectorAll('.jp-NotebookPanel .jp-CodeCell')].find(
  c => (c.querySelector('.jp-InputArea .cm-content')?.textContent || '').includes(%s))"""
# The rectangle to capture: the cell, from its top to the bottom of ``until``
# (or of the cell), once it is drawn; and how much of it the window shows.
FIND_CELL = """(() => {
  const cell = %s;
  if (!cell) return {error: 'no code cell contains the line'};
  const out = cell.querySelector('.jp-OutputArea');
  if (!out || !out.children.length || out.textContent.includes('Loading widget')) return null;
  if ([...out.querySelectorAll('img')].some(i => !i.complete)) return null;
  const scroller = cell.closest('.jp-WindowedPanel-outer') || cell.parentElement;
  cell.scrollIntoView({block: 'start'});
  scroller.scrollTop = Math.max(0, scroller.scrollTop - 10);
  const r = cell.getBoundingClientRect(), view = scroller.getBoundingClientRect();
  const end = %s;
  const bottom = end ? end.getBoundingClientRect().bottom : r.bottom;
  return {x: r.left, y: r.top, width: r.width, height: bottom - r.top,
          visible: view.bottom - r.top};
})()"""


async def run_lab(tools: DevTools, lab: str, timeout: float = 300.0) -> None:
    """Open ``lab`` in JupyterLab, run all its cells, wait until all have run."""
    await tools.evaluate(OPEN_AND_RUN % json.dumps(f"{lab}.ipynb"))
    deadline, done, status = time.monotonic() + timeout, 0, {"left": "all"}
    while time.monotonic() < deadline:
        status = await tools.evaluate(RUN_STATUS)
        if status.get("error"):
            raise RuntimeError(f"{lab}: a cell failed: {status['error']}")
        done = done + 1 if status["done"] else 0
        if done >= 3:                     # idle, all counted, three times in a row
            return
        await asyncio.sleep(0.5)
    raise TimeoutError(f"{lab}: {status['left']} cells still to run after {timeout:.0f} s")


async def find_cell(tools: DevTools, shot: Shot, timeout: float = 60.0) -> dict:
    """The shot's rectangle, once its cell has rendered and held still for 1 s."""
    script = FIND_CELL % (CELL % json.dumps(shot.cell), shot.until or "null")
    deadline, last, still = time.monotonic() + timeout, None, 0
    while time.monotonic() < deadline:
        rect = await tools.evaluate(script)
        if rect and "error" in rect:
            raise RuntimeError(f"{shot.lab}: {rect['error']} {shot.cell!r}")
        still = still + 1 if rect and rect == last else 0
        if still >= 4:
            return rect
        last = rect
        await asyncio.sleep(0.25)
    raise TimeoutError(f"{shot.lab}: cell {shot.cell!r} did not render within {timeout:.0f} s")


async def act(tools: DevTools, shot: Shot) -> None:
    """Focus the shot's element and press its keys, as a learner would."""
    if not shot.focus:
        return
    found = await tools.evaluate(FOCUS % (CELL % json.dumps(shot.cell), json.dumps(shot.focus)))
    if not found:
        raise RuntimeError(f"{shot.lab}: nothing matches {shot.focus!r} in the cell")
    for key in shot.keys:
        await tools.press(key)
    await tools.evaluate(DESELECT)


async def screenshot(tools: DevTools, shot: Shot) -> bytes:
    """A PNG of the shot's rectangle in the open notebook, the window made tall enough."""
    await act(tools, shot)
    rect = await find_cell(tools, shot)
    if rect["height"] + 20 > rect["visible"]:      # a taller window, so that it all shows
        height = HEIGHT + int(rect["height"] - rect["visible"]) + 40
        await tools.call("Emulation.setDeviceMetricsOverride", width=WIDTH, height=height,
                         deviceScaleFactor=1, mobile=False)
        rect = await find_cell(tools, shot)
    pad = 6
    clip = {"x": max(0, rect["x"] - pad), "y": max(0, rect["y"] - pad), "scale": 1,
            "width": rect["width"] + 2 * pad,
            "height": min(rect["height"], rect["visible"]) + 2 * pad}
    taken = await tools.call("Page.captureScreenshot", format="png", clip=clip)
    await tools.call("Emulation.clearDeviceMetricsOverride")
    return base64.b64decode(taken["data"])


async def take_all(binary: str, lab: JupyterLab, scratch: Path) -> dict[str, bytes]:
    """Run each lab and screenshot its shots in one Chromium, stopped before returning."""
    proc, url = start_chromium(binary, scratch / "profile")
    tools, pngs = None, {}
    try:
        tools = await DevTools.connect(url)
        await tools.call("Page.navigate", url=lab.url(f"/lab?reset&token={lab.token}"))
        await tools.evaluate(WAIT_FOR_APP)
        for name in dict.fromkeys(shot.lab for shot in SHOTS):
            await run_lab(tools, name)
            print(f"ran {name}", flush=True)
            for shot in (s for s in SHOTS if s.lab == name):
                pngs[shot.png] = await screenshot(tools, shot)
            await tools.evaluate(CLOSE)
        return pngs
    finally:
        if tools is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(tools.call("Browser.close"), 10)
            tools.ws.close()
        stop(proc, "Chromium")


def shrink(png: bytes, colors: int) -> bytes:
    """Quantize a screenshot to a small palette PNG (flat UI colours, no dither)."""
    image = Image.open(io.BytesIO(png)).convert("RGB")
    small = image.quantize(colors=colors, method=Image.Quantize.MEDIANCUT,
                           dither=Image.Dither.NONE)
    out = io.BytesIO()
    small.save(out, format="PNG", optimize=True)
    return out.getvalue()


def find_chromium(given: str | None) -> str:
    for name in (given, os.environ.get("CHROMIUM"), "chromium", "chromium-browser",
                 "google-chrome"):
        path = name and shutil.which(name)
        if path:
            return path
    sys.exit("no Chromium found: apt-get install -y --no-install-recommends chromium "
             "(or pass --chromium /path/to/chrome)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img",
                        help="where the PNGs go (default: docs/img)")
    parser.add_argument("--frontend", choices=("auto", "qemu", "builtin"),
                        help="the labs' front-end (VHOSTLAB_FRONTEND; default: the labs' choice)")
    parser.add_argument("--chromium", help="the Chromium binary (default: chromium on PATH)")
    args = parser.parse_args()
    binary = find_chromium(args.chromium)
    if args.frontend:
        os.environ["VHOSTLAB_FRONTEND"] = args.frontend
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="vhostlab-shots-") as tmp:
        scratch = Path(tmp)
        notebooks = scratch / "notebooks"
        notebooks.mkdir()
        for name in {shot.lab for shot in SHOTS}:
            shutil.copy(ROOT / "labs" / f"{name}.ipynb", notebooks)
        lab = JupyterLab(notebooks, scratch)
        try:
            lab.start()
            pngs = asyncio.run(take_all(binary, lab, scratch))
        finally:
            lab.stop()
    args.out.mkdir(parents=True, exist_ok=True)
    for shot in SHOTS:
        data = shrink(pngs[shot.png], shot.colors)
        (args.out / shot.png).write_bytes(data)
        w, h = Image.open(io.BytesIO(data)).size
        print(f"{args.out / shot.png}: {w}x{h}, {len(data) // 1024} KiB")
    print(f"done in {time.monotonic() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
