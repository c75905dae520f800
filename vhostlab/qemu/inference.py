"""Which VhostOps entry, and which vhost.c functions, sent each message of a real QEMU.

QEMU never says which function sent a vhost-user message; this module reads
it from where the message sits in a back-end's trace. :func:`attribute_ops`
names each request's VhostOps entry (hw/virtio/vhost-user.c ``user_ops``);
:func:`infer_calls` adds the vhost.c calls around it (hw/virtio/vhost.c's
calling sequences), as timeline entries a ``CallTimelineView`` draws. The
readings are held against the traces of real QEMU 5.2, 7.2 and 10.0 by the
stepper's tests; for other releases they are a best guess.
"""
from __future__ import annotations

from typing import Any, Iterable, Sequence

from vhostlab.backend import TraceRecord
from vhostlab.protocol import TO_BACKEND

from .host import MESSAGE_OPS

__all__ = ["attribute_ops", "infer_calls"]


# -- which op sent each message ----------------------------------------------------------
_STATUS = ("GET_STATUS", "SET_STATUS")


def _status_value(rec: Any) -> int | None:
    payload = (getattr(rec, "fields", None) or {}).get("payload") or {}
    return payload.get("value") if hasattr(payload, "get") else None


def attribute_ops(records: Iterable[TraceRecord]) -> list[tuple[TraceRecord, str]]:
    """Each front-end request of one back-end's trace with the VhostOps entry that sent it.

    Read by hw/virtio/vhost-user.c ``user_ops`` (``MESSAGE_OPS``): requests before
    SET_OWNER on a connection belong to ``vhost_backend_init``; GET/SET_STATUS
    right after SET_FEATURES to ``vhost_set_features``; SET_STATUS 0 next to
    GET_VRING_BASE to ``vhost_dev_start`` (7.2: ``vhost_dev_start(dev, false)``,
    before the rings stop) or ``vhost_reset_status`` (8.1 and later, after).
    Pass the whole trace: what came before a step decides some of its ops.
    """
    ins = [r for r in records if r.direction == TO_BACKEND and not r.error]
    owned: set[int] = set()
    out: list[tuple[TraceRecord, str]] = []
    prev_op = None
    for i, rec in enumerate(ins):
        req = rec.request
        if req == "SET_OWNER":
            owned.add(rec.connection)
        nxt = ins[i + 1].request if i + 1 < len(ins) else None
        prev = ins[i - 1].request if i else None
        if rec.connection not in owned and (req == "GET_FEATURES"
                                            or MESSAGE_OPS.get(req) == "vhost_backend_init"):
            op = "vhost_backend_init"
        elif req in _STATUS and prev_op == "vhost_set_features":
            op = "vhost_set_features"
        elif req == "SET_STATUS" and _status_value(rec) == 0 and prev == "GET_VRING_BASE":
            op = "vhost_reset_status"
        elif req == "SET_STATUS" and _status_value(rec) == 0 and nxt == "GET_VRING_BASE":
            op = "vhost_dev_start"
        else:
            op = MESSAGE_OPS.get(req, f"({req})")
        prev_op = op
        out.append((rec, op))
    return out


# -- which vhost.c functions sent them ------------------------------------------------------
_LOG_ON = ("vhost_log_global_start", "vhost_migration_log", "vhost_dev_set_log")
_LOG_OFF = ("vhost_log_global_stop", "vhost_migration_log", "vhost_dev_set_log")
_STOP = ("vhost_net_stop", "vhost_dev_stop")
_RING_START = ("SET_VRING_NUM", "SET_VRING_BASE", "SET_VRING_ADDR", "SET_VRING_KICK",
               "SET_VRING_CALL")
_F_LOG_ALL = 1 << 26


def _value(rec: Any) -> int:
    payload = (getattr(rec, "fields", None) or {}).get("payload") or {}
    return int(payload.get("value", 0) or 0) if hasattr(payload, "get") else 0


