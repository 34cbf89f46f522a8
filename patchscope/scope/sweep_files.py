"""A sweep's files on disk: sweep.json, the long table as sweep.parquet, and PNG heatmaps."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np

from patchscope.scope.sweep import SweepResult
from patchscope.util.storage import atomic_write, write_json

SWEEP_JSON = "sweep.json"
SWEEP_TABLE = "sweep.parquet"

HEATMAPS: dict[str, tuple[str, str]] = {
    "hit": ("precision_at_1", "precision@1 vs the source model's next token"),
    "surprisal": ("surprisal", "surprisal of the source model's next token (nats)"),
    "ratio": ("reactivation", "reactivation ratio (neuron at placeholder / at source)"),
}
"""Table column -> (file stem, colour-bar label)."""


def check_plotting() -> None:
    """Fail before the model loads if heatmaps are asked for and matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as error:
        raise ImportError("heatmaps need matplotlib: pip install 'patchscope[plot]', or turn `heatmaps` off") from error


def plot_grid(result: SweepResult, column: str, path: str | Path, *, title: str = "", condition: str = "patched") -> Path:
    """One PNG: the mean of ``column`` over sources, source layers down, target layers across."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = result.grid(column, condition)  # [n_source_layers, n_target_layers], NaN where not run
    sources, targets = result.source_layers, result.target_layers
    label = HEATMAPS.get(column, (column, column))[1]
    figure, axes = plt.subplots(figsize=(max(6.0, 2.8 + 0.45 * len(targets)), max(3.5, 1.4 + 0.3 * len(sources))), dpi=110)
    limits = {"hit": (0.0, 1.0)}.get(column, (np.nanmin(grid), np.nanmax(grid)))
    image = axes.imshow(np.ma.masked_invalid(grid), cmap="viridis", vmin=limits[0], vmax=limits[1], aspect="auto", origin="lower")
    axes.set_xticks(range(len(targets)), [str(t) for t in targets])
    axes.set_yticks(range(len(sources)), [str(s) for s in sources])
    axes.set_xlabel("target layer t (written at blocks.t.hook_resid_pre)")
    axes.set_ylabel("source layer s (read at blocks.s.hook_resid_pre)")
    if len(sources) * len(targets) <= 400:
        for i in range(len(sources)):
            for j in range(len(targets)):
                if not np.isnan(grid[i, j]):
                    axes.text(
                        j,
                        i,
                        f"{grid[i, j]:.2f}",
                        ha="center",
                        va="center",
                        fontsize=6,
                        color="white" if grid[i, j] < np.nanmean(grid) else "black",
                    )
    figure.colorbar(image, ax=axes, label=label)
    axes.set_title(textwrap.fill(title or f"{label}, {condition}", 60), fontsize=9)
    figure.tight_layout()
    path = Path(path)
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png"))
    plt.close(figure)
    return path


def save_sweep(result: SweepResult, out: str | Path, *, heatmaps: bool = True, title: str = "") -> list[Path]:
    """``sweep.json``, the long table as ``sweep.parquet``, and a PNG heatmap per metric."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(out)
    written = [write_json(out / SWEEP_JSON, result.to_json())]
    table = pa.table(result.table)
    written.append(atomic_write(out / SWEEP_TABLE, lambda tmp: pq.write_table(table, str(tmp))))
    if heatmaps:
        for column, (stem, label) in HEATMAPS.items():
            if column == "ratio" and result.neuron_layer is None:
                continue
            heading = f"{title + ': ' if title else ''}{label}"
            written.append(plot_grid(result, column, out / f"{stem}.png", title=heading))
    return written
