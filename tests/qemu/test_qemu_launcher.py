"""The QEMU launcher: probing, command line, start-up, failure reports, clean-up."""
from __future__ import annotations

import ctypes
import dataclasses
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import time

import pytest

import vhostlab.qemu as vq
from vhostlab.qemu import (
    QemuInstance, QemuStartError, dgram_netdev, find_qemu, halt_firmware,
    udp_socket_netdev, vhost_user_netdev,
)
from vhostlab.qemu.guest import VIRTIO_CONFIG_S_DRIVER_OK
from vhostlab.qemu.launcher import WORKDIR_PREFIX, sweep_stale_workdirs

pytestmark = pytest.mark.qemu


def gone(pid: int) -> bool:
    """True when ``pid`` no longer runs (absent, or a zombie nobody reaped yet)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def wait_gone(pid: int, deadline: float = 10.0) -> bool:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if gone(pid):
            return True
        time.sleep(0.05)
    return gone(pid)


def test_halt_firmware_layout():
    fw = halt_firmware()
    assert len(fw) == 65536
    assert fw[65536 - 16:65536 - 13] == b"\xf4\xeb\xfd"   # hlt; jmp back to the hlt
    assert fw.count(b"\xf4") == 65536 - 2


def test_find_qemu_reports_features(requires_qemu):
    info = find_qemu(requires_qemu)
    assert info is not None and info.usable, info
    assert info.has_memfd and info.has_virtio_net_pci
    assert info.version >= (5, 0, 0)
    assert "tcg" in info.accelerators
    assert find_qemu(requires_qemu) is info          # cached


def test_find_qemu_absent(tmp_path):
    assert find_qemu(str(tmp_path / "no-such-qemu")) is None


def test_netdevs_refuse_non_loopback_hosts():
    with pytest.raises(ValueError, match="not a loopback"):
        dgram_netdev(9999, host="192.0.2.1")
    with pytest.raises(ValueError, match="not a loopback"):
        udp_socket_netdev(9999, host="8.8.8.8")


def test_vhost_user_netdev_arguments():
    spec = vhost_user_netdev("/run/a,b.sock", reconnect=1, queues=2)
    assert spec.args == ("-chardev", "socket,id=chr0,path=/run/a,,b.sock,reconnect=1",
                         "-netdev", "vhost-user,id=net0,chardev=chr0,vhostforce=on,queues=2")
    assert "mq=on" in spec.device_props


def test_command_line_follows_the_recipe(requires_qemu, datagram_netdev):
    q = QemuInstance(datagram_netdev(9, 10), qemu=requires_qemu, incoming=True)
    try:
        argv = q.command_line()
        joined = " ".join(argv)
        assert "-machine pc,accel=tcg,memory-backend=mem" in joined
        assert "memory-backend-memfd,id=mem,size=128M,share=on" in joined
        assert ("virtio-net-pci,netdev=net0,disable-modern=on,romfile=,"
                "mac=52:54:00:12:34:56") in joined
        assert f"-qtest unix:{q.qtest_socket}" in joined
        assert f"-incoming unix:{q.workdir}/migration.sock" in joined
        assert os.stat(q.workdir).st_mode & 0o777 == 0o700
    finally:
        q.close()
    assert not os.path.exists(q.workdir)


def test_start_initialise_and_clean_up(requires_qemu):
    with QemuInstance(None, qemu=requires_qemu) as q:
        pid, workdir = q.pid, q.workdir
        sockets = [q.qtest_socket, q.qmp_socket]
        assert all(os.path.exists(s) for s in sockets)
        guest = q.guest()
        assert guest.status() & VIRTIO_CONFIG_S_DRIVER_OK
        assert guest.status() == 7                      # ACK | DRIVER | DRIVER_OK
        # The device says how big its queues are (256 in QEMU 7.2, 1024 in 10.0);
        # the driver sized its rings from that register, not from a constant.
        sizes = [guest.queue_size(i) for i in (0, 1)]
        assert all(n & (n - 1) == 0 and 256 <= n <= 1024 for n in sizes), sizes
        assert [guest.ring_state(i).free_descriptors for i in (0, 1)] == sizes
        assert guest.queue_pfn(0) == guest.queue_gpas(0).desc >> 12
        assert guest.mac == "52:54:00:12:34:56"
    assert gone(pid)
    assert not any(os.path.exists(p) for p in [workdir, *sockets])
    assert q.returncode is not None


def test_exception_inside_with_block_still_cleans_up(requires_qemu):
    with pytest.raises(ZeroDivisionError):
        with QemuInstance(None, qemu=requires_qemu) as q:
            pid, workdir = q.pid, q.workdir
            1 / 0
    assert gone(pid) and not os.path.exists(workdir)


def test_start_failure_names_exit_code_stderr_and_hint(requires_qemu, tmp_path):
    q = QemuInstance(vhost_user_netdev(str(tmp_path / "nobody-listens.sock")),
                     qemu=requires_qemu)
    with pytest.raises(QemuStartError) as err:
        q.start()
    e = err.value
    assert e.exit_code == 1
    assert "nobody-listens.sock" in e.stderr_tail
    assert "back-end" in e.hint
    assert "exit code 1" in str(e)
    assert not q.alive() and not os.path.exists(q.workdir)


def test_qemu_spawned_from_a_finished_thread_keeps_running(requires_qemu):
    # PDEATHSIG follows the forking *thread*; QEMU must not die with a worker thread.
    box = {}
    t = threading.Thread(
        target=lambda: box.update(q=QemuInstance(None, qemu=requires_qemu).start()))
    t.start()
    t.join()
    q = box["q"]
    try:
        time.sleep(0.2)
        assert q.alive()
        assert q.qmp.query_status()["status"] == "running"
    finally:
        q.close()


CHILD = textwrap.dedent("""
    import sys, time
    from vhostlab.qemu import QemuInstance
    q = QemuInstance(None, qemu=sys.argv[1]).start()
    print(q.pid, q.workdir, flush=True)
    time.sleep(120)
