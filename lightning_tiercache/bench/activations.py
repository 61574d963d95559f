"""``python -m lightning_tiercache.bench activations``: activation offload against the alternatives.

Trains a GPT built from a config and runs, side by side in one process (alternating, after a warm-up):
no offload; ``torch.utils.checkpoint`` per block; ``torch.autograd.graph.save_on_cpu`` (CUDA);
torchtune's ``OffloadActivations`` (CUDA, when installed); ours to host (CUDA: on a CPU-only machine the host
tier is the same RAM); ours to disk; ours to disk with checkpointed blocks (the block inputs are what is
offloaded); ours to disk with every block compiled (``torch.compile`` per block). Ours gets a device budget of
``--budget-share`` of what a plain step saves for backward and offloads only what does not fit. Step time is
the median per-round ratio to no offload. On a CPU device each round runs every variant in a fresh process of
its own instead (the same process that measures its memory), and the round's ratio is the variant's median
step over the baseline's: in one process the variants share the C allocator's heap, so what one variant's
``malloc_trim`` hands back is faulted in again by the variant that runs next, and the alternation would move
ours' page faults onto the baseline's clock. Memory is measured in a fresh subprocess per variant, under the C
library's default settings (no ``MALLOC_*`` variables): on CUDA ``max_memory_allocated`` over a step minus what
was allocated before it; on CPU the bytes saved for backward that stay resident (the store's device-tier peak
for ours, a counting hook for the others) and the growth of the process's peak RSS. RSS growth is counted
twice, each from the RSS after handing the allocator's free pages back: over the first step in the process
(``first_growth``: ours runs it unplanned) and over the two steps after it (``rss_growth``, the steady state
a training run lives in; ``step_growth`` gives each of the two steps' own peak). On CPU each variant also
reports the process's minor page faults and kernel CPU seconds per timed step (``faults_k_step``,
``sys_s_step``), where handing freed memory back to the OS and taking it again shows.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch

from lightning_tiercache.bench.common import alternate, base_parser, emit, median, timed
from lightning_tiercache.bench.gpt import GPT, GPTConfig, SavedBytes

__all__ = ["main"]

SIZES = {
    "default": {"vocab_size": 1024, "seq_len": 256, "n_layer": 4, "n_head": 6, "d_model": 384, "batch": 4},
    "gpt6": {"vocab_size": 1024, "seq_len": 512, "n_layer": 6, "n_head": 8, "d_model": 512, "batch": 4},
    "tiny": {"vocab_size": 128, "seq_len": 64, "n_layer": 2, "n_head": 2, "d_model": 64, "batch": 2},
    "full": {"vocab_size": 8192, "seq_len": 2048, "n_layer": 12, "n_head": 16, "d_model": 1024, "batch": 8},
}
MiB = 1 << 20
_COLUMNS = (
    "variant", "step_x", "step_x_iqr", "resident_mib", "resident_pct", "peak_rss_mib", "rss_growth_mib",
    "rss_growth_pct", "first_growth_mib", "first_growth_pct", "step_growth_mib", "moved_mib_step", "wait_ms_step",
    "waits_step", "lead_mib", "faults_k_step", "sys_s_step", "note",
)  # fmt: skip
_CHECKPOINTED = ("checkpoint", "ours_disk_ckpt")


def _parser() -> argparse.ArgumentParser:
    p = base_parser("activations", __doc__.splitlines()[0] if __doc__ else "")
    p.add_argument("--codec", default="auto", help="codec of the disk tier (TierConfig.codec)")
    p.add_argument("--min-bytes", default="64KiB", help="smallest tensor offloaded")
    p.add_argument("--keep-tail-bytes", default=None, help="fixed resident tail for ours (default: planned)")
    p.add_argument("--variants", default=None, help="comma-separated subset of variants")
    p.add_argument("--seq-len", type=int, default=None, help="sequence length (longer: more compute per saved byte)")
    p.add_argument(
        "--model", choices=("default", "gpt6", "tiny"), default="default",
        help="default: 4 blocks, d=384, batch 4x256; gpt6: 6 blocks, d=512, batch 4x512 (about 2 s a step on 2 cores); "
        "tiny: 2 blocks, d=64, batch 2x64 (a smoke test: with --min-bytes 1KiB, every variant in seconds)",
    )  # fmt: skip
    p.add_argument(
        "--budget-share", type=float, default=0.3,
        help="ours' device budget as a share of the bytes a plain step saves for backward",
    )  # fmt: skip
    p.add_argument("--compile-backend", default="aot_eager", help="torch.compile backend of ours_compile")
    p.add_argument(
        "--steps", type=int, default=3,
        help="timed steps per variant process and round (CPU; after the steps that measure memory)",
    )  # fmt: skip
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return p


def _size_name(args: argparse.Namespace) -> str:
    return "full" if args.full else str(args.model)


def _size(args: argparse.Namespace) -> tuple[GPTConfig, int]:
    s: dict[str, Any] = dict(SIZES[_size_name(args)])
    batch = int(s.pop("batch"))
    if args.seq_len:
        s["seq_len"] = args.seq_len
    return GPTConfig(**s), batch


def _device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _variant_names(args: argparse.Namespace) -> list[str]:
    names = ["none", "checkpoint"]
    if torch.cuda.is_available():
        names.append("save_on_cpu")
        if _torchtune() is not None:
            names.append("torchtune")
        names.append("ours_host")
    names += ["ours_disk", "ours_disk_ckpt", "ours_compile"]
    if args.variants:
        wanted = args.variants.split(",")
        names = [n for n in names if n in wanted or n == "none"]
    return names


def _torchtune() -> Any:
    try:
        from torchtune.training import OffloadActivations
    except Exception:  # not installed, or an incompatible torchao: the variant is skipped
        return None
    return OffloadActivations


class _Variant:
    """One way to run a training step; ``context`` wraps the forward."""

    def __init__(self, name: str, model: GPT, args: argparse.Namespace, device: torch.device, budget: int) -> None:
        self.name = name
        self.model = model
        self.store: Any = None
        self.offloader: Any = None
        self.tt: Any = None
        if name == "ours_compile":
            self.model = copy.deepcopy(model)  # compiled in place, block by block; the others stay eager
            for block in self.model.blocks:
                block.compile(backend=args.compile_backend)
        if name.startswith("ours"):
            from lightning_tiercache import TierConfig, TierStore
            from lightning_tiercache.activations.offloader import ActivationOffloader

            host = name == "ours_host"
            cfg = TierConfig(
                device_bytes=budget, host_bytes=None if host else 0, disk_bytes=0 if host else None,
                codec=args.codec, device=str(device),
            )  # fmt: skip
            self.store = TierStore(cfg)
            self.offloader = ActivationOffloader(
                self.store, min_bytes=args.min_bytes, module=self.model, keep_tail_bytes=args.keep_tail_bytes,
                tier="host" if host else "disk",
            )  # fmt: skip
        elif name == "torchtune":
            self.tt = _torchtune()()

    @contextlib.contextmanager
    def context(self) -> Iterator[None]:
        self.model.use_checkpoint = self.name in _CHECKPOINTED
        try:
            if self.offloader is not None:
                with self.offloader:
                    yield
            elif self.name == "save_on_cpu":
                with torch.autograd.graph.save_on_cpu(pin_memory=True):
                    yield
            elif self.tt is not None:
                with self.tt:
                    yield
            else:
                yield
        finally:
            self.model.use_checkpoint = False

    def close(self) -> None:
        if self.store is not None:
            self.store.close()


def _step(variant: _Variant, x: torch.Tensor, y: torch.Tensor, amp: bool) -> None:
    model = variant.model
    model.zero_grad(set_to_none=True)
    autocast = torch.autocast(x.device.type, dtype=torch.bfloat16) if amp else contextlib.nullcontext()
    with autocast, variant.context():
        loss = model(x, y).loss
    loss.backward()


def _bind(v: _Variant, x: torch.Tensor, y: torch.Tensor, amp: bool) -> Callable[[], None]:
    return lambda: _step(v, x, y, amp)


def _setup(args: argparse.Namespace) -> tuple[GPT, torch.Tensor, torch.Tensor, torch.device, int]:
    """The model, a batch, the device, and ours' device budget (a share of what a plain step saves)."""
    torch.manual_seed(0)
    cfg, batch = _size(args)
    device = _device()
    model = GPT(cfg).to(device)
    x, y = model.batch(batch, torch.Generator().manual_seed(0))
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    with SavedBytes() as saved:
        with amp:
            loss = model(x, y).loss
        loss.backward()
    model.zero_grad(set_to_none=True)
    return model, x, y, device, int(args.budget_share * saved.nbytes)


