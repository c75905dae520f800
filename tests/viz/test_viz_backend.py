"""A lab's walk, step by step, against the real back-end over a real socket.

A Stepper issues the built-in front-end's vhost.c functions one at a time; the
views it redraws after each step read the back-end's own state (its trace,
memory table, rings, dirty log) and the guest's memory.
"""
from __future__ import annotations

import html
import re

import pytest

from vhostlab.backend import BackendServer
from vhostlab.frontend import VhostDev, VhostOps, VhostUserChannel, BuiltinVirtioNetGuest
from vhostlab.frontend.guest import RX_QUEUE
from vhostlab.viz import (LogBitmapView, MemoryMapView, Stepper, TraceView,
                          VhostOpsTableView, VirtqueueView)


def _text(page: str) -> str:
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", page)))


@pytest.fixture
def lab():
    server = BackendServer(None).start()
    guest = dev = None
    try:
        dev = VhostDev(VhostOps(VhostUserChannel.connect(server.socket_path)))
        guest = BuiltinVirtioNetGuest(16 << 20, 8)
        yield server, dev, guest
    finally:
        if dev is not None:
            dev.vhost_dev_cleanup()
        if guest is not None:
            guest.close()
        server.stop()


def _rx_frames(server, n):
    return lambda snap: snap.counters["guest_rx_frames"] >= n


def test_stepper_walks_the_start_and_views_follow_the_backend(lab):
    server, dev, guest = lab
    frame = bytes(range(60))

    def inject(n, total):
        def step():
            server.inject([frame] * n)
            assert server.wait_for(_rx_frames(server, total), 10)
        return step

    rx = VirtqueueView(guest.queues[RX_QUEUE], memory=guest.memory,
                       state=lambda: server.snapshot(trace=False).vrings[RX_QUEUE])
    views = [TraceView(server, limit=8), MemoryMapView(server), rx, LogBitmapView(server)]
    stepper = Stepper([
        ("vhost_dev_init", dev.vhost_dev_init),
        ("negotiate", lambda: guest.negotiate(dev.features)),
        ("vhost_net_start", lambda: dev.vhost_net_start(guest)),
        ("post RX buffers", guest.post_rx_buffers),
        ("inject 3 frames", inject(3, 3)),
        ("vhost_log_global_start", dev.vhost_log_global_start),
        ("inject 2 frames", inject(2, 5)),
    ], views=views)

    stepper.step()
    shown = _text(stepper._area.value)
    assert "SET_OWNER" in shown and "no memory table yet" in shown
    assert "no dirty log yet" in shown
    stepper.step()
    stepper.step()
    shown = _text(stepper._area.value)
    assert "SET_VRING_ENABLE" in shown                  # the last of vhost_net_start
    for region in guest.memory.regions:                  # the back-end's table = the guest's
        assert f"{region.guest_phys_addr:#x}" in shown and f"{region.memory_size:#x}" in shown
    assert "3 regions" in shown
    stepper.step()
    stepper.step()
    shown = _text(rx.to_html())
    assert "avail.idx 8" in shown and "used.idx 3" in shown
    assert "last_avail_idx 3 (5 waiting for the device)" in shown
    assert "last_used_idx 0 (the driver's; 3 not yet reaped)" in shown
    assert "8 chains in flight" in shown             # the guest driver's own list
    # All 8 descriptors are in use: 3 returned to the driver, 5 waiting for the device.
    states = re.findall(r"head (\d+), #1 (used, not reaped|pending)", shown)
    assert sorted(s for _h, s in states) == ["pending"] * 5 + ["used, not reaped"] * 3
    assert "0 unused descriptors not shown" in shown
    stepper.run_all()
    assert stepper.done, stepper.log
    shown = _text(stepper._area.value)
    assert "SET_LOG_BASE" in shown and "VHOST_F_LOG_ALL" in shown
    assert "used.idx 5" in shown
    # The two frames after SET_LOG_BASE were logged where the RX buffers are.
    snap = server.snapshot(trace=False)
    assert snap.log is not None and snap.log.dirty_pages > 0
    assert f"<b>{snap.log.dirty_pages}</b> of {snap.log.pages} pages dirty" in stepper._area.value
    table = _text(VhostOpsTableView(device=dev).to_html())
    assert "vhost_set_log_base SET_LOG_BASE VHOST_SET_LOG_BASE uses it" in table