""")


PR_SET_CHILD_SUBREAPER = 36


def _subreaper(on: bool) -> None:
    # Orphans of our children are re-parented to us, so the test can reap the
    # QEMU it orphans instead of leaving a zombie to an init that may not reap.
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0)


def test_killed_owner_takes_qemu_with_it(requires_qemu):
    _subreaper(True)
    child = subprocess.Popen([sys.executable, "-c", CHILD, requires_qemu],
                             stdout=subprocess.PIPE, text=True)
    pid = None
    try:
        pid_s, workdir = child.stdout.readline().split()
        pid = int(pid_s)
        assert not gone(pid)
        child.kill()                    # like a notebook kernel being killed
        child.wait(10)
        assert wait_gone(pid), f"QEMU {pid} outlived its killed owner"
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        pid = None
        assert os.path.isdir(workdir)   # nobody could clean up ... until the next start
        assert workdir in sweep_stale_workdirs()
        assert not os.path.exists(workdir)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        if pid is not None and not gone(pid):
            os.kill(pid, signal.SIGKILL)
        if pid is not None:
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
        _subreaper(False)


def test_sweep_leaves_directories_of_live_processes_alone():
    mine = tempfile.mkdtemp(prefix=f"{WORKDIR_PREFIX}{os.getpid()}-")
    try:
        sweep_stale_workdirs()
        assert os.path.isdir(mine)
    finally:
        os.rmdir(mine)


def test_qemu_killed_from_outside_is_reported(requires_qemu):
    with QemuInstance(None, qemu=requires_qemu) as q:
        os.kill(q.pid, signal.SIGKILL)
        q.wait(10)
        with pytest.raises(vq.QemuExitedError) as err:
            q.check_alive()
        assert err.value.exit_code == -signal.SIGKILL
        assert "SIGKILL" in str(err.value)


def test_netdev_the_qemu_lacks_is_refused_before_start(requires_qemu):
    info = find_qemu(requires_qemu)
    old = dataclasses.replace(info, netdevs=tuple(n for n in info.netdevs if n != "dgram"))
    with pytest.raises(vq.QemuNotFoundError, match="no 'dgram' netdev"):
        QemuInstance(dgram_netdev(9), qemu=old)


def test_vhost_user_netdev_talks_vhost_user_and_reports_a_dead_back_end(requires_qemu, tmp_path):
    # A listener that reads QEMU's first vhost-user message, then goes away.
    path = str(tmp_path / "backend.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    listener.settimeout(10)
    box = {}

    def start():
        try:
            box["q"] = QemuInstance(vhost_user_netdev(path), qemu=requires_qemu, timeout=5).start()
        except Exception as exc:  # the expected outcome, checked below
            box["error"] = exc

    t = threading.Thread(target=start)
    t.start()
    try:
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(10)
            request, flags, size = struct.unpack("<III", conn.recv(12))
        assert (request, flags, size) == (1, 0x1, 0)     # GET_FEATURES, version 1, no payload
    finally:
        listener.close()
        os.unlink(path)          # QEMU retries while the socket exists; now it cannot
        t.join(30)
        if "q" in box:
            box["q"].close()
    err = box["error"]
    assert isinstance(err, QemuStartError) and err.exit_code == 1
    # QEMU >= 7.2 names the op; 5.2 names the short read of the reply's header.
    assert ("vhost_backend_init failed" in err.stderr_tail
            or "Failed to read msg header" in err.stderr_tail), err.stderr_tail
    assert "vhost-user back-end" in err.hint


@pytest.mark.parametrize("ending", ["return", "ctrl-c"])
def test_interpreter_exit_without_close_cleans_up(requires_qemu, ending):
    script = textwrap.dedent(f"""
        import os, signal, sys, time
        from vhostlab.qemu import QemuInstance
        q = QemuInstance(None, qemu={requires_qemu!r}).start()
        q.guest()
        print(q.pid, q.workdir, flush=True)
        if {ending!r} == "ctrl-c":
            os.kill(os.getpid(), signal.SIGINT)   # an unhandled KeyboardInterrupt
            time.sleep(30)
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60)
    pid_s, workdir = res.stdout.split()
    # Python ends an unhandled KeyboardInterrupt by re-raising SIGINT on itself.
    assert res.returncode == (0 if ending == "return" else -signal.SIGINT), res.stderr
    assert gone(int(pid_s))
    assert not os.path.exists(workdir)
