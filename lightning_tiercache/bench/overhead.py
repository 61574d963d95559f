"""Overhead of ``TierCacheCallback`` when there is nothing to offload: a plain fit vs the same fit with it.

``python -m lightning_tiercache.bench overhead`` trains MLPs whose saved activations are all below the
callback's ``min_offload_bytes`` (so the offloader has nothing to move and nothing runs out of memory) with
and without the callback at its defaults, alternating A B A B after a warm-up. Each fit records the wall time
of every step; a round's figure is the median step after the first ``--skip`` steps (a few slow steps from
other processes do not move a median), and the result is the median over rounds of the per-round ratios.
``self_us_per_step`` times the callback's own code directly (its batch hooks and the strategy hook's wrappers
minus the step they wrap): on a shared machine it is steadier than a ratio of two noisy step times. The same
timers around a callback that does nothing measure what they cost themselves (``timers_us_per_step``);
``self_share_net`` is the callback's share of the step less theirs.
What remains is the callback's fixed cost per step: settling the store, the offloader's check that the batch
still has nothing to offload, the OOM hook's snapshot of what the step logs, telemetry every
``log_every_n_steps``. Its one-off cost (opening the store, a spill folder, threads) is reported apart, from
the whole-fit times. Two workloads: a 3.5 ms step, where a fixed cost shows most, and a 20 ms step.
Target: per-step overhead within 1% of the plain run.

On a shared machine a step ratio cannot resolve 1% (fits of the same model vary by 5-15%), and the
self-time leaves out what the callback makes Lightning do (dispatching its hooks) and the interpreter's
extra allocations. ``--instructions`` counts instead: the same fits, on one thread, under valgrind's
cachegrind (repeatable to about 0.1% a step), at two lengths each, so that everything
outside the steps cancels; the figure is the callback's extra instructions per step over the plain step's. A
third variant, a ``lightning.Callback`` that overrides nothing, shows what Lightning's dispatch of the hooks
charges any callback.
Instructions are not time (Python's run at a lower rate than matrix kernels'), so it is read next to the
self-time share, not instead of it.
"""

from __future__ import annotations

import concurrent.futures as cf
import gc
import itertools
import logging
import os
import re
import shutil
import subprocess
import sys
import time
import warnings
from typing import Any

import torch

from lightning_tiercache.bench.common import base_parser, emit, median

__all__ = ["main"]


def _model(width: int, depth: int, batch: int, batches: int) -> Any:
    import lightning as L

    class MLP(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            layers: list[torch.nn.Module] = []
            for _ in range(depth):
                layers += [torch.nn.Linear(width, width), torch.nn.GELU()]
            self.net = torch.nn.Sequential(*layers, torch.nn.Linear(width, 1))
            g = torch.Generator().manual_seed(0)
            self.data = torch.randn(batches, batch, width, generator=g)

        def training_step(self, x: torch.Tensor, batch_idx: int) -> torch.Tensor:
            loss = self.net(x[0] if isinstance(x, list | tuple) else x).square().mean()
            self.log("loss", loss)
            return loss

        def train_dataloader(self) -> Any:
            return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(self.data), batch_size=None)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=1e-3)

    return MLP


def _fit(
    model_cls: Any, steps: int, variant: str, clock: Any = time.perf_counter, accelerator: str = "auto"
) -> tuple[float, list[float]]:
    """Whole-fit seconds and the seconds of each step (batch start to the next batch start) on ``clock``.

    ``variant``: ``"plain"``, ``"empty"`` (a ``lightning.Callback`` that overrides nothing) or ``"callback"``
    (``TierCacheCallback()``)."""
    import lightning as L

    from lightning_tiercache.lightning.callback import TierCacheCallback

    starts: list[float] = []

    class Clock(L.Callback):
        def on_train_batch_start(self, *args: Any) -> None:
            starts.append(clock())

        def on_train_end(self, *args: Any) -> None:
            starts.append(clock())

    torch.manual_seed(0)
    callbacks: list[L.Callback] = [Clock()]
    if variant == "empty":
        callbacks.append(L.Callback())
    elif variant == "callback":
        callbacks.append(TierCacheCallback())
    elif variant != "plain":
        raise ValueError(f"variant={variant!r} must be 'plain', 'empty' or 'callback'")
    trainer = L.Trainer(
        accelerator=accelerator, devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
    )  # fmt: skip
    model = model_cls()
    start = clock()
    trainer.fit(model)
    total = clock() - start
    return total, [b - a for a, b in itertools.pairwise(starts)]


