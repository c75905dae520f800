"""The built-in guest and front-end with packed rings, without a peer: what the guest
negotiates, the vring base it keeps (QEMU's encoding), where SET_VRING_ADDR points,
the CLI's refusals, and the vhostlab back-end's packed migration once it offers them."""
from __future__ import annotations

import pytest

from test_cli import vhostlab
from vhostlab.frontend import BuiltinVirtioNetGuest, GuestDriverError, VhostDev
from vhostlab.frontend.guest import DRIVER_FEATURES, RING_GPA, RX_QUEUE, TX_QUEUE
from vhostlab.frontend.migration import BuiltinMigration
from vhostlab.frontend.vhost_dev import VhostVirtqueue
from vhostlab.protocol import Feature
from vhostlab.ring import PackedVirtqueueDriver, VirtqueueDriver
from vhostlab.ring.packed_layout import VRING_PACKED_EVENT_SIZE, parse_packed_vring_base

PACKED = int(Feature.VIRTIO_F_RING_PACKED)
OFFERED = DRIVER_FEATURES | PACKED | int(Feature.VHOST_F_LOG_ALL)


@pytest.fixture
def packed_guest():
    guest = BuiltinVirtioNetGuest(ring="packed", queue_size=16)
    yield guest
    guest.close()


def test_packed_guest_runs_packed_drivers_in_its_ring_areas(packed_guest):
    for q in (RX_QUEUE, TX_QUEUE):
        queue = packed_guest.queues[q]
        assert isinstance(queue.driver, PackedVirtqueueDriver) and queue.packed
        # descriptor ring, then the driver area, then the device area (SET_VRING_ADDR's three)
        assert (queue.desc, queue.avail, queue.used) == (
            RING_GPA[q], RING_GPA[q] + 16 * 16, RING_GPA[q] + 16 * 16 + 4)
        assert packed_guest.virtio_queue_get_desc_size(q) == 16 * 16
        assert packed_guest.virtio_queue_get_avail_size(q) == VRING_PACKED_EVENT_SIZE
        assert packed_guest.virtio_queue_get_used_size(q) == VRING_PACKED_EVENT_SIZE
    with pytest.raises(GuestDriverError, match="no used->idx"):
        packed_guest.used_idx(RX_QUEUE)
    assert packed_guest.pending_used(RX_QUEUE) == 0


def test_packed_is_accepted_only_when_asked_and_refused_when_not_offered(packed_guest):
    assert packed_guest.negotiate(OFFERED) & PACKED
    with pytest.raises(GuestDriverError, match="does not offer VIRTIO_F_RING_PACKED") as info:
        packed_guest.negotiate(OFFERED & ~PACKED)
    assert "DPDK" in info.value.hint
    split = BuiltinVirtioNetGuest(queue_size=16)
    try:
        assert isinstance(split.queues[0].driver, VirtqueueDriver)
        assert not split.negotiate(OFFERED) & PACKED           # split guests leave it out
    finally:
        split.close()
    with pytest.raises(GuestDriverError, match="ring"):
        BuiltinVirtioNetGuest(ring="twisted")


def test_vring_base_is_qemus_packed_encoding(packed_guest):
    # a reset VirtQueue: both indices 0, both wrap counters 1
    assert packed_guest.virtio_queue_get_last_avail_idx(RX_QUEUE) == 0x80008000
    packed_guest.virtio_queue_set_last_avail_idx(RX_QUEUE, 0x00058010)
    assert parse_packed_vring_base(0x00058010) == (16, 1, 5, 0)
    q = packed_guest.queues[RX_QUEUE]
    assert (q.last_avail_idx, q.last_avail_wrap_counter, q.used_idx, q.used_wrap_counter) == (
        16, 1, 5, 0)
    assert packed_guest.virtio_queue_get_last_avail_idx(RX_QUEUE) == 0x00058010
    split = BuiltinVirtioNetGuest(queue_size=16)
    try:
        split.virtio_queue_set_last_avail_idx(RX_QUEUE, 300)
        assert split.virtio_queue_get_last_avail_idx(RX_QUEUE) == 300
    finally:
        split.close()


class _Ops:
    """Just enough of VhostOps for VhostDev's constructor and set_addr."""

    def __init__(self):
        self.channel = type("C", (), {"listeners": []})()
        self.op_hooks, self.ops_called, self.addrs = [], [], []

    def vhost_set_vring_addr(self, index, **addr):
        self.addrs.append(addr)


