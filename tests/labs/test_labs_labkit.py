"""vhostlab.labkit: the front-end choice, real devices set up for the labs, and cleanup.

Everything here runs against the real back-end (a server thread on a unix
socket), real memfd guest RAM and eventfds, and, where marked, a real QEMU.
"""
from __future__ import annotations

import html
import os
import re

import pytest

from vhostlab import doctor, labkit

FRAME = b"\x52\x54\x00\x12\x34\x56" + b"\x02" * 6 + b"\x08\x00" + bytes(range(64))


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def lab():
    lab = labkit.open_lab("test")
    yield lab
    lab.close()


def test_unknown_frontend_value_is_a_named_error(monkeypatch):
    monkeypatch.setenv("VHOSTLAB_FRONTEND", "qmeu")
    with pytest.raises(labkit.LabSetupError, match="qmeu"):
        labkit.choose_frontend()


def test_forcing_qemu_without_qemu_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("VHOSTLAB_FRONTEND", "qemu")
    monkeypatch.setenv("VHOSTLAB_QEMU", "")
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(labkit.LabSetupError, match="apt-get install"):
        labkit.choose_frontend()


@pytest.mark.parametrize("value", ["builtin", "auto", ""])
def test_choice_is_doctors(monkeypatch, value):
    monkeypatch.setenv("VHOSTLAB_FRONTEND", value)
    expected = doctor.choose_frontend(doctor.qemu_info())
    assert labkit.choose_frontend() == expected
    assert os.environ["VHOSTLAB_FRONTEND"] == value      # the environment is left as it was


def test_each_frontend_implements_the_protocol_and_other_names_are_refused():
    for name in ("qemu", "builtin"):
        frontend = labkit.frontend_named(name)
        assert isinstance(frontend, labkit.Frontend) and frontend.name == name
    with pytest.raises(labkit.LabSetupError, match="expected 'qemu' or 'builtin'"):
        labkit.frontend_named("kvm")


def test_a_bad_frontend_starts_nothing_and_builtin_has_no_qemu_to_step(lab):
    with pytest.raises(labkit.LabSetupError, match="'kvm'"):
        lab.start_device(frontend="kvm")
    assert lab.running() == [] and lab._owned == []
    lab.frontend = "builtin"
    assert lab.qemu_stepper() is None and lab.qemu_version is None
    assert "the built-in Python front-end" in lab.describe()


def test_reopening_a_lab_stops_what_the_previous_one_started(monkeypatch):
    monkeypatch.setenv("VHOSTLAB_FRONTEND", "builtin")
    first = labkit.open_lab("first")
    backend = first.start_backend()
    assert backend.running and os.path.isdir(first.workdir)
    second = labkit.open_lab("second")
    try:
        assert not backend.running and not os.path.exists(first.workdir)
        with pytest.raises(labkit.LabSetupError, match="closed"):
            first.start_backend()
    finally:
        second.close()


def test_builtin_device_moves_frames_and_close_leaves_nothing(monkeypatch):
    monkeypatch.setenv("VHOSTLAB_FRONTEND", "builtin")
    before = _fds()
    lab = labkit.open_lab("builtin-device")
    dev = lab.start_device()
    assert dev.frontend == "builtin" and dev.requests()[0] == "GET_FEATURES"
    dev.transmit([FRAME] * 3)
    assert dev.wait_wire(3) == [FRAME] * 3
    dev.backend.inject([FRAME[::-1]] * 5)
    assert dev.receive(5) == [FRAME[::-1]] * 5
    assert lab.close() == []
    assert lab.leftovers() == []
    assert _fds() == before