def _start_spans(ins: list) -> set[int]:
    """Indices of requests sent by one vhost_net_start (SET_FEATURES .. the last ring)."""
    inside: set[int] = set()
    names = [r.request for r in ins]
    for i, n in enumerate(names):
        if n != "SET_FEATURES":
            continue
        j = i + 1
        while j < len(names) and names[j] not in ("SET_VRING_NUM", "GET_VRING_BASE",
                                                   "SET_LOG_BASE", "SET_FEATURES"):
            j += 1
        if j == len(names) or names[j] != "SET_VRING_NUM":
            continue                       # a logging toggle, not a start
        lo = i
        while lo > 0 and names[lo - 1] in ("SET_VRING_ENABLE", "NET_SET_MTU"):
            lo -= 1                        # 7.2+: enable (and the MTU) come first
        while j < len(names) and names[j] in (*_RING_START, "SET_VRING_ENABLE",
                                              "GET_STATUS", "SET_STATUS"):
            if names[j] == "SET_STATUS" and _value(ins[j]) == 0:
                break
            j += 1
        inside.update(range(lo, j))
    return inside


def infer_calls(records: Sequence[TraceRecord]) -> list[dict]:
    """Timeline entries (as ``CallTimelineView`` draws them) for one back-end's whole trace.

    Each request's VhostOps entry comes from :func:`attribute_ops`; the vhost.c
    functions around it from where it sits: inside a start (SET_FEATURES up to
    the last ring: ``vhost_net_start`` -> ``vhost_dev_start``), beside
    GET_VRING_BASE (``vhost_net_stop`` -> ``vhost_dev_stop``), a SET_FEATURES
    that turns VHOST_F_LOG_ALL on or off with its SET_VRING_ADDRs
    (``vhost_log_global_start`` / ``_stop``), before SET_OWNER
    (``vhost_dev_init``). QEMU never says; this is a reading.
    """
    pairs = attribute_ops(records)
    ins = [r for r, _op in pairs]
    starts = _start_spans(ins)
    owned: set[int] = set()
    log = _LOG_ON
    paths: dict[int, tuple] = {}
    for i, (rec, op) in enumerate(pairs):
        req = rec.request
        if req == "SET_OWNER":
            owned.add(rec.connection)
        if op == "vhost_backend_init" or (rec.connection not in owned) or \
                (i and paths.get(ins[i - 1].seq, ("",))[0] == "vhost_dev_init"
                 and req in ("GET_FEATURES", "SET_VRING_CALL", "SET_VRING_ERR")):
            path = ("vhost_dev_init", op)
        elif req == "NET_SET_MTU":
            path = ("virtio_net_vhost_status", op)
        elif i in starts:
            if req == "SET_VRING_ENABLE":
                path = ("vhost_net_start", op)
            elif op == "vhost_set_features":
                path = ("vhost_net_start", "vhost_dev_start", "vhost_dev_set_features", op)
            elif req in _RING_START:
                path = ("vhost_net_start", "vhost_dev_start", "vhost_virtqueue_start", op)
            else:
                path = ("vhost_net_start", "vhost_dev_start", op)
        elif req == "GET_VRING_BASE":
            path = (*_STOP, "vhost_virtqueue_stop", op)
        elif op in ("vhost_reset_status", "vhost_dev_start") and _value(rec) == 0:
            path = (*_STOP, op)
        elif req == "SET_LOG_BASE":
            path = (*_LOG_ON, "vhost_dev_log_resize", op)
        elif op == "vhost_set_features":
            log = _LOG_ON if req != "SET_FEATURES" and log == _LOG_ON or \
                req == "SET_FEATURES" and _value(rec) & _F_LOG_ALL else _LOG_OFF
            path = (*log, "vhost_dev_set_features", op)
        elif req == "SET_VRING_ADDR":
            path = (*log, "vhost_virtqueue_set_addr", op)
        elif req == "SEND_RARP":
            path = ("vhost_net_notify_migration_done", op)
        else:
            path = (op,)
        paths[rec.seq] = path
    out: list[dict] = []
    open_path: tuple = ()
    last_depth = 0
    for rec in records:
        if rec.direction != TO_BACKEND or rec.seq not in paths:
            out.append({"kind": "message", "name": rec.request, "depth": last_depth,
                        "record": rec})
            continue
        path = paths[rec.seq]
        common = 0
        while common < min(len(path), len(open_path)) and path[common] == open_path[common]:
            common += 1
        out += [{"kind": "call", "name": n, "depth": d}
                for d, n in enumerate(path) if d >= common]
        open_path, last_depth = path, len(path)
        out.append({"kind": "message", "name": rec.request, "depth": len(path), "record": rec})
    return out
