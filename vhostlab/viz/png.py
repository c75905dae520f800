"""PNG encoding through matplotlib's Agg renderer, without pyplot.

The views build ``matplotlib.figure.Figure`` objects directly: no global pyplot
state, no GUI backend, safe to call from a refresh thread while a migration
runs in another. Images are embedded in HTML as data URIs so that nbconvert
HTML and GitHub's notebook preview show them without any server.
"""
from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np


def rgb_png(rgb: np.ndarray) -> bytes:
    """Encode an (H, W, 3) or (H, W, 4) uint8 array as PNG, one pixel per element."""
    from matplotlib.image import imsave

    arr = np.ascontiguousarray(rgb, dtype=np.uint8)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise ValueError(f"rgb_png wants an (H, W, 3|4) array, got shape {arr.shape}")
    buf = io.BytesIO()
    imsave(buf, arr, format="png")
    return buf.getvalue()


def figure_png(fig: Any, dpi: int = 96) -> bytes:
    """Render a matplotlib Figure to PNG bytes (Agg) and release it."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    fig.clear()
    return buf.getvalue()


def new_figure(width: float, height: float) -> Any:
    """A pyplot-free Figure of the given size in inches."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))


def data_uri(png: bytes) -> str:
    """``data:image/png;base64,...`` for an <img src=...>."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def decode_png(png: bytes) -> np.ndarray:
    """Decode PNG bytes back to an (H, W, C) uint8 array (used by the tests and labs)."""
    from matplotlib.image import imread

    arr = imread(io.BytesIO(png), format="png")
    if arr.dtype != np.uint8:
        arr = np.round(arr * 255).astype(np.uint8)
    return arr
