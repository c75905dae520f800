"""``vhostlab demo --frontend builtin``: the seed's three migration steps, with the real messages.

The narration quotes the seed's calling sequences as they happen and prints,
under each vhost.c function the built-in front-end enters, the vhost-user
messages it sent ("->") and the replies it got ("<-"), decoded by the
protocol layer from the bytes that crossed the socket. With packed rings it
decodes GET_VRING_BASE's ``num``: the positions with their wrap counters.
"""
from __future__ import annotations

from typing import Callable

from vhostlab.protocol import format_record
from vhostlab.ring.packed_layout import parse_packed_vring_base

from .guest import GuestDriverError
from .migration import BuiltinMigration
from .vhost_dev import VhostDev

__all__ = ["run_demo", "format_timeline", "format_vring_base", "SEED_STEPS"]

EXIT_OK, EXIT_SETUP, EXIT_CORRUPTED = 0, 2, 3

# The seed document's own words for the three steps (section 2, "Live migration").
SEED_STEPS = (
    ("At first, QEMU needs to specify memory address for vhost backend to write "
     "dirty page bitmap.", "vhost_dev_start()->vhost_set_log_base()"),
    ("And then, QEMU needs to notify vhost backend to start writing dirty page bitmap.",
     "vhost_log_global_start()->vhost_migration_log()->vhost_dev_set_log()"
     "->vhost_dev_set_features()->vhost_set_features()"),
    ("At last, QEMU needs to stop vhost backend and synchronize dirty page memory.",
     "vhost_dev_stop()->vhost_virtqueue_stop()->vhost_get_vring_base()"),
)


def format_timeline(dev: VhostDev, start: int = 0, base_depth: int = 0) -> tuple[list[str], int]:
    """Lines for the timeline entries from ``start`` on; returns them and the next index."""
    lines = []
    for entry in dev.timeline[start:]:
        pad = "    " + "  " * max(0, entry.depth - base_depth)
        if entry.kind == "call":
            lines.append(f"{pad}{entry.name}()")
        elif entry.kind == "op":
            lines.append(f"{pad}{entry.name}()   [VhostOps]")
        elif entry.kind == "message":
            lines.append(f"{pad}{format_record(entry.record)}")
        else:
            lines.append(f"{pad}[{entry.name}]")
    return lines, len(dev.timeline)


def format_vring_base(num: int, packed: bool) -> str:
    """GET_VRING_BASE's ``num`` as a learner should read it: for a split ring
    last_avail_idx; for a packed ring its four parts (packed_layout)."""
    if not packed:
        return f"num={num}: last_avail_idx={num}"
    text = f"num={num:#x}: {parse_packed_vring_base(num)}"
    if not num >> 16:
        # DPDK 22.11 (vhost_user_get_vring_base) fills only bits 0-15
        text += " (bits 16-31 empty: the back-end resumes used where avail is)"
    return text


class _BuiltinNarrator:
    def __init__(self, out: Callable[[str], None]):
        self.out = out
        self.pos: dict[int, int] = {}

    def say(self, text: str = "") -> None:
        self.out(text)

    def show(self, who: str, dev: VhostDev) -> None:
        lines, self.pos[id(dev)] = format_timeline(dev, self.pos.get(id(dev), 0))
        if lines:
            self.out(f"  [{who}]")
            for line in lines:
                self.out(line)


def _narrate_start(m: BuiltinMigration, n: _BuiltinNarrator) -> None:
    n.say("The seed: \"vhost backend needs to provide below ops\" (VhostOps, 35 of them) and")
    n.say("\"Live migration needs to use some of these ops.\" Here they run for real: two")
    if m.echo:
        n.say("DPDK vhost back-ends (dpdk-testpmd, net_vhost0, forwarding every frame the")
        n.say("guest sends back to it), each on its own unix socket, and this kit's Python")
    else:
        n.say("vhost-user-net back-ends, each on its own unix socket, and this kit's Python")
    n.say("front-end in QEMU's place, with memfd guest RAM and eventfds.\n")
    if m.ring == "packed":
        n.say("The guest's virtqueues are packed (VIRTIO_F_RING_PACKED): one descriptor ring")
        n.say("per queue, whose AVAIL/USED flags and wrap counters replace the split ring's")
        n.say("avail and used indices. So GET_VRING_BASE must carry the wrap counters too.\n")
    m.start_backends()
    m.start_source()
    n.say("Source QEMU starts the device (vhost_dev_init, then vhost_net_start at DRIVER_OK):")
    n.show("source", m.src.dev)
    m.warm_up()
    m.start_destination()
    n.say("\nDestination QEMU (started with -incoming) connects to its back-end and waits:")
    n.show("destination", m.dst.dev)


