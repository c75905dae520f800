"""What QEMU's virtio-net is plugged into: the ``-netdev`` arguments, as data.

A :class:`NetdevSpec` holds the arguments that create one netdev and the
virtio-net-pci properties it needs. :func:`vhost_user_netdev` plugs the NIC
into a vhost-user back-end (the lab's real use); :func:`dgram_netdev` and
:func:`udp_socket_netdev` into UDP on loopback (QEMU's own datapath, to
compare with). The lab never sends frames off this machine.
"""
from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass

__all__ = ["NetdevSpec", "vhost_user_netdev", "dgram_netdev", "udp_socket_netdev", "escape_option"]


@dataclass(frozen=True)
class NetdevSpec:
    """The QEMU arguments that create netdev ``netdev_id``, plus virtio-net-pci properties it needs.

    ``listen_address`` is where QEMU receives datagrams for the guest (UDP
    netdevs only).
    """

    args: tuple[str, ...]
    netdev_id: str = "net0"
    device_props: tuple[str, ...] = ()
    description: str = ""
    listen_address: tuple[str, int] | None = None


def escape_option(value: str) -> str:
    # QEMU option syntax: a comma inside a value is written twice.
    return value.replace(",", ",,")


def vhost_user_netdev(socket_path: str, *, reconnect: int | None = None,
                      queues: int | None = None, netdev_id: str = "net0",
                      chardev_id: str = "chr0", host_mtu: int | None = None) -> NetdevSpec:
    """A vhost-user netdev: QEMU connects as client to the back-end listening at ``socket_path``.

    ``host_mtu`` sets the virtio-net-pci property of that name: the device then
    offers VIRTIO_NET_F_MTU, and a guest that acks it makes QEMU send
    NET_SET_MTU (``vhost_net_set_mtu``) before it starts the back-end.
    """
    chardev = f"socket,id={chardev_id},path={escape_option(socket_path)}"
    if reconnect is not None:
        chardev += f",reconnect={int(reconnect)}"
    netdev = f"vhost-user,id={netdev_id},chardev={chardev_id},vhostforce=on"
    props: tuple[str, ...] = ()
    if queues is not None:
        if not 1 <= queues <= 128:
            raise ValueError(f"queues={queues} outside 1..128")
        netdev += f",queues={queues}"
        if queues > 1:
            props = ("mq=on", f"vectors={2 * queues + 2}")
    if host_mtu is not None:
        if not 68 <= host_mtu <= 65535:
            raise ValueError(f"host_mtu={host_mtu} outside 68..65535")
        props += (f"host_mtu={int(host_mtu)}",)
    return NetdevSpec(("-chardev", chardev, "-netdev", netdev), netdev_id, props,
                      f"vhost-user back-end at {socket_path}")


def _loopback(host: str) -> str:
    if not ipaddress.ip_address(host).is_loopback:
        raise ValueError(f"host {host!r} is not a loopback address; the lab never "
                         "sends frames off this machine")
    return host


def _free_udp_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def dgram_netdev(remote_port: int, local_port: int | None = None, *,
                 host: str = "127.0.0.1", netdev_id: str = "net0") -> NetdevSpec:
    """``-netdev dgram`` on loopback (QEMU >= 7.2).

    QEMU binds ``host:local_port`` (a free port when None) and sends every
    frame the guest transmits, as one datagram, to ``host:remote_port``;
    datagrams sent to ``local_port`` reach the guest's RX queue.
    """
    host = _loopback(host)
    local_port = local_port or _free_udp_port(host)
    netdev = (f"dgram,id={netdev_id},local.type=inet,local.host={host},"
              f"local.port={local_port},remote.type=inet,remote.host={host},"
              f"remote.port={remote_port}")
    return NetdevSpec(("-netdev", netdev), netdev_id, (),
                      f"UDP {host}:{local_port} <-> {host}:{remote_port}", (host, local_port))


def udp_socket_netdev(remote_port: int, local_port: int | None = None, *,
                      host: str = "127.0.0.1", netdev_id: str = "net0") -> NetdevSpec:
    """The older ``-netdev socket,udp=...,localaddr=...`` form of :func:`dgram_netdev`."""
    host = _loopback(host)
    local_port = local_port or _free_udp_port(host)
    netdev = f"socket,id={netdev_id},udp={host}:{remote_port},localaddr={host}:{local_port}"
    return NetdevSpec(("-netdev", netdev), netdev_id, (),
                      f"UDP {host}:{local_port} <-> {host}:{remote_port}", (host, local_port))
