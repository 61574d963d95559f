"""Cache-health telemetry: counters of the store and its users -> rank-reduced gauges -> loggers.

:data:`METRICS` is the one list of every key the library logs, with how it reduces across ranks, its W&B
summary and its meaning; the docs table is generated from it (:func:`metrics_markdown`) and the tests check
both the docs and what is really logged against it. :class:`Telemetry` samples the stats of a
:class:`~lightning_tiercache.TierStore` (and of the activation offloader, the OOM hook and the KV cache when
they run), turns counters into rates over the window since the last sample, reduces the values across ranks
with a ``torchmetrics`` metric (one state per reduction, ``dist_reduce_fx`` sum/max/min/mean) and hands them to
the loggers. It does not import Lightning: anything with ``log_metrics(metrics, step)`` is a logger.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterable, Mapping
from time import perf_counter  # Note: [own clock] the library's timers read the clock through their own name
from typing import Any, Protocol

import psutil
import torch
import torch.distributed as dist
from torchmetrics import Metric

__all__ = [
    "FEATURES",
    "METRICS",
    "REDUCTIONS",
    "MetricSpec",
    "Telemetry",
    "TelemetryMetric",
    "host_memory",
    "metrics_markdown",
    "spec",
]

#: How a key reduces across ranks (``torchmetrics`` ``dist_reduce_fx`` names).
REDUCTIONS = ("sum", "max", "min", "mean")
#: Which part produces a key; a key is logged only while its part runs.
FEATURES = ("store", "system", "cuda", "activations", "oom", "kv")


@dataclasses.dataclass(frozen=True)
class MetricSpec:
    """One logged key.

    Args:
        key: the full key, under ``tiercache/``.
        reduce: how ranks combine, one of :data:`REDUCTIONS`.
        feature: the part that produces it, one of :data:`FEATURES`.
        unit: unit of the value (``bytes``, ``s``, ``ratio``, ``count``, ``bytes/s``).
        summary: W&B run summary kept for it (``max``, ``min`` or ``None`` for the last value).
        description: what it means, for the docs table.
    """

    key: str
    reduce: str
    feature: str
    unit: str
    summary: str | None
    description: str

    def __post_init__(self) -> None:
        if self.reduce not in REDUCTIONS:
            raise ValueError(f"reduce={self.reduce!r} for {self.key!r} is not one of {', '.join(REDUCTIONS)}")
        if self.feature not in FEATURES:
            raise ValueError(f"feature={self.feature!r} for {self.key!r} is not one of {', '.join(FEATURES)}")
        if self.summary not in (None, "max", "min"):
            raise ValueError(f"summary={self.summary!r} for {self.key!r} is not one of max, min, None")


def _tier_specs() -> list[MetricSpec]:
    out = []
    for tier in ("device", "host", "disk"):
        out += [
            MetricSpec(
                f"tiercache/{tier}/bytes",
                "sum",
                "store",
                "bytes",
                "max",
                f"bytes resident in the {tier} tier at the sample (a batch boundary: in fit the step's activations "
                "are freed by then, see peak_bytes)",
            ),
            MetricSpec(
                f"tiercache/{tier}/entries", "sum", "store", "count", None, f"entries in the {tier} tier at the sample"
            ),
            MetricSpec(
                f"tiercache/{tier}/budget_use",
                "max",
                "store",
                "ratio",
                "max",
                f"highest {tier} bytes since the last sample / {tier} budget (worst rank); above 1: the tier held "
                "more than its budget (entries that could not move down in time)",
            ),
            MetricSpec(
                f"tiercache/{tier}/peak_bytes",
                "max",
                "store",
                "bytes",
                "max",
                f"highest {tier} bytes since the last sample (worst rank)",
            ),
        ]
    return out


_S = MetricSpec
#: Every key the library logs. The docs table is generated from this tuple.
METRICS: tuple[MetricSpec, ...] = (
    *_tier_specs(),
    _S("tiercache/hit_rate", "mean", "store", "ratio", "min", "gets served without waiting / gets (1 with no gets)"),
    _S("tiercache/prefetch/wait_share", "max", "store", "ratio", "max", "share of gets that waited for a move"),
    _S("tiercache/prefetch/wait_p50_s", "max", "store", "s", "max", "median wait of the gets that waited"),
    _S("tiercache/prefetch/wait_p95_s", "max", "store", "s", "max", "95th percentile wait of the gets that waited"),
    _S("tiercache/prefetch/wait_s", "sum", "store", "s", "max", "total time gets waited"),
    _S(
        "tiercache/bandwidth/to_device_bytes_per_s",
        "sum",
        "cuda",
        "bytes/s",
        "max",
        "host -> device copies (CUDA stores: on a CPU the device tier is a RAM budget and nothing is copied)",
    ),
    _S(
        "tiercache/bandwidth/to_host_bytes_per_s",
        "sum",
        "cuda",
        "bytes/s",
        "max",
        "device -> host copies (CUDA stores only)",
    ),
    _S("tiercache/bandwidth/to_disk_bytes_per_s", "sum", "store", "bytes/s", "max", "spill writes (raw bytes)"),
    _S("tiercache/bandwidth/from_disk_bytes_per_s", "sum", "store", "bytes/s", "max", "spill reads (raw bytes)"),
    _S("tiercache/puts", "sum", "store", "count", "max", "entries given to the store so far"),
    _S("tiercache/gets", "sum", "store", "count", "max", "entries read back from the store so far"),
    _S("tiercache/spills", "sum", "store", "count", "max", "entries written to disk so far"),
    _S("tiercache/evictions", "sum", "store", "count", "max", "entries moved down a tier by the policy so far"),
    _S("tiercache/drops", "sum", "store", "count", "max", "cache entries dropped under pressure so far"),
    _S(
        "tiercache/overcommits",
        "sum",
        "store",
        "count",
        "max",
        "times a tier stayed over budget with required entries that had nowhere to go, so far",
    ),
    _S(
        "tiercache/disk_errors_recovered",
        "sum",
        "store",
        "count",
        "max",
        "disk full, write errors, corrupt or missing spill files handled so far",
    ),
    _S("tiercache/ranks", "sum", "store", "count", None, "ranks that reported (the world size)"),
    _S(
        "tiercache/host_ram/rss_bytes",
        "sum",
        "system",
        "bytes",
        "max",
        "resident memory of the training processes (read at most once a second)",
    ),
    _S(
        "tiercache/host_ram/available_bytes",
        "min",
        "system",
        "bytes",
        "min",
        "RAM available on the machine (read at most once a second)",
    ),
    _S("tiercache/device_memory/allocated_bytes", "max", "cuda", "bytes", "max", "torch.cuda.memory_allocated"),
    _S("tiercache/device_memory/reserved_bytes", "max", "cuda", "bytes", "max", "torch.cuda.memory_reserved"),
    _S(
        "tiercache/device_memory/alloc_retries",
        "sum",
        "cuda",
        "count",
        "max",
        "CUDA allocator retries (cache flushes): a thrashing warning",
    ),
    _S(
        "tiercache/activations/offloaded_bytes",
        "sum",
        "activations",
        "bytes",
        "max",
        "activation bytes given to the store",
    ),
    _S("tiercache/activations/unpack_wait_share", "max", "activations", "ratio", "max", "share of unpacks that waited"),
    _S("tiercache/activations/unpack_wait_s", "sum", "activations", "s", "max", "total time backward waited on unpack"),
    _S("tiercache/activations/prefetch_lead", "max", "activations", "count", None, "prefetch lead in use"),
    _S("tiercache/oom/retries", "sum", "oom", "count", "max", "steps retried after an out-of-memory error so far"),
    _S("tiercache/oom/micro_batches", "max", "oom", "count", "max", "current micro-batches per batch (1 = no split)"),
    _S("tiercache/kv/hit_rate", "mean", "kv", "ratio", "min", "prompt blocks served from the cache / blocks looked up"),
    _S("tiercache/kv/hit_tokens", "sum", "kv", "count", "max", "prompt tokens served from the cache so far"),
    _S("tiercache/kv/blocks", "sum", "kv", "count", "max", "prompt blocks stored for reuse so far"),
    _S("tiercache/kv/evictions", "sum", "kv", "count", "max", "blocks found by lookup but dropped before use so far"),
)
_BY_KEY = {s.key: s for s in METRICS}
#: Running counts whose change means a part did work in a window (see :meth:`Telemetry.active`).
_STORE_ACTIVITY = ("tiercache/puts", "tiercache/gets")
_ACTIVITY = (
    *_STORE_ACTIVITY,
    "tiercache/oom/retries",
    "tiercache/kv/hit_tokens",
    "tiercache/kv/blocks",
)


def spec(key: str) -> MetricSpec:
    """The spec of one key. Raises ``KeyError`` naming the key when it is not documented."""
    try:
        return _BY_KEY[key]
    except KeyError:
        raise KeyError(f"{key!r} is not a documented tiercache metric") from None


def metrics_markdown() -> str:
    """The docs table of :data:`METRICS` (markdown)."""
    lines = ["| key | unit | across ranks | W&B summary | part | meaning |", "| --- | --- | --- | --- | --- | --- |"]
    for s in METRICS:
        lines.append(f"| `{s.key}` | {s.unit} | {s.reduce} | {s.summary or 'last'} | {s.feature} | {s.description} |")
    return "\n".join(lines) + "\n"


class TelemetryMetric(Metric):
    """Gauges of :data:`METRICS`, one vector state per reduction, so a sync costs four collectives.

    ``update`` overwrites the gauges (they are snapshots, not sums over updates); ``compute`` reduces them
    across ranks (each with its own ``dist_reduce_fx``) and returns a key -> value dict. ``kwargs`` go to
    ``torchmetrics.Metric`` (``process_group``, ``dist_sync_fn``, ...).
    """

    full_state_update = False

    def __init__(self, specs: Iterable[MetricSpec] = METRICS, **kwargs: Any) -> None:
        super().__init__(compute_with_cache=False, **kwargs)
        self.specs = tuple(specs)
        self._slot: dict[str, tuple[str, int]] = {}
        for op in REDUCTIONS:
            keys = [s.key for s in self.specs if s.reduce == op]
            self._slot.update({k: (op, i) for i, k in enumerate(keys)})
            self.add_state(f"by_{op}", default=torch.zeros(len(keys), dtype=torch.float64), dist_reduce_fx=op)

    def update(self, values: Mapping[str, float]) -> None:
        gauges = {op: getattr(self, f"by_{op}").tolist() for op in REDUCTIONS}
        for key, value in values.items():
            op, i = self._slot[key]
            gauges[op][i] = float(value)
        for op, vals in gauges.items():  # one copy per state, not one indexing op per key
            state = getattr(self, f"by_{op}")
            state.copy_(torch.tensor(vals, dtype=state.dtype))

    def compute(self) -> dict[str, float]:
        states = {op: getattr(self, f"by_{op}").tolist() for op in REDUCTIONS}
        return {key: float(states[op][i]) for key, (op, i) in self._slot.items()}


class _HasStats(Protocol):
    def stats(self) -> Mapping[str, Any]: ...


class _StoreStats(Protocol):
    device: torch.device

    def stats(self, reset_window: bool = False) -> Mapping[str, Any]: ...


class _Logger(Protocol):
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def host_memory() -> tuple[int, int]:
    """``(resident bytes of this process, bytes of RAM available on the machine)``.

    On Linux, two short reads of ``/proc``: telemetry samples on the training thread, where ``psutil``'s answer
    (it parses every line of ``/proc/meminfo``) took twice as long. Elsewhere, or if ``/proc`` cannot be read
    or parsed, ``psutil``.
    """
    try:
        with open("/proc/self/statm", "rb") as f:
            rss = int(f.read().split()[1]) * _PAGE
        with open("/proc/meminfo", "rb") as f:
            info = f.read()
        start = info.index(b"MemAvailable:") + len(b"MemAvailable:")
        available = int(info[start : info.index(b"kB", start)]) * 1024
    except (OSError, ValueError, IndexError):
        return psutil.Process().memory_info().rss, psutil.virtual_memory().available
    return rss, available


class Telemetry:
    """Samples the running parts, reduces across ranks and logs every ``every_n`` steps.

    Args:
        every_n: log every this many steps (the Trainer's ``log_every_n_steps`` by default in the callback);
            ``None``: no step is due (the callback then logs at stage ends only, as Lightning does with
            ``log_every_n_steps=0``).
        device: device of the metric states (the collective's device: CUDA under NCCL).
        host_every_s: read host RAM (``tiercache/host_ram/*``) at most this often; samples in between repeat the
            last reading.
    """

    def __init__(self, every_n: int | None = 50, device: torch.device | str = "cpu", host_every_s: float = 1.0) -> None:
        if every_n is not None and (isinstance(every_n, bool) or not isinstance(every_n, int) or every_n < 1):
            raise ValueError(f"every_n={every_n!r} must be an int >= 1 or None")
        if not host_every_s >= 0:
            raise ValueError(f"host_every_s={host_every_s!r} must be >= 0")
        self.every_n = every_n
        self.host_every_s = host_every_s
        self._host: tuple[int, int] = (0, 0)
        self._host_time = -math.inf
        self.metric = TelemetryMetric().to(device)
        self.last: dict[str, float] = {}
        self._prev: dict[str, float] = {}
        self._prev_time = perf_counter()
        self._activity: dict[str, float] = {}

    def due(self, step: int) -> bool:
        """Whether ``step`` (0-based, the same on every rank) is a logging step."""
        return self.every_n is not None and (step + 1) % self.every_n == 0

    def sample(
        self,
        store: _StoreStats | None,
        *,
        activations: _HasStats | None = None,
        oom: _HasStats | None = None,
        kv: _HasStats | None = None,
        oom_prefix: str = "",
    ) -> dict[str, float]:
        """This rank's values of every key whose part runs now (``oom_prefix="eval_"``: the eval split)."""
        now = perf_counter()
        window = max(now - self._prev_time, 1e-9)
        out: dict[str, float] = {}
        if store is not None:
            cuda = store.device.type == "cuda"
            out.update(self._store_values(store.stats(reset_window=True), window, cuda=cuda))  # peaks per window
        if now - self._host_time >= self.host_every_s:  # system calls, slow between large kernels: not every log
            self._host, self._host_time = host_memory(), now
        rss, available = self._host
        out["tiercache/host_ram/rss_bytes"] = float(rss)
        out["tiercache/host_ram/available_bytes"] = float(available)
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            mem = torch.cuda.memory_stats()
            out["tiercache/device_memory/allocated_bytes"] = float(mem.get("allocated_bytes.all.current", 0))
            out["tiercache/device_memory/reserved_bytes"] = float(mem.get("reserved_bytes.all.current", 0))
            out["tiercache/device_memory/alloc_retries"] = float(mem.get("num_alloc_retries", 0))
        if activations is not None:
            out.update(_activation_values(activations.stats()))
        if oom is not None:
            out.update(_oom_values(oom.stats(), oom_prefix))
        if kv is not None:
            out.update(_kv_values(kv.stats()))
        self._prev_time = now
        return out

    def reduce(self, values: Mapping[str, float]) -> dict[str, float]:
        """Reduce ``values`` across ranks (a collective: every rank calls it with the same keys)."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            self.last = {k: float(v) for k, v in values.items()}  # one rank: every reduction is the identity
            return self.last
        self.metric.update(values)
        reduced = self.metric.compute()
        self.last = {k: reduced[k] for k in values}
        return self.last

    def log(self, loggers: Iterable[_Logger], values: Mapping[str, float], step: int) -> None:
        """Hand reduced values to every logger (loggers write on rank zero only)."""
        for logger in loggers:
            logger.log_metrics(dict(values), step=step)

    def active(self, values: Mapping[str, float], stage: str = "") -> bool:
        """Whether ``values`` (reduced, so every rank answers alike) show work since the previous call.

        Work is a change of a running count the stage itself drives: entries put or read (the store's
        counters are shared by every stage), OOM retries and KV blocks and tokens (compared with the previous
        call for the same ``stage``: train and eval keep their own). Background moves finishing (spills) are
        not work of the window. A window without work is not worth a logged row (a validation that stored
        nothing).
        """
        changed = False
        for key in _ACTIVITY:
            slot = key if key in _STORE_ACTIVITY else f"{stage}:{key}"
            value = float(values.get(key, 0.0))
            changed |= self._activity.get(slot, 0.0) != value
            self._activity[slot] = value
        return changed

    def _store_values(self, st: Mapping[str, Any], window: float, *, cuda: bool) -> dict[str, float]:
        out: dict[str, float] = {}
        for tier, t in st["tiers"].items():
            out[f"tiercache/{tier}/bytes"] = float(t["bytes"])
            out[f"tiercache/{tier}/entries"] = float(t["entries"])
            peak = t["window_peak_bytes"]
            out[f"tiercache/{tier}/budget_use"] = peak / t["budget"] if t["budget"] else 0.0
            out[f"tiercache/{tier}/peak_bytes"] = float(peak)
        gets = st.get("gets", 0)
        out["tiercache/hit_rate"] = st.get("hits", 0) / gets if gets else 1.0
        out["tiercache/prefetch/wait_share"] = st.get("waits", 0) / gets if gets else 0.0
        out["tiercache/prefetch/wait_p50_s"] = float(st.get("wait_p50_s", 0.0))
        out["tiercache/prefetch/wait_p95_s"] = float(st.get("wait_p95_s", 0.0))
        out["tiercache/prefetch/wait_s"] = float(st.get("wait_s", 0.0))
        for key, counter in (
            ("to_device", "bytes_to_device"),
            ("to_host", "bytes_to_host"),
            ("to_disk", "spill_bytes"),
            ("from_disk", "read_bytes"),
        ):
            total = float(st.get(counter, 0))
            if cuda or key.endswith("disk"):
                out[f"tiercache/bandwidth/{key}_bytes_per_s"] = max(0.0, total - self._prev.get(counter, 0.0)) / window
            self._prev[counter] = total
        out["tiercache/puts"] = float(st.get("puts", 0))
        out["tiercache/gets"] = float(gets)
        out["tiercache/spills"] = float(st.get("spills", 0))
        out["tiercache/evictions"] = float(st.get("evictions", 0))
        out["tiercache/drops"] = float(st.get("drops", 0))
        out["tiercache/overcommits"] = float(st.get("overcommits", 0))
        out["tiercache/disk_errors_recovered"] = float(
            sum(st.get(k, 0) for k in ("disk_full", "disk_errors", "corrupt", "missing"))
        )
        out["tiercache/ranks"] = 1.0
        return out


def _num(stats: Mapping[str, Any], *names: str, default: float = 0.0) -> float:
    """The first of ``names`` present in ``stats`` (the parts' counters have grown; accept their spellings)."""
    for name in names:
        value = stats.get(name)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    return default


def _activation_values(st: Mapping[str, Any]) -> dict[str, float]:
    unpacks = _num(st, "unpacks", "gets")
    waits = _num(st, "unpack_waits", "waits")
    return {
        "tiercache/activations/offloaded_bytes": _num(st, "bytes_offloaded", "offloaded_bytes"),
        "tiercache/activations/unpack_wait_share": waits / unpacks if unpacks else 0.0,
        "tiercache/activations/unpack_wait_s": _num(st, "unpack_wait_s", "wait_s"),
        "tiercache/activations/prefetch_lead": _num(st, "prefetch_lead", "lead"),
    }


def _oom_values(st: Mapping[str, Any], prefix: str) -> dict[str, float]:
    return {
        "tiercache/oom/retries": _num(st, f"{prefix}oom_retries"),
        "tiercache/oom/micro_batches": _num(st, f"{prefix}current_micro_batches", default=1.0),
    }


def _kv_values(st: Mapping[str, Any]) -> dict[str, float]:
    hits = _num(st, "hits", "block_hits")
    misses = _num(st, "misses", "block_misses")
    return {
        "tiercache/kv/hit_rate": hits / (hits + misses) if hits + misses else 0.0,
        "tiercache/kv/hit_tokens": _num(st, "hit_tokens"),
        "tiercache/kv/blocks": _num(st, "stored_blocks", "blocks"),
        "tiercache/kv/evictions": _num(st, "evicted_hits", "evictions"),
    }


if __name__ == "__main__":  # regenerate the docs table: python -m lightning_tiercache.lightning.telemetry
    import sys

    sys.stdout.write(metrics_markdown())
