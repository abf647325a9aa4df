"""The harness's figures share one way to be written: headless, tight, 110 dpi, closed after."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display: figures are files for the report
import matplotlib.pyplot as plt
from matplotlib.figure import Figure

DPI = 110


def save(fig: Figure, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
