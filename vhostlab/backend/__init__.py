"""The vhost-user-net back-end: a device QEMU and DPDK can both drive.

In a notebook (the server runs in a background thread)::

    from vhostlab.backend import BackendServer

    srv = BackendServer(wire="loopback").start()   # private socket dir, mode 0600
    srv.socket_path                                # give this to QEMU or DPDK
    snap = srv.snapshot()                          # immutable: memory, vrings, log, counters
    snap.trace[-1].fields                          # the last message, decoded
    srv.inject([frame], queue_pair=0)              # frames toward the guest's RX ring
    srv.stop()

As a process: ``vhostlab serve --socket PATH`` (``python -m vhostlab.backend.serve``).

Pieces, bottom up:

    transport   the socket: private directory, SO_PEERCRED, SCM_RIGHTS fd passing
    net_device  what is virtio-net: config space, MTU, RARP, the TX/RX service, the wire
    device      the device state (libvhost-user's VuDev / VuVirtq), one RingState per ring
    handlers    one handler per request id, one signature, one dispatch table
    rings       vhost-user ring messages to vhostlab.ring (through its DeviceRing seam)
    wire        where guest TX frames go: sink, loopback, pcap
    trace       every message in and out
    server      the selector loop, start/stop, snapshot, inject
    serve       the command line; bench_dpdk: DPDK's virtio-user against us and itself
"""
from vhostlab.backend.device import Counters, VhostUserNetDevice, Vring
from vhostlab.backend.errors import (BackendError, PeerCredentialsError, RequestError,
                                     SocketPathError, TransportError)
from vhostlab.backend.handlers import HANDLERS, FdBag, HandlerResult, dispatch
from vhostlab.backend.net_device import NetDevice
from vhostlab.backend.server import BackendServer
from vhostlab.backend.snapshot import DeviceSnapshot, LogSnapshot, RegionSnapshot, VringSnapshot
from vhostlab.backend.trace import MessageTrace, TraceRecord
from vhostlab.backend.transport import PeerCredentials, check_peer, listen_unix, peer_credentials
from vhostlab.backend.wire import (ETH_P_RARP, CaptureWire, LoopbackWire, PcapWire, SinkWire, Wire,
                                   is_rarp, make_wire, rarp_frame, read_pcap)
from vhostlab.protocol.connection import FAILURE_REPLIES

__all__ = [
    "BackendServer", "VhostUserNetDevice", "NetDevice", "Vring", "Counters",
    "BackendError", "PeerCredentialsError", "RequestError", "SocketPathError", "TransportError",
    "HANDLERS", "FAILURE_REPLIES", "FdBag", "HandlerResult", "dispatch",
    "DeviceSnapshot", "LogSnapshot", "RegionSnapshot", "VringSnapshot",
    "MessageTrace", "TraceRecord",
    "PeerCredentials", "check_peer", "listen_unix", "peer_credentials",
    "Wire", "SinkWire", "LoopbackWire", "PcapWire", "CaptureWire", "make_wire", "rarp_frame",
    "read_pcap", "is_rarp", "ETH_P_RARP",
]
