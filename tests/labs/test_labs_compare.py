"""vhostlab's back-end and DPDK's, driven the same way: what must agree agrees."""
from __future__ import annotations

from vhostlab.labkit import child_processes, compare_backends
from vhostlab.protocol import Feature, ProtocolFeature


def test_the_two_back_ends_agree_on_the_protocol(requires_dpdk):
    c = compare_backends(frames=16)
    ours, dpdk = c["vhostlab"], c["dpdk"]
    assert ours.error is None and dpdk.error is None, (ours.error, dpdk.error)
    for a in (ours, dpdk):
        # both can migrate: dirty logging and its shared-memory log
        assert a.features & Feature.VHOST_F_LOG_ALL
        assert a.protocol_features & ProtocolFeature.LOG_SHMFD
        assert a.frames_intact == a.frames_back == a.frames_sent == 16
        assert a.vring_bases == {0: 16, 1: 16}      # 16 RX buffers used, 16 TX chains taken
    # the same frames into the same buffers: the same pages logged, page for page
    assert ours.pages_logged == dpdk.pages_logged and len(ours.pages_logged) > 0
    # where they differ is each implementation's choice, and the table says so
    assert "features offered" in c.differences() and "GET_VRING_BASE" not in c.differences()
    assert "<table" in c._repr_html_() and "dpdk" in c._repr_html_()
    assert child_processes() == []                  # testpmd stopped before it returned


def test_without_testpmd_the_dpdk_column_says_why(monkeypatch):
    from vhostlab.backend import dpdk
    monkeypatch.setattr(dpdk, "find_testpmd", lambda: None)
    c = compare_backends(frames=4)
    assert c["vhostlab"].frames_intact == 4
    assert c["dpdk"].error == "no dpdk-testpmd here"
    assert "no dpdk-testpmd here" in str(c)