def _child(args: argparse.Namespace) -> int:
    """Measure one variant's memory in this fresh process; print one JSON line."""
    model, x, y, device, budget = _setup(args)
    v = _Variant(args.child, model, args, device, budget)
    amp = device.type == "cuda"
    first_before = _reset_peak_rss()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _step(v, x, y, amp)  # the first step measures (and compiles); ours plans the later ones from it
    out: dict[str, Any] = {"name": v.name, "first_rss_before": first_before, "first_peak_rss": _peak_rss()}
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    rss_before = _reset_peak_rss()
    resident = 0
    counted: list[int] = []
    step_peaks: list[int] = []
    for _ in range(2):
        if v.offloader is None and device.type != "cuda":
            with SavedBytes() as saved:  # checkpoint's block inputs included: it saves them through the hooks
                _step(v, x, y, amp)
            counted.append(saved.nbytes)
        else:
            with warnings.catch_warnings(record=True) as later:
                warnings.simplefilter("always")
                _step(v, x, y, amp)
            caught += later
        step_peaks.append(_peak_rss())
        _restart_peak_rss()  # each later step's own peak, from the same base
    out["step_peak_rss"] = step_peaks
    if device.type == "cuda":
        torch.cuda.synchronize()
        out["cuda_peak_bytes"] = torch.cuda.max_memory_allocated() - base
        resident = out["cuda_peak_bytes"]
    elif v.offloader is not None:
        v.store.settle()
        st = v.offloader.stats()
        resident = v.store.stats()["tiers"]["device"]["peak_bytes"] + st["skipped_bytes"] // max(1, st["steps"])
    else:
        resident = max(counted)
    out.update(resident_bytes=resident, rss_before=rss_before, peak_rss=max(step_peaks))
    if device.type != "cuda":  # the round's step times (see the module docstring), after the measured steps
        with warnings.catch_warnings(record=True) as later:
            warnings.simplefilter("always")
            before = _offload_counts(v)
            usage = resource.getrusage(resource.RUSAGE_SELF)
            out["step_s"] = [timed(lambda: _step(v, x, y, amp)) for _ in range(args.steps)]
            used = resource.getrusage(resource.RUSAGE_SELF)
            after = _offload_counts(v)
            # Where a CPU step's extra time goes: the page faults of memory handed back and taken again
            # (Note: [memory that leaves the process]) show as minor faults and kernel time, per timed step.
            out["faults_step"] = (used.ru_minflt - usage.ru_minflt) / args.steps
            out["sys_s_step"] = (used.ru_stime - usage.ru_stime) / args.steps
            out["offload"] = {k: n if k == "lead" else n - before[k] for k, n in after.items()}
        caught += later
    out["warnings"] = sorted({str(w.message)[:80] for w in caught if "tiercache" in str(w.message)})
    v.close()
    print(json.dumps(out))
    return 0


