"""The QEMU stepper: each step's messages on the QEMU release under test.

One stepper runs every step once per module (about ten seconds); the tests
read its results. CI runs this file against QEMU 5.2, 7.2 and 10.0.
"""
from __future__ import annotations

import os

import pytest

from vhostlab.frontend.optable import VHOST_OPS_TABLE
from vhostlab.qemu import find_qemu
from vhostlab.qemu.host import vring_bases
from vhostlab.qemu.sequences import expected_stop_variant, explain_stop
from vhostlab.qemu.stepper import (HOST_MTU, NOT_CALLABLE_HERE, STEPS, QemuStepper,
                                   attribute_ops, coverage, coverage_column, step_named)
from vhostlab.protocol import TO_BACKEND

SEED_OPS = {op.name for op in VHOST_OPS_TABLE}
MUST = ("vhost_net_set_mtu", "vhost_set_vring_enable", "vhost_get_vring_base",
        "vhost_set_log_base", "vhost_migration_done")
VHOST_F_LOG_ALL = 1 << 26


@pytest.fixture(scope="module")
def walked():
    info = find_qemu()
    if info is None or not info.usable:
        if os.environ.get("VHOSTLAB_REQUIRE_QEMU") == "1":
            pytest.fail("VHOSTLAB_REQUIRE_QEMU=1 but no usable QEMU", pytrace=False)
        pytest.skip("no usable qemu-system-x86_64")
    from vhostlab.viz import CallTimelineView
    stepper = QemuStepper(timeline_view=CallTimelineView)
    try:
        first = stepper.run("DRIVER_OK")
        assert [r.step.name for r in first][-1] == "DRIVER_OK"
        stepper.run()
        yield stepper
    finally:
        stepper.close()
    assert not stepper.alive()


def _result(stepper, name):
    return next(r for r in stepper.results if r.step.name == name)


@pytest.mark.parametrize("name", [s.name for s in STEPS])
def test_each_step_sends_what_its_data_says(requires_qemu, walked, name):
    result = _result(walked, name)
    assert result.check() == [], (walked.info.version_string, result.requests)


def test_fifteen_seed_ops_from_real_messages(requires_qemu, walked):
    seen = walked.ops_seen()
    assert set(MUST) <= set(seen), sorted(seen)
    assert len(SEED_OPS & set(seen)) >= 15, sorted(SEED_OPS & set(seen))
    # the data the lab's column is drawn from agrees with what this QEMU did
    recorded = coverage(walked.version)
    for op, steps in recorded.items():
        assert set(steps) <= set(seen.get(op, ())), (op, steps, seen.get(op))


def test_stop_sends_set_status_where_the_release_puts_it(requires_qemu, walked):
    for name in ("set_link off", "stop"):
        recs = _result(walked, name).records["source"]
        stop = explain_stop(recs, walked.version)
        assert stop.variant == expected_stop_variant(walked.version), (name, stop.observed)
    msgs, _absent, note = step_named("stop").expected(walked.version)
    assert note and ("SET_STATUS" in msgs) == (walked.version[:2] >= (7, 2))


def test_net_set_mtu_carries_host_mtu_and_the_device_offers_mtu(requires_qemu, walked):
    features = _result(walked, "features").detail
    assert features["device offers VIRTIO_NET_F_MTU"] and features["config mtu"] == HOST_MTU
    recs = [r for r in _result(walked, "DRIVER_OK").records["source"]
            if r.request == "NET_SET_MTU" and r.direction == TO_BACKEND]
    assert [r.fields["payload"]["value"] for r in recs] == [HOST_MTU]
    ops = dict((r.request, op) for r, op in _result(walked, "DRIVER_OK").ops["source"])
    assert ops["NET_SET_MTU"] == "vhost_net_set_mtu"


def test_queue_sizes_come_from_qemu(requires_qemu, walked):
    detail = _result(walked, "queue addresses").detail
    size = 1024 if walked.version[:2] >= (10, 0) else 256
    assert detail["queue 0"].startswith(f"size {size},"), detail
    assert f"{size} entries" in step_named("queue addresses").expected(walked.version)[2]
    nums = [r.fields["payload"]["num"] for r in _result(walked, "DRIVER_OK").records["source"]
            if r.request == "SET_VRING_NUM" and r.direction == TO_BACKEND]
    assert nums == [size, size]


def test_logging_on_and_off(requires_qemu, walked):
    def features(name):
        return [r.fields["payload"]["value"] for r in _result(walked, name).records["source"]
                if r.request == "SET_FEATURES" and r.direction == TO_BACKEND]
    assert all(v & VHOST_F_LOG_ALL for v in features("migrate to a sink"))
    assert not any(v & VHOST_F_LOG_ALL for v in features("migrate_cancel"))
    ops = _result(walked, "migrate to a sink").ops_called
    assert ops[0] == "vhost_set_log_base"
    # The migration was still running when it was cancelled (QEMU 10 completed
    # one into `exec:cat` before the next step), and its sink is gone.
    assert _result(walked, "migrate to a sink").detail == {"migration": "active"}
    assert _result(walked, "migrate_cancel").detail == {"migration": "cancelled"}
    assert walked.source.sink is None


