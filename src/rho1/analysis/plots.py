"""Matplotlib figures as PNG data URIs, so HTML pages embed them and request nothing from the network."""

from __future__ import annotations

import base64
import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def figure(width: float = 6.0, height: float = 3.6):
    fig, ax = plt.subplots(figsize=(width, height), dpi=110)
    ax.grid(alpha=0.3)
    return fig, ax


def to_data_uri(fig, path=None) -> str:
    """The figure as a ``data:image/png;base64,...`` URI (and written to ``path`` when given); closes it."""
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    if path is not None:
        with open(path, "wb") as f:
            f.write(buf.getvalue())
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
