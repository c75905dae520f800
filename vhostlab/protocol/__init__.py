"""The vhost-user wire protocol, sans-IO: bytes and fds in, messages out.

    parse_message(data, fds) -> Message       one complete message
    Message.make(...) / .to_bytes()           build and serialise
    BackendConnection / FrontendConnection    framing and reply rules
    Request, Feature, ProtocolFeature         names from the spec

Nothing here opens a socket or closes an fd.
"""
from .connection import BackendConnection, FrontendConnection
from .constants import (FLAG_NEED_REPLY, FLAG_REPLY, HEADER_SIZE, KNOWN_FLAGS,
                        LIBVHOST_USER_MAX_RAM_SLOTS, MAX_AREA_SIZE, MAX_PAYLOAD_SIZE,
                        QEMU_VHOST_USER_MAX_RAM_SLOTS, REPLY_FLAGS,
                        VERSION_MASK, VHOST_LOG_PAGE,
                        VHOST_MEMORY_BASELINE_NREGIONS,
                        VHOST_USER_MAX_CONFIG_SIZE, VHOST_USER_MAX_FDS,
                        VHOST_USER_VERSION, VHOST_VRING_F_LOG,
                        VRING_IDX_MASK, VRING_NOFD_MASK)
from .errors import ProtocolError
from .features import (FEATURE_MEANING, PROTOCOL_FEATURE_MEANING, Feature,
                       ProtocolFeature, describe, describe_mask, feature_names)
from .message import (Header, Message, parse_backend_message, parse_message,
                      peek_header)
from .payloads import (ConfigSpace, CryptoSession, InflightArea, IotlbMsg,
                       LogArea, MemoryRegion, MemoryTable, Payload,
                       SharedObject, SingleMemoryRegion, TransferDeviceState,
                       U64, VringAddr, VringArea, VringState, VHOST_IOTLB_ACCESS_FAIL,
                       VHOST_IOTLB_INVALIDATE, VHOST_IOTLB_MISS,
                       VHOST_IOTLB_UPDATE)
from .lines import TO_BACKEND, TO_FRONTEND, format_message, format_record
from .requests import (BACKEND_REQUESTS, REQUESTS, BackendRequest, FdRule,
                       ReplyKind, Request, RequestSpec, expected_fds, spec_of)

__all__ = [
    # connections
    "BackendConnection", "FrontendConnection",
    # constants
    "FLAG_NEED_REPLY", "FLAG_REPLY", "HEADER_SIZE", "KNOWN_FLAGS", "MAX_AREA_SIZE",
    "MAX_PAYLOAD_SIZE", "REPLY_FLAGS", "VERSION_MASK", "VHOST_LOG_PAGE",
    "VHOST_MEMORY_BASELINE_NREGIONS", "VHOST_USER_MAX_CONFIG_SIZE",
    "VHOST_USER_MAX_FDS", "VHOST_USER_VERSION", "VHOST_VRING_F_LOG",
    "VRING_IDX_MASK", "VRING_NOFD_MASK", "QEMU_VHOST_USER_MAX_RAM_SLOTS",
    "LIBVHOST_USER_MAX_RAM_SLOTS",
    # errors
    "ProtocolError",
    # features
    "FEATURE_MEANING", "PROTOCOL_FEATURE_MEANING", "Feature",
    "ProtocolFeature", "describe", "describe_mask", "feature_names",
    # messages
    "Header", "Message", "parse_backend_message", "parse_message",
    "peek_header",
    # payloads
    "ConfigSpace", "CryptoSession", "InflightArea", "IotlbMsg", "LogArea",
    "MemoryRegion", "MemoryTable", "Payload", "SharedObject",
    "SingleMemoryRegion", "TransferDeviceState", "U64", "VringAddr", "VringArea",
    "VringState",
    "VHOST_IOTLB_ACCESS_FAIL", "VHOST_IOTLB_INVALIDATE", "VHOST_IOTLB_MISS",
    "VHOST_IOTLB_UPDATE",
    # directions and message lines
    "TO_BACKEND", "TO_FRONTEND", "format_message", "format_record",
    # the request table
    "BACKEND_REQUESTS", "REQUESTS", "BackendRequest", "FdRule", "ReplyKind",
    "Request", "RequestSpec", "expected_fds", "spec_of",
]