def _offload_counts(v: _Variant) -> dict[str, float]:
    """Ours' counters that the table reports per step (empty for the other variants)."""
    if v.offloader is None:
        return {}
    if v.store is not None:
        v.store.settle()
    st, ss = v.offloader.stats(), v.store.stats()
    return {
        "steps": st["steps"], "moved": st["bytes_offloaded"] + ss["read_bytes"] + ss["bytes_to_device"],
        "wait_s": st["unpack_wait_s"], "waits": st["unpack_waits"], "lead": st["lead_bytes"],
    }  # fmt: skip


def _proc_status(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_peak_rss() -> int:
    """Restart the peak-RSS count here (Linux ``clear_refs``); returns the RSS now.

    The C allocator's free pages are handed back first, in every variant, so the growth that follows is
    what the steps need at their peak, not a warm-up step's memory that the allocator kept.
    """
    from lightning_tiercache.store.tiers.trim import Trimmer

    Trimmer().trim()
    _restart_peak_rss()
    rss = _proc_status("VmRSS")
    return rss if rss is not None else _peak_rss()


def _restart_peak_rss() -> None:
    """Set the peak RSS (``VmHWM``) to the RSS now, without trimming (Linux; elsewhere nothing happens)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _peak_rss() -> int:
    """Peak RSS of this process image (``VmHWM``: unlike ``ru_maxrss`` it does not inherit the parent's)."""
    hwm = _proc_status("VmHWM")
    return hwm if hwm is not None else int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _memory(args: argparse.Namespace, name: str, argv: list[str]) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "lightning_tiercache.bench", "activations", *argv, "--child", name]
    # What a user gets: the C library's default settings (a fixed mmap threshold would flatter every variant).
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False, env=env)
    if done.returncode != 0:
        return {"name": name, "error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"}
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if args.child:
        return _child(args)
    started = time.perf_counter()
    model, x, y, device, budget = _setup(args)
    amp = device.type == "cuda"
    names = _variant_names(args)
    child_argv = [a for a in argv if a not in ("--json",)]
    if device.type == "cuda":
        variants: dict[str, _Variant | None] = {n: _Variant(n, model, args, device, budget) for n in names}
        fns = {n: _bind(v, x, y, amp) for n, v in variants.items() if v is not None}
        repeats = args.repeats or (10 if args.full else 6)
        times = alternate(fns, repeats, warmup=2)
        mem = {n: _memory(args, n, child_argv) for n in names}
    else:  # one process per variant and round (see the module docstring)
        variants = dict.fromkeys(names)
        repeats = args.repeats or 3
        rounds = [{n: _memory(args, n, child_argv) for n in names} for _ in range(repeats)]
        times = {n: [median(r[n].get("step_s", [])) for r in rounds] for n in names}
        mem = {n: _median_memory([r[n] for r in rounds]) for n in names}
    rows = [_row(n, variants[n], times, mem[n], mem["none"]) for n in names]
    extra = {
        "model": {**SIZES[_size_name(args)], **({"seq_len": args.seq_len} if args.seq_len else {})},
        "device": str(device),
        "ours_device_budget_mib": round(budget / MiB, 1),
        "repeats": repeats,
        "disk_codec": args.codec,
        "base_step_s": round(median(times["none"]), 4),
        "wall_s": round(time.perf_counter() - started, 1),
    }
    for v in variants.values():
        if v is not None:
            v.close()
    emit("activation offload", rows, args.json, extra)
    return 0


