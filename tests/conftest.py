"""Shared fixtures.

Tests that need a real QEMU or DPDK ask for the ``requires_qemu`` or
``requires_dpdk`` fixture. On a laptop without them the test skips with a
reason; in CI, where ``.ci/run`` sets VHOSTLAB_REQUIRE_QEMU=1 and
VHOSTLAB_REQUIRE_DPDK=1, a missing peer is a failure, not a skip.
"""
from __future__ import annotations

import os
import shutil

import pytest


def _require(tool_env: str, binary: str, install: str) -> str:
    path = os.environ.get(tool_env.replace("REQUIRE_", "")) or shutil.which(binary)
    if path:
        return path
    reason = f"{binary} not found (install: {install})"
    if os.environ.get(tool_env) == "1":
        pytest.fail(f"{tool_env}=1 but {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture
def requires_qemu() -> str:
    """Path of qemu-system-x86_64 (VHOSTLAB_QEMU overrides PATH)."""
    return _require("VHOSTLAB_REQUIRE_QEMU", "qemu-system-x86_64",
                    "apt-get install qemu-system-x86")


@pytest.fixture
def datagram_netdev(requires_qemu):
    """The loopback UDP netdev this QEMU has: ``dgram`` (QEMU >= 7.2), else ``socket``."""
    from vhostlab.qemu import dgram_netdev, find_qemu, udp_socket_netdev
    return dgram_netdev if "dgram" in find_qemu(requires_qemu).netdevs else udp_socket_netdev


@pytest.fixture
def requires_dpdk() -> str:
    """Path of dpdk-testpmd (VHOSTLAB_DPDK overrides PATH)."""
    return _require("VHOSTLAB_REQUIRE_DPDK", "dpdk-testpmd",
                    "apt-get install dpdk dpdk-dev")


def pytest_collection_modifyitems(config, items):
    """Mark every test that asks for a real QEMU with ``qemu``.

    ``.ci/run`` runs ``-m qemu`` a second time against another QEMU release;
    the marker must therefore cover each test that drives QEMU, whether it
    declares ``pytestmark`` or only asks for the fixture.
    """
    for item in items:
        if "requires_qemu" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.qemu)
