"""Two students on a real JupyterHub, each running lab 00 through the hub.

A JupyterHub (PyPI ``jupyterhub``, the ``hub`` extra) with
SimpleLocalProcessSpawner (every single-user server runs as the hub's own
user, so root and a normal user both work; as root the servers get
``--allow-root``) and DummyAuthenticator, behind configurable-http-proxy from
the npm registry (``make install`` puts it in ``.hub/``), all on free loopback
ports. Through the hub's REST API, with a service token that holds an admin
role, two users are created and each gets a token of their own; with that
token each user starts their server, starts a kernel through the proxy, and
runs every code cell of lab 00 over the kernel websocket with a real QEMU.
Both must pass: no error output, the first cell says a real QEMU runs, the
last cell's assertions (the lab closed, nothing left behind) hold.

Then each server is stopped through the hub's API and its processes must be
gone; the hub is stopped, and any process left under it is killed by pid.
Without jupyterhub or configurable-http-proxy the test skips with the
reason; with VHOSTLAB_REQUIRE_HUB=1 (``.ci/run``) it fails instead.
VHOSTLAB_CHP names another configurable-http-proxy.
"""
from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import nbformat
import psutil
import pytest

import notebook_api

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "browser"))
import lab_browser  # noqa: E402  (free_port, copy_labs, _reap, _die_with_parent)

LAB = "00_welcome.ipynb"
USERS = ("ada", "grace")
LOCAL_CHP = ROOT / ".hub" / "node_modules" / ".bin" / "configurable-http-proxy"

pytestmark = pytest.mark.slow


def find_chp() -> str | None:
    """configurable-http-proxy: $VHOSTLAB_CHP, else the project's ``.hub/``, else PATH."""
    named = os.environ.get("VHOSTLAB_CHP")
    if named:
        return shutil.which(named)
    return str(LOCAL_CHP) if os.access(LOCAL_CHP, os.X_OK) else shutil.which(
        "configurable-http-proxy")


@pytest.fixture(scope="module")
def requires_hub() -> str:
    """configurable-http-proxy's path; skip without it or jupyterhub, fail in CI."""
    reason = None
    try:
        import jupyterhub  # noqa: F401
    except ImportError:
        reason = "jupyterhub is not installed (pip install -e '.[hub]', or make install)"
    if reason is None and find_chp() is None:
        reason = ("configurable-http-proxy not found (make install runs "
                  "npm install --prefix .hub configurable-http-proxy)")
    if reason is None:
        return find_chp()
    if os.environ.get("VHOSTLAB_REQUIRE_HUB") == "1":
        pytest.fail(f"VHOSTLAB_REQUIRE_HUB=1 but {reason}", pytrace=False)
    pytest.skip(reason)


CONFIG = """\
c.JupyterHub.bind_url = "http://127.0.0.1:{proxy_port}"
c.JupyterHub.hub_bind_url = "http://127.0.0.1:{hub_port}"
c.JupyterHub.db_url = "sqlite:///{scratch}/jupyterhub.sqlite"
c.JupyterHub.cookie_secret_file = "{scratch}/jupyterhub_cookie_secret"
c.JupyterHub.authenticator_class = "dummy"
c.JupyterHub.spawner_class = "simple"
c.JupyterHub.cleanup_servers = True
c.JupyterHub.services = [{{"name": "vhostlab-test", "api_token": "{admin_token}"}}]
c.JupyterHub.load_roles = [{{"name": "vhostlab-test", "services": ["vhostlab-test"],
                             "scopes": ["admin:users", "admin:servers", "tokens"]}}]
c.ConfigurableHTTPProxy.command = [{chp!r}]
c.ConfigurableHTTPProxy.api_url = "http://127.0.0.1:{api_port}"
c.ConfigurableHTTPProxy.auth_token = "{proxy_token}"
c.ConfigurableHTTPProxy.pid_file = "{scratch}/proxy.pid"
c.Spawner.cmd = [{singleuser!r}]
c.Spawner.args = {args!r}
c.Spawner.environment = {environment!r}
c.Spawner.start_timeout = 180
c.Spawner.http_timeout = 180
c.SimpleLocalProcessSpawner.home_dir_template = "{scratch}/home/{{username}}"
"""