def _self_time(model_cls: Any, steps: int, skip: int, control: bool = False) -> tuple[float, float]:
    """Seconds per step spent in the callback's own code (its batch hooks and the strategy hook's wrappers
    minus the training step and backward they call), and that time over the same fit's median step, which
    cancels a shared machine's changing speed. Timers wrap each piece, so both are upper bounds.

    ``control``: the same timers around a callback that does nothing: what the timers themselves cost."""
    import lightning as L

    from lightning_tiercache.lightning.callback import TierCacheCallback

    base: Any = L.Callback if control else TierCacheCallback

    spent = {"self": 0.0, "steps": 0}
    starts: list[float] = []

    def timed(fn: Any, sign: float) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                if spent["steps"] > skip:
                    spent["self"] += sign * (time.perf_counter() - start)

        return call

    class Timed(base):
        def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
            s = trainer.strategy
            s.training_step, s.backward = timed(s.training_step, -1.0), timed(s.backward, -1.0)  # type: ignore[method-assign]
            super().setup(trainer, pl_module, stage)
            s.training_step, s.backward = timed(s.training_step, 1.0), timed(s.backward, 1.0)  # type: ignore[method-assign]

        def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
            super().teardown(trainer, pl_module, stage)
            for name in ("training_step", "backward"):
                vars(trainer.strategy).pop(name, None)

        def on_train_batch_start(self, *args: Any) -> None:
            starts.append(time.perf_counter())
            spent["steps"] += 1
            timed(super().on_train_batch_start, 1.0)(*args)

        def on_train_batch_end(self, *args: Any) -> None:
            timed(super().on_train_batch_end, 1.0)(*args)

    trainer = L.Trainer(
        accelerator="auto", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[Timed()],
    )  # fmt: skip
    trainer.fit(model_cls())
    own = spent["self"] / max(1, spent["steps"] - skip - 1)
    return own, own / median([b - a for a, b in itertools.pairwise(starts[skip:])])


def _workload(width: int, depth: int, batch: int, steps: int, repeats: int, skip: int, clock: Any) -> dict[str, Any]:
    model_cls = _model(width, depth, batch, steps)
    variants = ("plain", "callback")
    for variant in variants:  # warm-up round
        _fit(model_cls, steps, variant, clock)
    step: dict[str, list[float]] = {k: [] for k in variants}
    total: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(repeats):
        for variant in variants:
            t, per_step = _fit(model_cls, steps, variant, clock)
            total[variant].append(t)
            step[variant].append(median(per_step[skip:]))
    ratios = [c / p for p, c in zip(step["plain"], step["callback"], strict=True)]
    fit_ratios = [c / p for p, c in zip(total["plain"], total["callback"], strict=True)]
    plain_step = median(step["plain"])
    own = [_self_time(model_cls, steps, skip) for _ in range(5)]
    timers = [_self_time(model_cls, steps, skip, control=True) for _ in range(3)]
    return {
        "workload": f"MLP {width} x {depth}, batch {batch}",
        "plain_step_ms": plain_step * 1e3,
        "step_ratio": median(ratios),
        "fixed_us_per_step": (median(step["callback"]) - plain_step) * 1e6,
        "self_us_per_step": median([t for t, _ in own]) * 1e6,
        "self_share": median([share for _, share in own]),
        "timers_us_per_step": median([t for t, _ in timers]) * 1e6,
        "self_share_net": median([share for _, share in own]) - median([share for _, share in timers]),
        "fit_ratio": median(fit_ratios),
        "one_off_ms": (median(total["callback"]) - median(total["plain"])) * 1e3,
    }


def count_fit(width: int, depth: int, batch: int, steps: int, variant: str) -> None:
    """One fit on one CPU thread: what :func:`_instructions` runs under valgrind.

    The objects of the imports are frozen out of the garbage collector first: a full collection walks all of
    them, and whether one falls inside the counted steps would move the per-step figure by more than the callback.
    """
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
        model_cls = _model(width, depth, batch, steps)
        gc.collect()
        gc.freeze()
        _fit(model_cls, steps, variant, accelerator="cpu")


_IREFS = re.compile(r"I\s+refs:\s+([\d,]+)")


def _count(width: int, depth: int, batch: int, steps: int, variant: str) -> int:
    """Instructions a whole process with one such fit executes (valgrind's cachegrind, no cache simulation)."""
    code = (
        "from lightning_tiercache.bench.overhead import count_fit; "
        f"count_fit({width}, {depth}, {batch}, {steps}, {variant!r})"
    )
    tool = ["valgrind", "--tool=cachegrind", "--cache-sim=no", "--cachegrind-out-file=/dev/null"]
    cmd = [*tool, sys.executable, "-c", code]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    found = _IREFS.findall(done.stderr)
    if done.returncode != 0 or not found:
        raise RuntimeError(f"valgrind fit failed (exit {done.returncode}):\n{done.stderr[-2000:]}")
    return int(found[-1].replace(",", ""))


