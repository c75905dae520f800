"""Labs run in JupyterLab in headless Chromium, as a learner runs them.

The one copy of the code that drives JupyterLab in a real browser; the
browser test (``tests/browser/``) and the README screenshots
(``docs/screenshots.py``) both import it. It is a developer tool, not part of
the installed kit, and needs the test extras (``playwright``) and a Chromium:
Debian's ``chromium`` package, or any Chrome named by ``$VHOSTLAB_BROWSER``.
Playwright drives that binary; it never downloads a browser of its own.

- :class:`JupyterLab` serves a directory on a free loopback port with a fresh
  token and its own settings, workspace, config and runtime directories.
  Stopping it shuts every kernel down through JupyterLab's REST API first
  (so a lab's ``atexit`` clean-up runs), then the server, then kills by pid
  any process still left under it (a QEMU whose kernel died, say).
- :class:`Browser` is one headless Chromium; :meth:`Browser.open` gives a
  :class:`LabPage`: one notebook in its own browser context, with every
  console error and uncaught page error recorded.
- :meth:`LabPage.run_all` clicks Run > Run All Cells in the menu bar and waits
  until every code cell has an execution count and the kernel is idle, or a
  cell fails; :meth:`LabPage.problems` lists what a learner would see go wrong.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import psutil

# Debian's package; $VHOSTLAB_BROWSER names another Chromium or Chrome.
DEFAULT_CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--hide-scrollbars")
VIEWPORT = {"width": 1180, "height": 1000}
SETTINGS = {                    # JupyterLab user settings
    # no news or update pop-ups
    "@jupyterlab/apputils-extension/notification":
        {"fetchNews": "false", "checkForUpdates": False},
    # every cell drawn, so that the DOM holds every output
    "@jupyterlab/notebook-extension/tracker": {"windowingMode": "none"},
    # never write outputs back into the notebook being served
    "@jupyterlab/docmanager-extension/plugin": {"autosave": False},
}
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"


def find_chromium() -> str | None:
    """The Chromium to drive: the one ``$VHOSTLAB_BROWSER`` names (and only
    that one, when it is set), else Debian's, else one on PATH."""
    named = os.environ.get("VHOSTLAB_BROWSER")
    if named:
        return shutil.which(named)
    for name in (DEFAULT_CHROMIUM, "chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def missing() -> str | None:
    """Why a real-browser run cannot happen here, or None when it can."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install -e '.[test]')"
    if find_chromium() is None:
        named = os.environ.get("VHOSTLAB_BROWSER")
        if named:
            return f"VHOSTLAB_BROWSER={named} is not an executable"
        return ("no Chromium found (apt-get install -y --no-install-recommends chromium, "
                "or name one in VHOSTLAB_BROWSER)")
    return None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _reap(procs: list[psutil.Process], name: str, timeout: float = 10.0) -> list[int]:
    """Wait for ``procs`` to exit; SIGTERM then SIGKILL the ones that do not, by pid.

    Returns the pids that had to be signalled."""
    _gone, alive = psutil.wait_procs(procs, timeout=timeout)
    for p in alive:
        print(f"{name}: terminating leftover pid {p.pid} ({_cmd(p)})", file=sys.stderr)
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _gone, still = psutil.wait_procs(alive, timeout=5)
    for p in still:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(still, timeout=5)
    return [p.pid for p in alive]


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it if the test process dies (even by
    SIGKILL), so that no server outlives its test; JupyterLab then shuts its
    kernels down itself. Linux only; elsewhere a no-op."""
    try:
        import ctypes
        import signal

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def _cmd(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline())[:80]
    except psutil.Error:
        return "?"


class JupyterLab:
    """A JupyterLab server on a free loopback port, serving ``root``.

    ``scratch`` holds its settings, workspaces, config, runtime files and log.
    ``env`` is added to the server's environment, which its kernels inherit.
    """

    def __init__(self, root: Path, scratch: Path, env: dict | None = None) -> None:
        self.port, self.token = free_port(), secrets.token_hex(16)
        self.root, self.scratch = Path(root), Path(scratch)
        self.extra_env = dict(env or {})
        self.proc: subprocess.Popen | None = None
        self.log = self.scratch / "jupyterlab.log"

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def _env(self) -> dict:
        settings = self.scratch / "settings"
        for plugin, values in SETTINGS.items():
            file = settings / f"{plugin}.jupyterlab-settings"
            file.parent.mkdir(parents=True, exist_ok=True)
            file.write_text(json.dumps(values))
        return dict(os.environ, **self.extra_env,
                    JUPYTERLAB_SETTINGS_DIR=str(settings),
                    JUPYTERLAB_WORKSPACES_DIR=str(self.scratch / "workspaces"),
                    JUPYTER_RUNTIME_DIR=str(self.scratch / "runtime"),
                    JUPYTER_CONFIG_DIR=str(self.scratch / "config"))

    def start(self, timeout: float = 60.0) -> "JupyterLab":
        cmd = [sys.executable, "-m", "jupyterlab", "--no-browser",
               "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={self.port}",
               "--ServerApp.port_retries=0", f"--IdentityProvider.token={self.token}",
               f"--ServerApp.root_dir={self.root}", "--LabApp.expose_app_in_browser=True",
               "--LabApp.news_url=", "--LabApp.check_for_updates_class="
               "jupyterlab.NeverCheckForUpdate"]
        if os.geteuid() == 0:
            cmd.append("--allow-root")
        self.scratch.mkdir(parents=True, exist_ok=True)
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(cmd, env=self._env(), cwd=self.root,
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         start_new_session=True, preexec_fn=_die_with_parent)
        deadline = time.monotonic() + timeout
        while not self.api("GET", "/api/status"):
            if self.proc.poll() is not None:
                raise RuntimeError(f"JupyterLab exited with status {self.proc.returncode}:\n"
                                   + self.log.read_text(errors="replace")[-2000:])
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"JupyterLab did not answer within {timeout:.0f} s")
            time.sleep(0.2)
        return self

    def api(self, method: str, path: str, timeout: float = 10.0):
        """Call the REST API; the decoded JSON reply (True if empty), None on failure."""
        request = urllib.request.Request(self.url(path), method=method, headers={
            "Authorization": f"token {self.token}"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as reply:
                body = reply.read()
                return json.loads(body) if body.strip() else True
        except (OSError, ValueError):
            return None

    def descendants(self) -> list[psutil.Process]:
        """Every live process under the server: kernels and what they started."""
        if self.proc is None or self.proc.poll() is not None:
            return []
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def shutdown_kernels(self) -> list[int]:
        """Shut every kernel down through the API, then reap what the kernels left.

        Returns the pids that had to be killed (a clean run returns [])."""
        before = self.descendants()
        try:
            for kernel in self.api("GET", "/api/kernels") or []:
                self.api("DELETE", f"/api/kernels/{kernel['id']}", timeout=30)
        finally:
            killed = _reap(before, "JupyterLab kernels")
        return killed

    def stop(self) -> None:
        """Kernels first (through the API), then the server, then any leftover by pid.

        Each step runs even when the one before it failed."""
        if self.proc is None:
            return
        left = self.descendants()
        try:
            if self.proc.poll() is None:
                self.shutdown_kernels()
                self.api("POST", "/api/shutdown")
        finally:
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.terminate()
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            _reap(left, "JupyterLab", timeout=2)
            self.proc = None

    def __enter__(self) -> "JupyterLab":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class Browser:
    """One headless Chromium driven by playwright (no browser download)."""

    def __init__(self, executable: str | None = None) -> None:
        self.executable = executable or find_chromium()
        self._pw = self.browser = None

    def start(self) -> "Browser":
        from playwright.sync_api import sync_playwright

        if self.executable is None:
            raise RuntimeError(missing() or "no Chromium")
        self._pw = sync_playwright().start()
        try:
            self.browser = self._pw.chromium.launch(
                executable_path=self.executable, headless=True, args=list(CHROMIUM_ARGS))
        except Exception:
            self._pw.stop()
            self._pw = None
            raise
        return self

    def open(self, lab: JupyterLab, notebook: str, viewport: dict | None = None,
             timeout: float = 90.0) -> "LabPage":
        """Open ``notebook`` (relative to the served root) in a fresh context
        with a clean workspace, and wait until its kernel is idle."""
        context = self.browser.new_context(viewport=viewport or VIEWPORT)
        page = LabPage(context, notebook)
        try:
            page.goto(lab.url(f"/lab/tree/{notebook}?reset&token={lab.token}"), timeout)
        except BaseException:
            page.close()
            raise
        return page

    def close(self) -> None:
        try:
            if self.browser is not None:
                self.browser.close()
        finally:
            self.browser = None
            if self._pw is not None:
                self._pw.stop()
                self._pw = None

    def __enter__(self) -> "Browser":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


# In the page: the open notebook's state, read from JupyterLab's own models
# (exposed as window.jupyterapp) and from what the DOM shows.
STATE_JS = r"""() => {
  const app = window.jupyterapp;
  const panel = app && app.shell.currentWidget;
  if (!panel || !panel.content || !panel.sessionContext) return {ready: false};
  const kernel = panel.sessionContext.session && panel.sessionContext.session.kernel;
  const cells = panel.content.widgets;
  const code = cells.filter(c => c.model.type === 'code');
  const errors = [];
  const widgets = [];
  code.forEach(c => {
    const n = cells.indexOf(c);
    const where = 'cell ' + n + ' (' + c.model.sharedModel.getSource().split('\n')[0].slice(0, 60) + ')';
    let failed = false;
    c.model.outputs.toJSON().forEach(o => {
      if (o.output_type === 'error') {
        failed = true;
        errors.push({cell: n, text: where + ': ' + o.ename + ': ' + o.evalue, stops: true});
      }
      const data = o.data || {};
      if (data['application/vnd.jupyter.widget-view+json'])
        widgets.push({cell: n, id: data['application/vnd.jupyter.widget-view+json'].model_id});
      else if (/^[A-Z]\w*\((children|value|layout|description|options)=/.test(
                 String(data['text/plain'] || '')))
        errors.push({cell: n, text: where + ': a widget shown as text: '
                     + String(data['text/plain']).slice(0, 80)});
    });
    // a Traceback printed on stderr (the error output itself renders there too)
    if (!failed) c.node.querySelectorAll(
      '.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]'
    ).forEach(el => {
      if (el.textContent.includes('Traceback'))
        errors.push({cell: n, text: where + ': stderr: ' + el.textContent.trim().slice(0, 600)});
    });
  });
  return {
    ready: true,
    kernel: kernel ? kernel.status : null,
    cells: code.length,
    left: code.filter(c => c.model.executionCount === null).length,
    running: code.filter(c => c.model.executionCount === null
                          && c.node.querySelector('.jp-InputPrompt')?.textContent.includes('*')).length,
    errors, widgets,
  };
}"""
# Each widget output (by the notebook's model) drawn as widget DOM in its
# output area, not the "Loading widget..." placeholder or an error message.
WIDGETS_JS = r"""() => {
  const cells = window.jupyterapp.shell.currentWidget.content.widgets;
  const out = [];
  cells.forEach((c, n) => {
    if (c.model.type !== 'code') return;
    const children = c.node.querySelectorAll('.jp-OutputArea-child');
    c.model.outputs.toJSON().forEach((o, j) => {
      if (!(o.data || {})['application/vnd.jupyter.widget-view+json']) return;
      const el = children[j] && children[j].querySelector('.jp-OutputArea-output');
      const text = el ? el.textContent.trim() : '';
      const drawn = !!el && !!el.querySelector('.jupyter-widgets')
                    && !/Loading widget|Error displaying widget/.test(text);
      out.push({cell: n, drawn, text: text.slice(0, 80)});
    });
  });
  return out;
}"""
# The code cell whose source contains a marker (the notebook's index of it).
CELL_INDEX_JS = """(marker) => {
  const cells = window.jupyterapp.shell.currentWidget.content.widgets;
  return cells.findIndex(c => c.model.type === 'code'
                              && c.model.sharedModel.getSource().includes(marker));
}"""


@dataclass
class RunResult:
    """How a Run All went: seconds, cells counted, and what failed."""
    seconds: float
    cells: int
    errors: list = field(default_factory=list)
    widgets: list = field(default_factory=list)


class LabPage:
    """One notebook open in JupyterLab in its own browser context."""

    def __init__(self, context, notebook: str) -> None:
        self.context, self.notebook = context, notebook
        self.console_errors: list[str] = []
        self.page = context.new_page()
        self.page.on("console", self._on_console)
        self.page.on("pageerror", lambda exc: self.console_errors.append(f"pageerror: {exc}"))
        self.last_state: dict = {}

    def _on_console(self, message) -> None:
        if message.type == "error":
            where = message.location or {}
            self.console_errors.append(
                f"console.error: {message.text} ({where.get('url', '')}:"
                f"{where.get('lineNumber', '')})")

    def goto(self, url: str, timeout: float) -> None:
        """Load JupyterLab at ``url``; wait for the notebook and its idle kernel;
        fold the side bars away so that the notebook has the window's width."""
        self.page.goto(url, timeout=timeout * 1000)
        self.wait(lambda s: s.get("ready") and s.get("kernel") == "idle",
                  timeout, "the notebook to open with an idle kernel")
        self.page.evaluate("() => { const s = window.jupyterapp.shell;"
                           " s.collapseLeft(); s.collapseRight(); }")

    def state(self) -> dict:
        self.last_state = self.page.evaluate(STATE_JS)
        return self.last_state

    def wait(self, done, timeout: float, what: str, settle: int = 1) -> dict:
        """Poll :meth:`state` until ``done(state)`` holds ``settle`` times in a row."""
        deadline, streak = time.monotonic() + timeout, 0
        while True:
            state = self.state()
            # A failed cell ends Run All (the cells after it never run); other
            # problems (a widget shown as text) are collected when the run ends.
            if any(e.get("stops") for e in state.get("errors") or ()):
                return state
            streak = streak + 1 if done(state) else 0
            if streak >= settle:
                return state
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.notebook}: waited {timeout:.0f} s for {what}; "
                                   f"last state {_brief(state)}")
            self.page.wait_for_timeout(500)

    def run_all(self, timeout: float = 300.0) -> RunResult:
        """Run > Run All Cells from the menu bar, as a learner would; wait until
        every code cell has an execution count and the kernel is idle (three
        polls in a row), or a cell fails."""
        t0 = time.monotonic()
        self.page.locator("#jp-MainMenu .lm-MenuBar-item", has_text=re.compile(r"^Run$")).click()
        label = self.page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^Run All Cells$"))
        self.page.locator(".lm-Menu-item", has=label).click()
        state = self.wait(lambda s: s["left"] == 0 and s["kernel"] == "idle", timeout,
                          "every cell to run", settle=3)
        return RunResult(time.monotonic() - t0, state["cells"], state["errors"],
                         state["widgets"])

    def widgets_drawn(self, timeout: float = 30.0) -> list[dict]:
        """Wait until every widget output is drawn; return the ones that are not."""
        deadline = time.monotonic() + timeout
        while True:
            shown = self.page.evaluate(WIDGETS_JS)
            bad = [w for w in shown if not w["drawn"]]
            if not bad or time.monotonic() > deadline:
                return bad
            self.page.wait_for_timeout(500)

    def problems(self, result: RunResult, widget_wait: float = 30.0) -> list[str]:
        """What went wrong, as sentences: failed cells, widgets not drawn within
        ``widget_wait`` seconds (or shown as text), console errors. Empty when
        the run was clean."""
        out = [e["text"] for e in result.errors]
        out += [f"cell {w['cell']}: widget not drawn: {w['text']!r}"
                for w in self.widgets_drawn(widget_wait)]
        out += self.console_errors
        return out

    # -- locating and picturing cells -------------------------------------
    def cell(self, marker: str):
        """The code cell whose source contains ``marker`` (a playwright Locator)."""
        index = self.page.evaluate(CELL_INDEX_JS, marker)
        if index < 0:
            raise LookupError(f"{self.notebook}: no code cell contains {marker!r}")
        return self.page.locator(".jp-Notebook .jp-Cell").nth(index)

    def full_screenshot(self, path: Path, max_height: int = 15000) -> Path:
        """The whole notebook from its top as one tall PNG (the window stretched to fit)."""
        outer = "document.querySelector('.jp-NotebookPanel .jp-WindowedPanel-outer')"
        height = self.page.evaluate(f"() => {outer}?.scrollHeight || 0")
        size = self.page.viewport_size
        self.page.set_viewport_size({"width": size["width"],
                                     "height": max(size["height"], min(height + 120, max_height))})
        try:
            self.page.evaluate(f"() => {{ const o = {outer}; if (o) o.scrollTop = 0; }}")
            self.page.wait_for_timeout(500)
            self.page.screenshot(path=str(path))
        finally:
            self.page.set_viewport_size(size)
        return path

    def element_screenshots(self, selector: str, stem: Path, limit: int = 6,
                            max_height: int = 15000) -> list[Path]:
        """A PNG of each element matching ``selector`` (the first ``limit``):
        ``stem``-0.png, ``stem``-1.png, ... The notebook scrolls inside its own
        panel, so the window is made tall enough for each element and the
        element scrolled to the panel's top before the shot."""
        paths = []
        found = self.page.locator(selector)
        size = self.page.viewport_size
        try:
            for i in range(min(found.count(), limit)):
                element = found.nth(i)
                height = element.evaluate("e => e.getBoundingClientRect().height")
                self.page.set_viewport_size({"width": size["width"], "height": max(
                    size["height"], min(int(height) + 200, max_height))})
                element.evaluate("e => e.scrollIntoView({block: 'start'})")
                self.page.wait_for_timeout(300)
                path = stem.with_name(f"{stem.name}-{i}.png")
                element.screenshot(path=str(path))
                paths.append(path)
        finally:
            self.page.set_viewport_size(size)
        return paths

    def close(self) -> None:
        try:
            self.context.close()
        except Exception:
            pass


def _brief(state: dict) -> str:
    keep = {k: state.get(k) for k in ("ready", "kernel", "cells", "left", "running")}
    return json.dumps(keep)


def copy_labs(src: Path, dst: Path) -> Path:
    """A copy of the labs directory to serve, so nothing is ever saved into ``src``."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".ipynb_checkpoints",
                                                           "__pycache__"))
    return dst
