"""Shared helpers for benchmarks: machine facts, alternating timing, medians, tables and JSON."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import psutil
import torch

__all__ = ["alternate", "base_parser", "emit", "machine", "median", "timed"]


def machine() -> dict[str, Any]:
    """What ran the benchmark: cores, RAM, GPU (or none), versions and the date."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {
        "date": datetime.date.today().isoformat(),
        "cpu_cores": os.cpu_count(),
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "gpu": gpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "command": "python -m lightning_tiercache.bench " + " ".join(sys.argv[1:]),
    }


def base_parser(name: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m lightning_tiercache.bench {name}", description=description)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--full", action="store_true", help="GPU-sized workload")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds per variant")
    return p


def timed(fn: Callable[[], Any], clock: Callable[[], float] = time.perf_counter) -> float:
    """Seconds of one call on ``clock`` (wall by default; CUDA synchronized on both ends when present)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = clock()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return clock() - start


def alternate(variants: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Time each variant ``repeats`` times, interleaved (A B C A B C ...) after ``warmup`` rounds."""
    for _ in range(warmup):
        for fn in variants.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            times[name].append(timed(fn))
    return times


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def emit(title: str, rows: list[dict[str, Any]], as_json: bool, extra: dict[str, Any] | None = None) -> None:
    """Print a table (or JSON with the machine facts)."""
    if as_json:
        print(json.dumps({"bench": title, "machine": machine(), "rows": rows, **(extra or {})}, indent=2))
        return
    m = machine()
    print(f"# {title}  ({m['date']}, {m['cpu_cores']} cores, {m['ram_gib']} GiB RAM, GPU: {m['gpu']})")
    if not rows:
        return
    cols = list(rows[0])
    fmt = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in cols]
    print("| " + " | ".join(c.ljust(w) for c, w in zip(cols, fmt, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in fmt) + "|")
    for r in rows:
        print("| " + " | ".join(_fmt(r.get(c)).ljust(w) for c, w in zip(cols, fmt, strict=True)) + " |")
    for k, v in (extra or {}).items():
        print(f"{k}: {v}")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    return "" if v is None else str(v)