@pytest.mark.qemu
def test_qemu_device_moves_frames_and_close_stops_qemu(requires_qemu, monkeypatch):
    monkeypatch.setenv("VHOSTLAB_FRONTEND", "qemu")
    lab = labkit.open_lab("qemu-device")
    try:
        dev = lab.start_device()
        pid = dev.qemu.pid
        assert pid in labkit.child_processes()
        dev.transmit([FRAME] * 2)
        assert dev.wait_wire(2) == [FRAME] * 2
        dev.backend.inject([FRAME] * 2)
        assert dev.receive(2) == [FRAME] * 2
        assert "SET_VRING_KICK" in dev.requests()
    finally:
        assert lab.close() == []
    assert pid not in labkit.child_processes()
    assert lab.leftovers() == []


def test_qemu_logging_window_stays_open_until_it_is_closed(requires_qemu, monkeypatch):
    # Into `exec:cat > /dev/null`, QEMU 10 finished this migration within about a
    # second and stopped the VM; into the sink it stays active until cancelled.
    monkeypatch.setenv("VHOSTLAB_FRONTEND", "qemu")
    lab = labkit.open_lab("qemu-logging-window")
    try:
        dev = lab.start_device()
        qmp = dev.qemu.qmp
        with dev.logging_window() as window:
            sink = dev.migration_sink
            dev.backend.inject([FRAME] * 4)
            assert dev.receive(4) == [FRAME] * 4
            assert window.wait_logged(pages=2)
            # 64 KiB sent (at 16 KiB/s; QEMU 10 at once, until the sink's buffer is
            # full): the migration goes on, the VM runs.
            assert labkit.wait_until(
                lambda: qmp.query_migrate()["ram"]["transferred"] > 64 << 10, 30)
            assert qmp.query_migrate()["status"] == "active"
            assert qmp.query_status()["status"] == "running"
        assert qmp.query_migrate()["status"] == "cancelled"
        assert dev.migration_sink is None and not os.path.exists(sink.path)
        assert not dev.backend.snapshot().logging
        requests = dev.requests()
        window_requests = requests[requests.index("SET_LOG_BASE"):]
        assert "GET_VRING_BASE" not in window_requests        # the rings never stopped
        dev.transmit([FRAME] * 2)                             # and the device still runs
        assert dev.wait_wire(2) == [FRAME] * 2
    finally:
        assert lab.close() == []


def test_vring_view_of_the_builtin_guest_lists_its_descriptors_first(lab):
    dev = lab.start_device(frontend="builtin")
    dev.transmit([FRAME] * 4)
    assert dev.wait_wire(4) == [FRAME] * 4
    assert labkit.wait_until(lambda: dev.guest.used_idx(1) == 4)
    view = dev.vring_view(1)
    page = view.to_html()
    text = html.unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", page)))
    heads = [int(h) for h in view.snapshot().avail_ring[:4]]
    assert heads == [255, 254, 253, 252]            # this driver hands out the top first
    listed = re.findall(r"<tr[^>]*><td><span[^>]*>(\d+)</span></td>.*?<td>([^<]*)</td></tr>",
                        page)
    assert listed == [(str(h), "used, not reaped") for h in sorted(heads)]
    assert "\u22ef 0\u2013251 not shown 252 " in text and "252 unused descriptors" in text
    assert "last_used_idx 0 (the driver's; 4 not yet reaped)" in text
    assert "4 chains in flight" in text and "last_avail_idx 4 (0 waiting" in text


def test_logging_window_turns_logging_on_and_off(lab):
    dev = lab.start_device(frontend="builtin")
    with dev.logging_window() as window:
        assert dev.backend.snapshot().logging
        dev.backend.inject([FRAME] * 4)
        assert window.wait_logged(pages=2)
    assert not dev.backend.snapshot().logging
    requests = dev.requests()
    start = requests.index("SET_LOG_BASE")
    assert requests[start:start + 2] == ["SET_LOG_BASE", "SET_FEATURES"]