def test_a_packed_ring_is_logged_against_its_descriptor_ring():
    dev = VhostDev(_Ops())
    vq = VhostVirtqueue(0, num=256, desc_phys=0x200000, avail_phys=0x201000,
                        used_phys=0x201004)
    dev.acked_features = DRIVER_FEATURES
    assert dev.log_guest_addr(vq) == 0x201004                  # split: the used ring
    dev.acked_features = DRIVER_FEATURES | PACKED
    assert dev.log_guest_addr(vq) == 0x200000                  # packed: where the device writes
    dev.vhost_virtqueue_set_addr(vq, 0, True)
    assert dev.vhost_ops.addrs[-1]["log_guest_addr"] == 0x200000


def test_migration_checks_its_ring_option():
    with pytest.raises(ValueError, match="ring='twisted'"):
        BuiltinMigration(ring="twisted")


def test_vhostlab_back_end_packed_migration_loses_no_frame():
    m = BuiltinMigration(ring="packed", rounds=2, frames_per_round=8)
    if not m.backend_offers_packed():
        m.close()
        pytest.skip("vhostlab's back-end does not offer VIRTIO_F_RING_PACKED in GET_FEATURES; "
                    "this runs once it does")
    summary = m.run()
    assert summary["ring"] == "packed" and summary["integrity"] == "ok", summary["problems"]
    assert summary["frames"]["lost"] == 0 and summary["migration"]["pages_mismatched"] == 0
    assert all(b["avail_wrap_counter"] in (0, 1) for b in summary["vring_base"])
    # Both back-ends copied each packed ring at the switch-over: the source's
    # device position is what GET_VRING_BASE answered, the destination's what
    # SET_VRING_BASE gave, and the slots travelled with guest RAM.
    src, dst = m.switchover.taken("source"), m.switchover.taken("destination")
    assert [r.index for r in src] == [r.index for r in dst] == [0, 1]
    bases = {b["queue"]: b["num"] for b in summary["vring_base"]}
    for s, d in zip(src, dst):
        assert s.ring_format == d.ring_format == "packed"
        assert s.device == d.device == parse_packed_vring_base(bases[s.index])
        assert (s.desc == d.desc).all() and s.log_bitmap is not None and d.log_bitmap is None
    assert len(src[0].in_flight) > 0            # RX buffers posted, not taken
    broken_m = BuiltinMigration(ring="packed", rounds=2, frames_per_round=8,
                                break_logging=True, wait_timeout=2.0)
    broken = broken_m.run()
    assert broken["integrity"] == "corrupted"
    # The final sync's lost pages name the RX frames that lived in them, read
    # from the used slots of the source's packed RX ring.
    final = broken_m.dirty_rounds[-1]
    named = [f for page in final.mismatched for f in page.frames]
    assert final.final_sync and any(f.startswith("RX #") for f in named), final.mismatched


def test_demo_qemu_refuses_packed_rings_with_the_reason():
    out = vhostlab("demo", "--frontend", "qemu", "--ring", "packed")
    assert out.returncode == 2
    assert "legacy virtio-net-pci" in out.stderr + out.stdout
    assert "VIRTIO_F_RING_PACKED" in out.stderr + out.stdout
    out = vhostlab("demo", "--frontend", "recorded", "--ring", "packed")
    assert out.returncode == 2 and "--frontend builtin" in out.stdout


def test_demo_packed_on_vhostlab_back_ends_runs_or_says_why_not():
    probe = BuiltinMigration(ring="packed")
    offered = probe.backend_offers_packed()
    probe.close()
    out = vhostlab("demo", "--frontend", "builtin", "--ring", "packed", "--json")
    if offered:
        assert out.returncode == 0 and '"integrity": "ok"' in out.stdout
    else:                      # a set-up failure that names the missing feature
        assert out.returncode == 2
        assert "does not offer VIRTIO_F_RING_PACKED" in out.stdout
        assert '"ring": "packed"' in out.stdout


def test_narration_decodes_get_vring_base_with_its_wrap_counters():
    from vhostlab.frontend.demo import format_vring_base
    assert format_vring_base(64, packed=False) == "num=64: last_avail_idx=64"
    line = format_vring_base(0x8010, packed=True)
    assert line.startswith("num=0x8010: last_avail_idx=16 wrap=1, last_used_idx=0 wrap=0")
    assert "bits 16-31 empty" in line               # DPDK's 16-bit answer, said so
    assert format_vring_base(0x00058010, packed=True) == (
        "num=0x58010: last_avail_idx=16 wrap=1, last_used_idx=5 wrap=0")