def test_migration_carries_ring_positions_and_ends_with_rarp(requires_qemu, walked):
    result = _result(walked, "migrate")
    got = vring_bases(result.records["source"], "GET_VRING_BASE")
    put = vring_bases(result.records["destination"], "SET_VRING_BASE")
    assert got and put == got
    rarps = [r for r in result.records["destination"]
             if r.request == "SEND_RARP" and r.direction == TO_BACKEND]
    assert rarps
    assert "vhost_migration_done" in result.ops_called


def test_kick_is_not_a_message_but_the_frame_arrives(requires_qemu, walked):
    result = _result(walked, "kick")
    assert result.requests == []
    before, after = result.detail["back-end guest_tx_frames"].split(" -> ")
    assert int(after) == int(before) + 1


def test_views_are_marked_inferred_and_nest_in_vhost_c(requires_qemu, walked):
    page = _result(walked, "DRIVER_OK").to_html()
    assert "data-view='call-timeline'" in page and "Inferred" in page
    assert "vhost_dev_start()" in page and "vhost_virtqueue_start()" in page
    assert "vhost_dev_stop()" in _result(walked, "stop").to_html()
    empty = _result(walked, "ACKNOWLEDGE").to_html()
    assert "messages</b> (0)" in empty and "call-timeline" not in empty
    assert "distinct VhostOps" in walked.summary_html()
    column = walked.coverage_column()
    assert all(column[op].startswith("yes") for op in MUST)


def test_widget_steps_and_the_stepper_cleans_up(requires_qemu):
    pytest.importorskip("ipywidgets")
    stepper = QemuStepper()
    try:
        box = stepper.widget()
        button = box.children[0].children[0]
        button.click()
        button.click()
        assert stepper.position == 2 and stepper.alive()
        assert "ACKNOWLEDGE" in box.children[0].children[1].value
        pids = [h.qemu.pid for h in stepper._own.hosts.values()]
    finally:
        stepper.close()
    assert not stepper.alive()
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}") or \
            open(f"/proc/{pid}/stat").read().split()[2] == "Z"
    with pytest.raises(RuntimeError):
        stepper.step()


# -- the data, without QEMU ------------------------------------------------------------------
def test_recorded_coverage_names_every_op_once():
    column = coverage_column()
    assert SEED_OPS <= set(column)
    for op in SEED_OPS:
        assert column[op].startswith(("yes: ", "no: ")), op
    for op in MUST:
        assert column[op].startswith("yes"), op
    for rel in ((5, 2), (7, 2), (10, 0)):
        assert len(SEED_OPS & set(coverage(rel))) >= 15, rel
    assert set(NOT_CALLABLE_HERE) <= SEED_OPS


def test_steps_are_data_and_differences_are_said():
    names = [s.name for s in STEPS]
    assert len(set(names)) == len(names)
    for name in ("ACKNOWLEDGE", "DRIVER", "FEATURES_OK", "DRIVER_OK", "reset", "kick",
                 "stop", "cont", "migrate", "migrate_cancel", "set_link off", "set_link on"):
        assert step_named(name).action and step_named(name).expect
    assert "legacy" in step_named("FEATURES_OK").action
    for name in ("stop", "set_link off", "reset", "DRIVER_OK", "start QEMU",
                 "queue addresses"):
        notes = {step_named(name).expected(v)[2] for v in ((5, 2), (7, 2), (10, 0))}
        assert len(notes) >= 2, name
    with pytest.raises(KeyError, match="no step"):
        step_named("nope")


def test_attribute_ops_reads_status_resets_by_position():
    from vhostlab.backend import TraceRecord

    def rec(seq, req, value=None):
        fields = {"payload": {"value": value}} if value is not None else {}
        return TraceRecord(seq, 0.0, 1, TO_BACKEND, req, fields, b"", 0)
    before = [rec(1, "SET_OWNER"), rec(2, "SET_STATUS", 0), rec(3, "GET_VRING_BASE")]
    after = [rec(1, "SET_OWNER"), rec(2, "GET_VRING_BASE"), rec(3, "SET_STATUS", 0)]
    assert [op for _r, op in attribute_ops(before)][1] == "vhost_dev_start"
    assert [op for _r, op in attribute_ops(after)][2] == "vhost_reset_status"
    init = [rec(1, "GET_FEATURES"), rec(2, "SET_OWNER"), rec(3, "GET_FEATURES")]
    assert [op for _r, op in attribute_ops(init)] == [
        "vhost_backend_init", "vhost_set_owner", "vhost_get_features"]