def _median_memory(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One variant's processes over the rounds: the run of median steady RSS growth, its offload counts summed."""
    good = [r for r in runs if "error" not in r]
    if not good:
        return runs[0]
    good.sort(key=lambda r: r["peak_rss"] - r["rss_before"])
    out = dict(good[(len(good) - 1) // 2])
    counts = [r["offload"] for r in good if r.get("offload")]
    if counts:
        out["offload"] = {k: sum(c[k] for c in counts) for k in counts[0]}
        out["offload"]["lead"] = median([c["lead"] for c in counts])
    return out


def _row(
    name: str, v: _Variant | None, times: dict[str, list[float]], mem: dict[str, Any], base: dict[str, Any]
) -> dict[str, Any]:
    ratios = [a / b for a, b in zip(times[name], times["none"], strict=True)]
    row: dict[str, Any] = dict.fromkeys(_COLUMNS)
    q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    row.update(variant=name, step_x=round(median(ratios), 3), step_x_iqr=f"{q[0]:.2f}-{q[2]:.2f}")
    if "error" in mem:
        row["note"] = mem["error"][:60]
        return row
    row["resident_mib"] = round(mem["resident_bytes"] / MiB, 1)
    row["resident_pct"] = round(100 * mem["resident_bytes"] / max(1, base.get("resident_bytes", 1)), 1)
    row["peak_rss_mib"] = round(mem["peak_rss"] / MiB)
    growth = mem["peak_rss"] - mem["rss_before"]
    row["rss_growth_mib"] = round(growth / MiB)
    base_growth = base.get("peak_rss", 0) - base.get("rss_before", 0)
    row["rss_growth_pct"] = round(100 * growth / base_growth, 1) if base_growth > 0 else None
    row["step_growth_mib"] = "/".join(str(round((p - mem["rss_before"]) / MiB)) for p in mem["step_peak_rss"])
    first = mem["first_peak_rss"] - mem["first_rss_before"]
    base_first = base.get("first_peak_rss", 0) - base.get("first_rss_before", 0)
    row["first_growth_mib"] = round(first / MiB)
    row["first_growth_pct"] = round(100 * first / base_first, 1) if base_first > 0 else None
    if "faults_step" in mem:
        row["faults_k_step"] = round(mem["faults_step"] / 1000, 1)
        row["sys_s_step"] = round(mem["sys_s_step"], 3)
    if mem.get("warnings"):
        row["note"] = "; ".join(mem["warnings"])[:80]
    counts = _offload_counts(v) if v is not None else mem.get("offload") or {}
    if counts:
        steps = max(1, int(counts["steps"]))
        row["moved_mib_step"] = round(counts["moved"] / steps / MiB, 1)
        row["wait_ms_step"] = round(1000 * counts["wait_s"] / steps, 2)
        row["waits_step"] = round(counts["waits"] / steps, 1)
        row["lead_mib"] = round(counts["lead"] / MiB, 1)
    return row
