"""What QEMU sends when it stops a vhost-user device, release by release.

Theory of operation. The seed document's ``vhost_dev_stop()`` (hw/virtio/
vhost.c, QEMU of about 2020) stops each ring with ``vhost_virtqueue_stop()``
-> ``vhost_get_vring_base()`` (GET_VRING_BASE) and then calls
``vhost_log_put(dev, true)``. Two later QEMU changes put a device reset
beside it when the back-end offers protocol feature STATUS:

* QEMU 7.2 ("vhost-user: Support vhost_dev_start") gave vhost-user a
  ``vhost_dev_start`` op. ``vhost_dev_stop()`` calls it with ``false`` first,
  which ``vhost_user_dev_start()`` turns into SET_STATUS 0 (a device reset),
  so the rings are reset *before* GET_VRING_BASE asks where they stopped.
* QEMU 8.1 ("vhost-user: send SET_STATUS 0 after GET_VRING_BASE") made
  ``vhost_user_dev_start(dev, false)`` a no-op and added a ``vhost_reset_status``
  op, which ``vhost_dev_stop()`` calls after the ring loop
  (``vhost_user_reset_status()`` -> SET_STATUS 0): the back-end first reports
  ``last_avail_idx``, then is reset, so the reset cannot destroy the ring
  state QEMU is about to save.

A learner's trace shows one of the three; :func:`explain_stop` says which,
what the seed expected, and which QEMU change made the difference. The
kit's built-in front-end follows the seed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from vhostlab.protocol import TO_BACKEND

__all__ = ["StopSequence", "explain_stop", "expected_stop_variant", "STOP_VARIANTS"]

#: variant -> (the messages in order, what QEMU does, the change that made it so)
STOP_VARIANTS = {
    "seed": (("GET_VRING_BASE", "..."),
             "vhost_dev_stop() stops each ring (GET_VRING_BASE) and nothing else is sent",
             "the seed's vhost_dev_stop (QEMU before 7.2, or a back-end without "
             "protocol feature STATUS)"),
    "status-first": (("SET_STATUS 0", "GET_VRING_BASE", "..."),
                     "vhost_dev_stop() resets the device (vhost_user_dev_start(dev, false) "
                     "-> SET_STATUS 0) before it stops the rings",
                     "QEMU 7.2, \"vhost-user: Support vhost_dev_start\""),
    "status-last": (("GET_VRING_BASE", "...", "SET_STATUS 0"),
                    "vhost_dev_stop() stops the rings first, then resets the device with "
                    "the vhost_reset_status op (vhost_user_reset_status -> SET_STATUS 0)",
                    "QEMU 8.1, \"vhost-user: send SET_STATUS 0 after GET_VRING_BASE\""),
}


@dataclass(frozen=True)
class StopSequence:
    """One stop as QEMU sent it, beside the seed's."""

    observed: tuple[str, ...]    # the requests of the stop, e.g. ("GET_VRING_BASE", ..., "SET_STATUS 0")
    seed: tuple[str, ...]        # what the seed's vhost_dev_stop sends for as many rings
    variant: str                 # "seed", "status-first" or "status-last" (STOP_VARIANTS)
    expected: str | None         # the variant the QEMU version implies, when the version is known
    text: str                    # a short explanation that names the QEMU change

    @property
    def as_seed(self) -> bool:
        return self.variant == "seed"


def _name(item: Any) -> str | None:
    """A request name from a string, a (name, payload) pair or a back-end TraceRecord."""
    if isinstance(item, str):
        return item
    if isinstance(item, tuple):
        name, payload = item
    else:
        if getattr(item, "direction", TO_BACKEND) != TO_BACKEND:
            return None       # a reply, not a request
        name = item.request
        payload = (getattr(item, "fields", None) or {}).get("payload") or {}
    if name == "SET_STATUS" and hasattr(payload, "get") and payload.get("value") is not None:
        return f"SET_STATUS {payload['value']}"
    return name


def expected_stop_variant(qemu_version: Sequence[int] | None,
                          status_negotiated: bool = True) -> str | None:
    """The stop sequence a QEMU release sends (None when the version is unknown)."""
    if qemu_version is None:
        return None
    if not status_negotiated or tuple(qemu_version[:2]) < (7, 2):
        return "seed"
    return "status-first" if tuple(qemu_version[:2]) < (8, 1) else "status-last"


def explain_stop(requests: Iterable[Any], qemu_version: Sequence[int] | None = None) -> StopSequence:
    """Find the stop in a front-end's requests and say which QEMU sequence it is.

    ``requests`` is what the back-end received, in order: request names
    (``"SET_STATUS"`` alone cannot say which status, so pass records or
    ``(name, payload)`` pairs to tell SET_STATUS 0 apart), or the back-end's
    TraceRecords (replies are skipped). The stop is the last run of
    GET_VRING_BASE with a SET_STATUS 0 right before or after it. Raises
    ValueError when the requests hold no GET_VRING_BASE.
    """
    names = [n for n in map(_name, requests) if n is not None]
    gets = [i for i, n in enumerate(names) if n == "GET_VRING_BASE"]
    if not gets:
        raise ValueError("no GET_VRING_BASE in these requests: the device was not stopped")
    last = gets[-1]
    first = last
    while first > 0 and names[first - 1] == "GET_VRING_BASE":
        first -= 1
    reset = ("SET_STATUS 0", "SET_STATUS")
    before = first > 0 and names[first - 1] in reset
    after = last + 1 < len(names) and names[last + 1] in reset
    lo, hi = first - before, last + 1 + after
    observed = tuple(names[lo:hi])
    rings = last - first + 1
    seed = ("GET_VRING_BASE",) * rings
    variant = "status-first" if before else "status-last" if after else "seed"
    expected = expected_stop_variant(qemu_version)
    text = _explain(variant, expected, qemu_version, rings)
    return StopSequence(observed, seed, variant, expected, text)


def _explain(variant: str, expected: str | None, version: Sequence[int] | None,
             rings: int) -> str:
    _, what, change = STOP_VARIANTS[variant]
    text = f"{what}: {change}."
    if variant != "seed":
        op = "vhost_dev_start(dev, false)" if variant == "status-first" else "vhost_reset_status"
        text += (f" The seed's vhost_dev_stop sends only the {rings} GET_VRING_BASE; the "
                 f"SET_STATUS 0 comes from the {op} op, which the seed's VhostOps table "
                 "does not have.")
    if version is not None and expected is not None and expected != variant:
        v = ".".join(map(str, version))
        text += (f" QEMU {v} would be expected to send the {expected!r} sequence"
                 + (" (or the back-end did not negotiate STATUS)." if variant == "seed" else "."))
    return text