def _narrate_logging_and_rounds(m: BuiltinMigration, n: _BuiltinNarrator) -> None:
    for i, (why, seq) in enumerate(SEED_STEPS[:2], 1):
        n.say(f"\nSeed step {i}: \"{why}\"\n  Calling sequence: {seq}")
    n.say("  The device is already running, so QEMU sends SET_LOG_BASE from")
    n.say("  vhost_migration_log() -> vhost_dev_log_resize() (vhost_dev_start() sends it only")
    n.say("  when logging is already on as a device starts), then step 2:")
    m.begin()
    n.show("source", m.src.dev)
    n.say("\nRAM is copied in rounds; frames flow both ways after each copy, so the back-end")
    n.say("writes RX frames into pages already copied. Only the vhost log can tell QEMU so.")
    for _ in range(m.rounds):
        snap = m.live_round()
        n.show("source", m.src.dev)
        n.say(f"  round {snap.round}: copied {snap.pages_copied} pages (guest wrote "
              f"{snap.pages_dirtied_by_guest}, vhost log said {snap.pages_from_vhost_log}); "
              f"then {snap.rx_frames_after_copy} RX and {snap.tx_frames_after_copy} TX frames")


def _narrate_stop_and_switch(m: BuiltinMigration, n: _BuiltinNarrator) -> None:
    why, seq = SEED_STEPS[2]
    n.say(f"\nSeed step 3: \"{why}\"\n  Calling sequence: {seq}")
    n.say("  \"And when backend is stopped, vhost_log_put() is used to synchronize dirty page"
          " memory.\"")
    bases = m.stop_source()
    n.show("source", m.src.dev)
    if m.ring == "packed":
        for index, num in sorted(bases.items()):
            n.say(f"  queue {index}: GET_VRING_BASE {format_vring_base(num, True)}")
    else:
        n.say(f"  the back-end stopped at last_avail_idx {bases} (queue: index)")
    snap = m.final_round()
    n.say(f"  stop-and-copy round {snap.round}: {snap.pages_copied} pages (guest "
          f"{snap.pages_dirtied_by_guest}, vhost log {snap.pages_from_vhost_log}); RAM pages "
          f"differing after the copy: {m.pages_mismatched.size}")
    n.say("\nThe destination starts its device with the source's ring positions "
          "(SET_VRING_BASE), enables the rings and announces the guest (SEND_RARP):")
    m.start_destination_device()
    n.show("destination", m.dst.dev)
    m.resume()
    m.check_wires()


def run_demo(as_json: bool = False, break_logging: bool = False,
             out: Callable[[str], None] = print, backend: str = "vhostlab",
             ring: str = "split") -> tuple[dict, int]:
    """Run the built-in migration, narrating through ``out``; return (summary, exit code).

    Exit code 0 when every frame arrived intact and the RAMs matched, 3 when
    not (``break_logging`` must produce 3: the back-ends skip dirty logging).
    With ``as_json`` the narration is shorter (the caller prints the summary).
    ``backend="dpdk"``: the two back-ends are DPDK's (testpmd), see BuiltinMigration.
    ``ring="packed"``: packed virtqueues; exit code 2 when the back-end does
    not offer them.
    """
    m = BuiltinMigration(break_logging=break_logging, backend=backend, ring=ring)
    narrator = _BuiltinNarrator(out if not as_json else (lambda text: None))
    try:
        _narrate_start(m, narrator)
        _narrate_logging_and_rounds(m, narrator)
        _narrate_stop_and_switch(m, narrator)
        summary = m.summary()
    except GuestDriverError as exc:
        if m.guest is not None and m.guest.guest_features:
            raise               # not the negotiation: a driver fault to see whole
        out(f"{backend} back-end: {exc}")
        return {"frontend": "builtin", "backend": backend, "ring": ring,
                "error": str(exc)}, EXIT_SETUP
    finally:
        m.close()
    code = EXIT_OK if summary["integrity"] == "ok" else EXIT_CORRUPTED
    _report(summary, out)
    return summary, code


def _report(summary: dict, out: Callable[[str], None]) -> None:
    f, mig, log = summary["frames"], summary["migration"], summary["vhost_log"]
    out("")
    broken = (" (the source front-end ignored DPDK's log)" if summary["backend"] == "dpdk"
              else " (back-ends told to skip dirty logging)")
    out(f"migration {mig['status']} in {mig['rounds']} rounds, downtime "
        f"{summary['downtime_ms']:.1f} ms of {summary['total_time_ms']:.0f} ms; vhost log: "
        f"{log['pages_logged']} pages in {log['syncs']} syncs"
        + (broken if summary["break_logging"] else ""))
    out(f"frames: sent {f['sent']}, delivered {f['delivered']}, lost {f['lost']}, "
        f"corrupted {f['corrupted']}, duplicated {f['duplicated']}; RAM pages differing at "
        f"switch-over: {mig['pages_mismatched']}")
    out(f"integrity: {summary['integrity']}")
