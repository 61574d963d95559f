"""Render a run's tiercache history to a PNG, for people without W&B.

``python -m lightning_tiercache.report RUN_DIR`` finds the newest ``metrics.csv`` that Lightning's
``CSVLogger`` wrote under ``RUN_DIR`` and draws what the run's parts did over steps into
``RUN_DIR/tiercache.png`` (or ``--out``). :func:`plan` decides the figure from the history alone (testable
without matplotlib): a title that says the stage (fine-tune or eval), only the panels of parts that did
something (tiers that held bytes, OOM recovery only after an OOM, the KV cache only in eval), reference lines
where a value turns good or bad (budget use 1 = at budget, a wait share of 0.1), legends beside the axes.
Needs ``matplotlib`` (``pip install matplotlib``).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import importlib.util
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = ["Panel", "find_metrics_csv", "load_history", "main", "plan", "render"]

_TIERS = ("device", "host", "disk")
_INSTALL_HINT = "the report needs matplotlib: pip install matplotlib (or pip install 'lightning-tiercache[report]')"
History = Mapping[str, list[tuple[int, float]]]


@dataclasses.dataclass(frozen=True)
class Panel:
    """One panel of the figure.

    Args:
        title: what the panel shows, in words.
        ylabel: unit of the y axis.
        lines: ``(label, key)`` of each drawn line.
        refs: ``(y, label)`` of each dashed reference line, in the panel's unit.
        scale: factor from the logged unit to the panel's (bytes -> MiB, s -> ms).
    """

    title: str
    ylabel: str
    lines: tuple[tuple[str, str], ...]
    refs: tuple[tuple[float, str], ...] = ()
    scale: float = 1.0


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


def _any(history: History, key: str, above: float = 0.0) -> bool:
    return any(v > above for _, v in history.get(key, []))


def stage_of(history: History) -> str:
    """``"fine-tune"`` when the run offloaded activations (fit), ``"eval"`` when it used the KV cache."""
    if any(k.startswith("tiercache/activations/") for k in history):
        return "fine-tune"
    if any(k.startswith("tiercache/kv/") for k in history):
        return "eval"
    return "run"


def plan(history: History, name: str = "") -> tuple[str, list[Panel]]:
    """The figure's title and panels for ``history``: only what the run did, with reference lines."""
    stage = stage_of(history)
    tiers = [t for t in _TIERS if _any(history, f"tiercache/{t}/peak_bytes")]
    panels: list[Panel] = []
    if tiers:
        panels.append(
            Panel(
                "highest bytes held per tier in each logging window",
                "MiB",
                tuple((t, f"tiercache/{t}/peak_bytes") for t in tiers),
                scale=1 / 2**20,
            )
        )
    if any(_any(history, f"tiercache/{t}/budget_use", above=0.01) for t in tiers):  # not drawn flat at 0
        panels.append(
            Panel(
                "budget use per tier (window peak / budget; above 1 = over budget)",
                "ratio",
                tuple((t, f"tiercache/{t}/budget_use") for t in tiers),
                refs=((1.0, "budget"),),
            )
        )
    if _any(history, "tiercache/gets"):
        panels.append(
            Panel(
                "store gets (share of all gets)",
                "share",
                (
                    ("served without waiting", "tiercache/hit_rate"),
                    ("waited for a move", "tiercache/prefetch/wait_share"),
                ),
                refs=((0.1, "10% waited"),),
            )
        )
    if _any(history, "tiercache/prefetch/wait_p95_s"):
        panels.append(
            Panel(
                "wait of the gets that waited",
                "ms",
                (("median", "tiercache/prefetch/wait_p50_s"), ("95th percentile", "tiercache/prefetch/wait_p95_s")),
                scale=1e3,
            )
        )
    if _any(history, "tiercache/oom/retries") or _any(history, "tiercache/oom/micro_batches", above=1.0):
        panels.append(
            Panel(
                "OOM recovery",
                "count",
                (
                    ("steps retried so far", "tiercache/oom/retries"),
                    ("micro-batches per batch", "tiercache/oom/micro_batches"),
                ),
                refs=((1.0, "no split"),),
            )
        )
    if stage == "eval" and _any(history, "tiercache/kv/blocks"):
        panels.append(
            Panel(
                "KV cache: prompt blocks served from the cache",
                "share",
                (("prefix hit rate", "tiercache/kv/hit_rate"),),
            )
        )
    title = f"tiercache, {stage}" + (f": {name}" if name else "")
    return title, panels


def render(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw the panels :func:`plan` chooses for the run and return the PNG's path.

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
    from matplotlib.ticker import MaxNLocator

    src = find_metrics_csv(run_dir)
    history = load_history(src)
    if not history:
        raise ValueError(f"{str(src)!r} has no tiercache/ metrics; was TierCacheCallback in the trainer's callbacks?")
    title, panels = plan(history, name=f"{src.parent.parent.name}/{src.parent.name}")
    if not panels:
        panels = [
            Panel("store gets (nothing was stored)", "share", (("served without waiting", "tiercache/hit_rate"),))
        ]
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 2.4 * len(panels) + 0.6), sharex=True, squeeze=False)
    for ax, panel in zip(axes[:, 0], panels, strict=True):
        for label, key in panel.lines:
            points = sorted(history.get(key, []))
            if points:
                ax.plot([p[0] for p in points], [p[1] * panel.scale for p in points], marker=".", label=label)
        for y, label in panel.refs:
            ax.axhline(y, color="grey", linestyle="--", linewidth=1, label=label)
        ax.set_title(panel.title, fontsize="medium")
        ax.set_ylabel(panel.ylabel)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    axes[-1, 0].set_xlabel("step")
    axes[-1, 0].xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 1, 0.98))
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