class LocalHub:
    """A JupyterHub and its proxy on free loopback ports, configured in ``scratch``."""

    def __init__(self, scratch: Path, chp: str, environment: dict) -> None:
        self.scratch = scratch
        self.port = lab_browser.free_port()
        self.admin_token = secrets.token_hex(32)
        self.api = notebook_api.ServerAPI(self.url("hub/api/"), self.admin_token)
        singleuser = str(Path(sys.executable).with_name("jupyterhub-singleuser"))
        (scratch / "jupyterhub_config.py").write_text(CONFIG.format(
            proxy_port=self.port, hub_port=lab_browser.free_port(),
            api_port=lab_browser.free_port(), scratch=scratch, chp=chp,
            admin_token=self.admin_token, proxy_token=secrets.token_hex(32),
            singleuser=singleuser, environment=environment,
            args=["--allow-root"] if os.geteuid() == 0 else []))
        self.log = scratch / "jupyterhub.log"
        self.proc: subprocess.Popen | None = None

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/{path}"

    def start(self, timeout: float = 120.0) -> "LocalHub":
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "jupyterhub", "-f", str(self.scratch / "jupyterhub_config.py")],
                cwd=self.scratch, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=True, preexec_fn=lab_browser._die_with_parent)
        deadline = time.monotonic() + timeout
        while True:                      # through the proxy: both hub and proxy answer
            try:
                self.api.call("GET", "", timeout=5)
                return self
            except (OSError, RuntimeError):
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"jupyterhub exited with {self.proc.returncode}:\n{self.tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"jupyterhub did not answer within {timeout:.0f} s:\n{self.tail()}")
            time.sleep(0.5)

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    def descendants(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except (psutil.NoSuchProcess, AttributeError):
            return []

    def server_tree(self, user: str) -> list[psutil.Process]:
        """The user's single-user server and everything under it."""
        for p in self.descendants():
            try:
                if p.environ().get("JUPYTERHUB_USER") == user and p.ppid() == self.proc.pid:
                    return [p] + p.children(recursive=True)
            except psutil.Error:
                continue
        return []

    def add_user(self, user: str) -> notebook_api.ServerAPI:
        """Create ``user`` and a token of theirs; the hub API as that user."""
        self.api.call("POST", f"users/{user}")
        token = self.api.call("POST", f"users/{user}/tokens", {"note": "lab 00"})["token"]
        return notebook_api.ServerAPI(self.url("hub/api/"), token)

    def stop(self) -> None:
        """Servers are stopped by the hub; the hub by SIGTERM; leftovers by pid."""
        if self.proc is None:
            return
        left = self.descendants()
        try:
            self.proc.terminate()
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        finally:
            lab_browser._reap(left, "jupyterhub", timeout=5)
            self.proc = None


def start_server(hub: LocalHub, me: notebook_api.ServerAPI, user: str,
                 timeout: float = 240.0) -> notebook_api.ServerAPI:
    """The user starts their server with their own token; its API once ready."""
    me.call("POST", f"users/{user}/server")
    deadline = time.monotonic() + timeout
    while not me.call("GET", f"users/{user}")["servers"].get("", {}).get("ready"):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{user}'s server not ready within {timeout:.0f} s:\n{hub.tail()}")
        time.sleep(0.5)
    return notebook_api.ServerAPI(hub.url(f"user/{user}/"), me.token)


def run_lab(hub: LocalHub, server: notebook_api.ServerAPI, user: str, results: dict,
            trees: dict) -> None:
    """Lab 00 in a kernel of the user's server; the kernel is shut down after."""
    kernel_id = server.start_kernel("labs")
    trees[user] = hub.server_tree(user)
    try:
        socket = server.kernel(kernel_id)
        try:
            results[user] = notebook_api.run_notebook(socket, ROOT / "labs" / LAB)
        finally:
            socket.close()
    except Exception as exc:            # reported by the test's assertions
        results[user] = exc
    finally:
        server.shutdown_kernel(kernel_id)


def test_two_users_run_lab_00_through_the_hub(requires_hub, requires_qemu, tmp_path):
    environment = {"VHOSTLAB_FRONTEND": "qemu", "VHOSTLAB_QEMU": requires_qemu}
    for user in USERS:                   # each user's home holds their own copy of the labs
        lab_browser.copy_labs(ROOT / "labs", tmp_path / "home" / user / "labs")
    code_cells = sum(c.cell_type == "code" for c in nbformat.read(str(ROOT / "labs" / LAB), 4).cells)
    hub = LocalHub(tmp_path, requires_hub, environment)
    start, results, trees = time.monotonic(), {}, {}
    try:
        hub.start()
        servers = {user: start_server(hub, hub.add_user(user), user) for user in USERS}
        threads = [threading.Thread(target=run_lab, args=(hub, servers[u], u, results, trees))
                   for u in USERS]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for user in USERS:               # stopped through the hub's API, as the culler does
            hub.api.call("DELETE", f"users/{user}/server")
        for user in USERS:
            _gone, alive = psutil.wait_procs(trees[user], timeout=60)
            assert alive == [], f"{user}'s server left {[p.pid for p in alive]} running"
    finally:
        hub.stop()
    print(f"\ntwo users ran {LAB} through JupyterHub in {time.monotonic() - start:.1f} s")
    for user in USERS:
        run = results.get(user)
        assert isinstance(run, notebook_api.NotebookRun), f"{user}: {run!r}\n{hub.tail()}"
        assert run.errors() == [], f"{user}: {run.errors()}"
        assert len(run.cells) == code_cells, f"{user} ran {len(run.cells)} of {code_cells} cells"
        assert "a real QEMU" in run.cells[0].text(), run.cells[0].text()
        assert len(trees[user]) >= 2, f"{user}'s server had no kernel: {trees[user]}"