def _instructions(width: int, depth: int, batch: int, short: int, long: int) -> dict[str, Any]:
    """Instructions per step, plain, with an empty Lightning callback and with ours: fits of ``short`` and
    ``long`` steps of each, differenced (start-up, imports and one-off work cancel). The empty callback is the
    reference for what Lightning's dispatch charges any callback."""
    variants = ("plain", "empty", "callback")
    jobs = [(variant, steps) for steps in (long, short) for variant in variants]  # the long fits start first
    counts: dict[tuple[str, int], int] = {}
    started = time.perf_counter()
    with cf.ThreadPoolExecutor(max(1, min(len(jobs), os.cpu_count() or 1))) as pool:
        futures = {pool.submit(_count, width, depth, batch, steps, v): (v, steps) for v, steps in jobs}
        for fut in cf.as_completed(futures):
            variant, steps = futures[fut]
            counts[(variant, steps)] = fut.result()
            print(
                f"  counted {variant} x {steps} steps: {counts[(variant, steps)]:,} "
                f"({len(counts)}/{len(jobs)}, {time.perf_counter() - started:.0f} s)",
                file=sys.stderr, flush=True,
            )  # fmt: skip
    plain, empty, callback = ((counts[(v, long)] - counts[(v, short)]) / (long - short) for v in variants)
    return {
        "workload": f"MLP {width} x {depth}, batch {batch}, 1 thread",
        "plain_instr_per_step": round(plain),
        "callback_instr_per_step": round(callback),
        "extra_instr_per_step": round(callback - plain),
        "extra_share": callback / plain - 1.0,
        "empty_extra_instr_per_step": round(empty - plain),
        "empty_extra_share": empty / plain - 1.0,
        "one_off_instr": counts[("callback", short)] - counts[("plain", short)] - round(short * (callback - plain)),
    }


def main(argv: list[str]) -> int:
    p = base_parser("overhead", __doc__.splitlines()[0] if __doc__ else "")
    p.add_argument(
        "--steps", type=int, default=None,
        help="optimizer steps per fit (200); with --instructions, steps between the two counted fits (50)",
    )  # fmt: skip
    p.add_argument(
        "--skip", type=int, default=20,
        help="first steps of each fit left out of its median step; with --instructions, the shorter fit's steps",
    )  # fmt: skip
    p.add_argument("--width", type=int, default=None, help="one workload of this width instead of the two")
    p.add_argument("--depth", type=int, default=8)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall time, or CPU time of the process (all threads; not the time a shared VM's core spends elsewhere)",
    )
    p.add_argument(
        "--instructions",
        action="store_true",
        help="count instructions per step under valgrind instead of timing (about 15 minutes on 2 cores)",
    )
    args = p.parse_args(argv)
    if args.instructions:
        if shutil.which("valgrind") is None:
            p.error("--instructions needs valgrind on PATH (Debian and Ubuntu: apt install valgrind)")
        short = args.skip
        long = short + (args.steps or 50)
        rows = [_instructions(args.width or 256, args.depth, args.batch or 48, short, long)]
        extra = {
            "method": f"valgrind cachegrind, 1 thread, fits of {short} and {long} steps differenced",
            "target": "extra_share <= 0.01",
        }
        emit("overhead: instructions per step, nothing to offload", rows, args.json, extra)
        return 0
    steps = args.steps or 200
    repeats = args.repeats or 7
    if args.width:
        shapes = [(args.width, args.batch or 48)]
    elif args.full:
        shapes = [(2048, 32)]
    else:  # 48 x 256 x 4 bytes = 48 KiB and 12 x 1024 x 4 = 48 KiB: below the default 64 KiB minimum
        shapes = [(256, 48), (1024, 12)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
        clock = time.perf_counter if args.clock == "wall" else time.process_time
        rows = [_workload(w, args.depth, b, steps, repeats, args.skip, clock) for w, b in shapes]
    extra = {
        "method": (
            f"{args.clock} clock, {steps} steps per fit, median step after the first {args.skip}, "
            f"median of {repeats} paired rounds"
        ),
        "target": "step_ratio <= 1.01 (self_share_net <= 0.01)",
    }
    emit("overhead: nothing to offload", rows, args.json, extra)
    return 0