def test_op_reference_records_messages_local_answers_and_absences(lab):
    backend = lab.start_backend()
    ops = lab.connect_ops(backend)
    ref = lab.op_reference(ops, backend)
    with ref.op("vhost_backend_init"):
        ops.vhost_backend_init()
    with ref.op("vhost_get_vq_index"):
        ops.vhost_get_vq_index(0)
    with ref.op("vhost_net_set_backend"):
        ops.vhost_net_set_backend(0, -1)
    with ref.op("vhost_crypto_close_session"):
        ops.vhost_crypto_close_session(1)
    kinds = {name: o["kind"] for name, o in ref.outcomes.items()}
    assert kinds == {"vhost_backend_init": "message", "vhost_get_vq_index": "local",
                     "vhost_net_set_backend": "kernel only",
                     "vhost_crypto_close_session": "needs a protocol feature"}
    assert ref.outcomes["vhost_backend_init"]["detail"].startswith("GET_FEATURES, ")
    assert "VHOST_NET_SET_BACKEND" in ref.outcomes["vhost_net_set_backend"]["detail"]
    with pytest.raises(labkit.LabSetupError, match="vhost_set_owner"):
        with ref.op("vhost_set_owner"):
            ops.vhost_get_features()       # the wrong op in the block is caught


def test_tx_ring_gives_twin_and_kernel_the_same_descriptors(lab):
    from vhostlab.ring import FrameArena
    ring = lab.tx_ring(frames=32, frame_bytes=100)
    a, b = FrameArena(1 << 16, 32), FrameArena(1 << 16, 32)
    assert ring.vq.tx_burst(ring.memory, a, hdr_len=12, impl="python") == 32
    used = ring.used()
    ring.rewind()
    assert ring.vq.tx_burst(ring.memory, b, hdr_len=12, impl="numba") == 32
    assert list(a.frames()) == list(b.frames()) == ring.frames
    assert (ring.used() == used).all() and used["id"][:32].tolist() != [0] * 32


def test_llvm_ir_shows_the_atomic_or_of_dirty_logging():
    import numpy as np
    from vhostlab.ring import vhost_log_write
    vhost_log_write(np.zeros(8, np.uint8), 0, 4096)
    assert "atomicrmw or" in labkit.llvm_ir(vhost_log_write)


def test_builtin_migration_through_the_lab(lab):
    lab.frontend = "builtin"
    mig = lab.migration().start()
    summary = mig.wait(60)
    assert summary["integrity"] == "ok" and summary["migration"]["status"] == "completed"
    assert mig.requests()[-2:] == ["GET_VRING_BASE", "GET_VRING_BASE"]
    assert "SET_VRING_BASE" in mig.requests("destination")
    assert len(mig.rounds()) >= 2


def _run_in_kernel(cells: list[str], frontend: str, monkeypatch) -> list[str]:
    """Execute ``cells`` in a fresh kernel (which is then shut down); return their stdout."""
    import nbformat
    from nbclient import NotebookClient
    monkeypatch.setenv("VHOSTLAB_FRONTEND", frontend)
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    NotebookClient(nb, timeout=60, kernel_name="python3").execute()
    return ["".join(o.get("text", "") for o in c.outputs) for c in nb.cells]


KERNEL_CELLS = [
    "from vhostlab import labkit\nlab = labkit.open_lab('shutdown')\ndev = lab.start_device()",
    "print(lab.workdir, dev.qemu.pid if dev.qemu else 0)",
    # no lab.close(): the kernel's exit must clean up (atexit)
]


@pytest.mark.parametrize("frontend", ["builtin", "qemu"])
def test_kernel_shutdown_stops_what_a_lab_left_running(frontend, monkeypatch, request):
    if frontend == "qemu":
        request.getfixturevalue("requires_qemu")
    out = _run_in_kernel(KERNEL_CELLS, frontend, monkeypatch)
    workdir, pid = out[1].split()
    assert workdir.startswith("/") and not os.path.exists(workdir)
    if frontend == "qemu":
        assert int(pid) > 0
        assert labkit.wait_until(lambda: not os.path.exists(f"/proc/{pid}"), 10), \
            f"QEMU {pid} outlived the kernel that started it"
