"""A real QEMU driving the vhostlab back-end: start-up, then frames both ways.

QEMU's vhost-user netdev connects to a BackendServer serving in this process;
the guest's virtio-net driver runs over qtest. Frames the back-end injects
must reach the guest's RX buffers, byte for byte; frames the guest transmits
must reach the back-end's wire, byte for byte.
"""
from __future__ import annotations

import pytest

from vhostlab.qemu import RX_QUEUE, TX_QUEUE, FrameLedger, VhostUserHost, ops_called
from vhostlab.qemu.traffic import FROM_GUEST, TO_GUEST
from vhostlab.protocol import TO_BACKEND

pytestmark = pytest.mark.qemu

MiB = 1 << 20


@pytest.fixture
def host(requires_qemu):
    h = VhostUserHost("vm", ram_size=64 * MiB, qemu=requires_qemu).start()
    yield h
    h.close()
    assert not h._own.qemu.alive()


def _receive(guest, n: int) -> list[bytes]:
    got = []
    for _ in range(50):
        got += guest.receive(timeout=0.2)
        if len(got) >= n:
            break
    return got


def test_startup_sequence_and_device_state(host):
    guest = host.init_guest()
    snap = host.server.snapshot()
    requests = [r.request for r in snap.trace if r.direction == TO_BACKEND]
    # vhost_user_backend_init first, then vhost_dev_init's SET_OWNER ...
    assert requests[0] == "GET_FEATURES"
    assert requests.index("SET_OWNER") < requests.index("SET_FEATURES")
    # ... and vhost_dev_start at DRIVER_OK: memory, then every ring, kick last.
    memory = [i for i, r in enumerate(requests) if r in ("SET_MEM_TABLE", "ADD_MEM_REG")]
    kicks = [i for i, r in enumerate(requests) if r == "SET_VRING_KICK"]
    assert memory and len(kicks) == 2 and max(memory) < min(kicks)
    ops = ops_called(snap.trace)
    assert ops[:3] == ["vhost_backend_init", "vhost_set_owner", "vhost_get_features"]
    assert {"vhost_set_mem_table", "vhost_set_vring_addr", "vhost_set_vring_kick"} <= set(ops)

    assert snap.connected and snap.peer_pid == host.qemu.pid
    # QEMU acks only what the driver negotiated (of the bits vhost-user-net
    # passes on), plus VHOST_USER_F_PROTOCOL_FEATURES.
    protocol_features = 1 << 30
    assert snap.features & protocol_features
    assert snap.features & ~protocol_features & ~guest.guest_features == 0
    assert not snap.logging and snap.log is None          # no migration yet
    ram = sum(r.memory_size for r in snap.memory)
    assert 60 * MiB < ram <= 64 * MiB                     # the pc layout's holes aside
    for queue in (RX_QUEUE, TX_QUEUE):
        ring, gpas = snap.vrings[queue], guest.queue_gpas(queue)
        # SET_VRING_ADDR spoke in QEMU's virtual addresses; the back-end found the GPAs.
        assert (ring.desc, ring.avail, ring.used) == (gpas.desc, gpas.avail, gpas.used)
        assert ring.log_guest_addr == gpas.used
        assert ring.started and ring.enabled and ring.error is None
        assert ring.num == guest.queue_size(queue)             # SET_VRING_NUM: what the device said


def test_a_guest_that_resets_the_device_and_starts_again_still_has_frames_flow(host):
    # A driver reload: status 0, then the whole initialisation again. QEMU 10.0
    # sends RESET_DEVICE at the reset and, at DRIVER_OK, the rings but no memory
    # table (it did not change): the back-end must have kept the one it had.
    guest = host.init_guest()
    first = FrameLedger(FROM_GUEST)
    guest.transmit([first.make(100)])
    assert host.server.wait_for(lambda s: s.counters["guest_tx_frames"] == 1, timeout=10)
    guest.reset()
    guest.set_status(1)
    guest.set_status(3)
    guest.negotiate_features()
    for q in (RX_QUEUE, TX_QUEUE):
        guest.setup_queue(q)
    guest.driver_ok()
    assert host.server.wait_for(lambda s: all(v.started for v in s.vrings), timeout=10)
    again = [first.make(n) for n in (60, 700)]
    guest.transmit(again)
    assert host.server.wait_for(lambda s: s.counters["guest_tx_frames"] == 3, timeout=10)
    assert host.wire.take()[-2:] == again
    assert not host.counters()["errors"]


def test_frames_both_ways_byte_for_byte(host):
    guest = host.init_guest()
    guest.post_rx_buffers()
    to_guest, from_guest = FrameLedger(TO_GUEST), FrameLedger(FROM_GUEST)
    inbound = [to_guest.make(n) for n in (60, 64, 333, 1000, 1514, 1514, 77, 512)]
    assert host.server.inject(inbound) == len(inbound)
    got = _receive(guest, len(inbound))
    assert got == inbound
    outbound = [from_guest.make(n) for n in (1514, 60, 200, 900, 61)]
    heads = guest.transmit(outbound)
    assert len(heads) == len(outbound)
    assert host.server.wait_for(
        lambda s: s.counters["guest_tx_frames"] == len(outbound), timeout=10)
    assert host.wire.take() == outbound
    assert guest.wait_used(TX_QUEUE, len(outbound), timeout=10) == len(outbound)
    counters = host.counters()
    assert counters["guest_rx_frames"] == len(inbound)
    assert counters["guest_rx_bytes"] == sum(map(len, inbound))
    assert counters["guest_tx_bytes"] == sum(map(len, outbound))
    assert counters["dropped"] == 0 and counters["pages_logged"] == 0
    assert not counters["errors"]
    assert guest.ring_state(RX_QUEUE).used_idx == len(inbound)
