"""The VhostOps table view, drawn from the front-end layer's table."""
from __future__ import annotations

import html
import re

from vhostlab.frontend.optable import VHOST_OPS_TABLE
from vhostlab.viz import VhostOpsTableView


def _rows(page: str) -> dict[str, str]:
    """op name -> the text of its table row."""
    out = {}
    for tr in re.findall(r"<tr[^>]*>(.*?)</tr>", page, flags=re.S):
        text = html.unescape(re.sub(r"<[^>]+>", " ", tr))
        words = text.split()
        if words and words[0].startswith("vhost_"):
            out[words[0]] = text
    return out


def test_every_op_with_its_message_and_ioctl():
    page = VhostOpsTableView().to_html()
    rows = _rows(page)
    assert list(rows) == [op.name for op in VHOST_OPS_TABLE]
    assert len(rows) == 35
    for op in VHOST_OPS_TABLE:
        text = rows[op.name]
        for message in op.messages if op.user and not op.local else ():
            assert message in text, (op.name, message)
        if op.kernel_ioctl:
            assert op.kernel_ioctl in text
        assert ("user_ops leaves it NULL" in text) == (not op.user)
        assert ("kernel_ops leaves it NULL" in text) == (not op.kernel)
        assert ("uses it" in text) == op.migration
    nmig = sum(op.migration for op in VHOST_OPS_TABLE)
    assert page.count("<tr class='mig'>") == nmig
    assert f"{nmig} used by live migration" in page


def test_call_counts_are_read_from_the_device_each_render():
    device = {"ops_called": ["vhost_set_owner"]}
    view = VhostOpsTableView(device=device, only_migration=False)
    rows = _rows(view.to_html())
    assert rows["vhost_set_owner"].split()[-1] == "1"
    device["ops_called"] += ["vhost_set_log_base", "vhost_set_log_base"]
    rows = _rows(view.to_html())
    assert rows["vhost_set_log_base"].split()[-1] == "2"
    assert rows["vhost_get_vring_base"].split()[-1] == "0"


def test_only_migration_keeps_the_migration_ops():
    rows = _rows(VhostOpsTableView(only_migration=True).to_html())
    assert set(rows) == {op.name for op in VHOST_OPS_TABLE if op.migration}
    assert {"vhost_set_log_base", "vhost_set_features", "vhost_get_vring_base"} <= set(rows)


def test_coverage_column_comes_from_the_stepper_data():
    from vhostlab.qemu.stepper import NOT_CALLABLE_HERE, coverage_column
    from vhostlab.viz.opstable import COVERAGE_HEADER
    column = coverage_column()
    page = VhostOpsTableView(coverage=column).to_html()
    assert COVERAGE_HEADER in page
    rows = _rows(page)
    assert len(rows) == 35
    for op in VHOST_OPS_TABLE:
        text = " ".join(rows[op.name].split())
        assert " ".join(column[op.name].split()) in text, op.name
    for op in ("vhost_net_set_mtu", "vhost_set_vring_enable", "vhost_get_vring_base",
               "vhost_set_log_base", "vhost_migration_done"):
        assert rows[op].split(COVERAGE_HEADER)[-1].count("yes") >= 1, op
        assert column[op].startswith("yes")
    assert "yes: migrate" in column["vhost_migration_done"]
    scsi = "vhost_scsi_set_endpoint"
    assert column[scsi] == "no: " + NOT_CALLABLE_HERE[scsi]
    called = sum(column[op.name].startswith("yes") for op in VHOST_OPS_TABLE)
    assert f"{called} called by real QEMU here" in page
    # ops newer than the seed's list are named under the table, not lost
    assert "newer than the seed's list" in page and "vhost_set_vring_err" in page


def test_no_coverage_no_column():
    from vhostlab.viz.opstable import COVERAGE_HEADER
    assert COVERAGE_HEADER not in VhostOpsTableView().to_html()
    page = VhostOpsTableView(coverage={"vhost_set_owner": "yes: start QEMU"}).to_html()
    rows = _rows(page)
    assert "not recorded" in rows["vhost_get_vring_base"]
    assert "yes: start QEMU" in " ".join(rows["vhost_set_owner"].split())
