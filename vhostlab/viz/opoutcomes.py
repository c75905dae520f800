"""What each VhostOps call did in lab 08: the messages it sent, its local answer, or why not.

Rows come from ``vhostlab.labkit.OpReference.rows()``: one dict per op
(``op``, ``kind``, ``detail``), in the seed's order.
"""
from __future__ import annotations

import html
from typing import Iterable, Mapping

__all__ = ["op_outcomes_html"]


def op_outcomes_html(rows: Iterable[Mapping[str, str]]) -> str:
    """A table of ``rows``: the op, what it did, and the detail (messages, ioctl, feature)."""
    body = "".join(f"<tr><td><code>{html.escape(r['op'])}</code></td><td>"
                   f"{html.escape(r['kind'])}</td><td>{html.escape(r['detail'])}</td></tr>"
                   for r in rows)
    return ("<table><thead><tr><th>op</th><th>what it did</th><th>detail</th></tr>"
            f"</thead><tbody>{body}</tbody></table>")
