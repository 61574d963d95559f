"""Render a run's tiercache history to a PNG, for people without W&B.

``python -m lightning_tiercache.report RUN_DIR`` finds the newest ``metrics.csv`` that Lightning's
``CSVLogger`` wrote under ``RUN_DIR`` and draws tier usage, hit rate and prefetch waits over steps into
``RUN_DIR/tiercache.png`` (or ``--out``). Needs ``matplotlib`` (``pip install matplotlib``).
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import math
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["PANELS", "find_metrics_csv", "load_history", "main", "render"]

#: What each panel draws: (title, y label, keys).
PANELS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    (
        "peak bytes per tier (per logging window)",
        "MiB",
        ("tiercache/device/peak_bytes", "tiercache/host/peak_bytes", "tiercache/disk/peak_bytes"),
    ),
    (
        "budget use per tier (window peak / budget)",
        "ratio",
        ("tiercache/device/budget_use", "tiercache/host/budget_use", "tiercache/disk/budget_use"),
    ),
    ("hit rate", "ratio", ("tiercache/hit_rate", "tiercache/prefetch/wait_share", "tiercache/kv/hit_rate")),
    ("prefetch waits", "ms", ("tiercache/prefetch/wait_p50_s", "tiercache/prefetch/wait_p95_s")),
)
_SCALE = {"MiB": 1 / 2**20, "ms": 1e3}
_INSTALL_HINT = "the report needs matplotlib: pip install matplotlib (or pip install 'lightning-tiercache[report]')"


def find_metrics_csv(run_dir: str | Path) -> Path:
    """``run_dir/metrics.csv`` or the most recently written ``metrics.csv`` below ``run_dir``.

    Raises:
        FileNotFoundError: there is none; the message names the folder searched.
    """
    root = Path(run_dir)
    if root.is_file():
        return root
    if (root / "metrics.csv").is_file():
        return root / "metrics.csv"
    found = sorted(root.rglob("metrics.csv"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(
            f"no metrics.csv under {str(root)!r}; pass the CSVLogger's log_dir (e.g. lightning_logs/version_0)"
        )
    return found[-1]


def load_history(path: str | Path) -> dict[str, list[tuple[int, float]]]:
    """``key -> [(step, value), ...]`` for every ``tiercache/`` column of a CSVLogger ``metrics.csv``."""
    history: dict[str, list[tuple[int, float]]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            step_text = row.get("step") or ""
            if not step_text:
                continue
            step = int(float(step_text))
            for key, text in row.items():
                if key and key.startswith("tiercache/") and text not in ("", None):
                    value = float(text)
                    if math.isfinite(value):
                        history.setdefault(key, []).append((step, value))
    return history


def render(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw the panels of :data:`PANELS` for the run and return the PNG's path.

    Raises:
        ImportError: matplotlib is missing (the message says how to install it).
        FileNotFoundError: no ``metrics.csv`` under ``run_dir``.
        ValueError: the file has no ``tiercache/`` values (was the callback in the run?).
    """
    if importlib.util.find_spec("matplotlib") is None:
        raise ImportError(_INSTALL_HINT)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    src = find_metrics_csv(run_dir)
    history = load_history(src)
    if not history:
        raise ValueError(f"{str(src)!r} has no tiercache/ metrics; was TierCacheCallback in the trainer's callbacks?")
    fig, axes = plt.subplots(len(PANELS), 1, figsize=(8, 2.6 * len(PANELS)), sharex=True)
    for ax, (title, ylabel, keys) in zip(axes, PANELS, strict=True):
        scale = _SCALE.get(ylabel, 1.0)
        for key in keys:
            points = sorted(history.get(key, []))
            if points:
                ax.plot([p[0] for p in points], [p[1] * scale for p in points], marker=".", label=key[10:])
        ax.set_title(title)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize="small", loc="best")
    axes[-1].set_xlabel("step")
    fig.suptitle(f"tiercache: {src.parent.name}")
    fig.tight_layout()
    target = Path(out) if out is not None else src.parent / "tiercache.png"
    fig.savefig(target, dpi=100)
    plt.close(fig)
    return target


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lightning_tiercache.report",
        description="Render the tiercache metrics of a CSVLogger run to a PNG.",
    )
    parser.add_argument("run_dir", help="the CSVLogger log dir (or any folder above it, or metrics.csv itself)")
    parser.add_argument("-o", "--out", default=None, help="PNG path (default: RUN_DIR/tiercache.png)")
    args = parser.parse_args(argv)
    try:
        path = render(args.run_dir, args.out)
    except (ImportError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
