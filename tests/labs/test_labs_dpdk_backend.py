"""A lab on DPDK's vhost back-end (VHOSTLAB_BACKEND=dpdk): testpmd's vhost port behind
the recording relay, a second guest on testpmd's paired port as the wire.

Real parts only: dpdk-testpmd, memfd guest RAM, eventfds, unix sockets.
"""
from __future__ import annotations

import pytest

from vhostlab import labkit
from vhostlab.labkit import LabSetupError
from vhostlab.protocol import TO_BACKEND, Feature

MAC = b"\x52\x54\x00\x12\x34\x56"


def _frames(n: int, first: int, dst: bytes = MAC) -> list[bytes]:
    return [dst + b"\x02" * 6 + b"\x08\x00" + bytes([first + i]) * (60 + i) for i in range(n)]


@pytest.fixture
def dpdk_lab(requires_dpdk, monkeypatch):
    monkeypatch.setenv("VHOSTLAB_DPDK", requires_dpdk)
    monkeypatch.setenv("VHOSTLAB_FRONTEND", "builtin")
    lab = labkit.open_lab("test-dpdk", backend="dpdk")
    yield lab
    assert lab.close() == []
    assert lab.leftovers() == []


def test_an_unknown_backend_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("VHOSTLAB_BACKEND", "spdk")
    with pytest.raises(LabSetupError, match="vhostlab, dpdk"):
        labkit.open_lab("test-unknown-backend")


def test_the_lab_says_whose_backend_it_drives(dpdk_lab):
    assert dpdk_lab.backend == "dpdk"
    assert "the back-end is DPDK's" in dpdk_lab.describe()


def test_frames_both_ways_and_the_snapshot_is_what_the_front_end_told_dpdk(dpdk_lab):
    dev = dpdk_lab.start_device(frontend="builtin", rx_buffers=16)
    out = _frames(4, 0x40, dst=b"\xff" * 6)
    dev.transmit(out)
    assert dev.wait_wire(4) == out                  # guest -> port 0 -> port 1's guest
    into = _frames(4, 0x80)
    dev.backend.inject(into)
    assert dev.receive(4) == into                   # port 1's guest -> port 0 -> guest

    snap = dev.backend.snapshot()
    guest = dev.guest
    assert [(r.guest_phys_addr, r.memory_size) for r in snap.memory] == \
        [(r.guest_phys_addr, r.memory_size) for r in guest.memory.regions]
    for q in guest.queues:                          # SET_VRING_ADDR's UVAs, back to GPAs
        ring = snap.vrings[q.index]
        assert (ring.desc, ring.avail, ring.used) == (q.desc, q.avail, q.used)
        assert ring.used_idx == guest.used_idx(q.index) and ring.started and ring.enabled
    assert snap.vrings[1].used_idx == 4 and snap.vrings[0].used_idx == 4
    assert snap.features == dev.ops.acked_features | Feature.VHOST_USER_F_PROTOCOL_FEATURES
    assert snap.counters["guest_rx_frames"] == 4 and snap.counters["errors"] == ()


def test_dpdk_logs_in_a_logging_window(dpdk_lab):
    dev = dpdk_lab.start_device(frontend="builtin", rx_buffers=16)
    with dev.logging_window() as window:
        dev.backend.inject(_frames(4, 0x10))
        assert dev.receive(4)
        assert window.wait_logged(pages=2)
        shown = dev.dirty_round()
    rx_buffers = next(b for b in shown.bands if b.name == "RX buffers")
    logged = set(shown.log_pages.tolist())
    assert any(rx_buffers.first_page <= p < rx_buffers.first_page + rx_buffers.n_pages
               for p in logged)


def test_break_logging_never_asks_dpdk_to_log(dpdk_lab):
    dev = dpdk_lab.start_device(frontend="builtin", break_logging=True, rx_buffers=16)
    dev.vhost_dev.vhost_log_global_start()
    dev.backend.inject(_frames(4, 0x20))
    assert len(dev.receive(4)) == 4
    assert dev.vhost_dev.log.popcount() == 0
    requests = [r for r in dev.backend.trace.records() if r.direction == TO_BACKEND]
    names = [r.request for r in requests]
    after_log_base = requests[names.index("SET_LOG_BASE"):]
    sent = [r for r in after_log_base if r.request == "SET_FEATURES"]
    assert sent                                     # logging was turned on: SET_FEATURES went
    assert not any(r.fields["payload"]["value"] & Feature.VHOST_F_LOG_ALL for r in sent)


def test_a_refusal_is_reported_in_dpdk_s_words(dpdk_lab):
    backend = dpdk_lab.start_backend()
    ops = dpdk_lab.connect_ops(backend, handshake=True)
    ops.vhost_set_vring_num(1, 100)
    assert labkit.wait_until(lambda: not backend.connected, 10)
    assert labkit.wait_until(lambda: any("invalid virtqueue size 100" in e for e in
                                         backend.snapshot().counters["errors"]), 5)
    assert backend.running                          # testpmd serves the next front-end
    again = dpdk_lab.connect_ops(backend, handshake=True)
    assert again.features & Feature.VHOST_F_LOG_ALL
