"""The vhost-user-net back-end: a device QEMU and DPDK can both drive.

    BackendServer(socket_path, ...)   the server: start()/stop() in a thread, or run()
    VhostUserNetDevice                the device state (features, memory, log, vrings)
    handlers.HANDLERS                 one handler per request id, one signature
    MessageTrace / TraceRecord        every message in and out
    SinkWire, LoopbackWire, PcapWire  where guest TX frames go

`python -m vhostlab.backend.serve --socket PATH` runs it as a process.
"""
from vhostlab.backend.device import Counters, VhostUserNetDevice, Vring
from vhostlab.backend.errors import (BackendError, PeerCredentialsError, RequestError,
                                     SocketPathError, TransportError)
from vhostlab.backend.handlers import HANDLERS, FdBag, Outcome, dispatch
from vhostlab.backend.server import BackendServer
from vhostlab.backend.snapshot import DeviceSnapshot, LogSnapshot, RegionSnapshot, VringSnapshot
from vhostlab.backend.trace import MessageTrace, TraceRecord
from vhostlab.backend.transport import PeerCredentials, check_peer, listen_unix, peer_credentials
from vhostlab.backend.wire import (LoopbackWire, PcapWire, SinkWire, Wire, make_wire,
                                   rarp_frame, read_pcap)

__all__ = [
    "BackendServer", "VhostUserNetDevice", "Vring", "Counters",
    "BackendError", "PeerCredentialsError", "RequestError", "SocketPathError", "TransportError",
    "HANDLERS", "FdBag", "Outcome", "dispatch",
    "DeviceSnapshot", "LogSnapshot", "RegionSnapshot", "VringSnapshot",
    "MessageTrace", "TraceRecord",
    "PeerCredentials", "check_peer", "listen_unix", "peer_credentials",
    "Wire", "SinkWire", "LoopbackWire", "PcapWire", "make_wire", "rarp_frame",
    "read_pcap",
]
