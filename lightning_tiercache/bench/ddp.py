"""Per-step cost of ``TierCacheCallback()`` under DDP with nothing running out of memory.

``python -m lightning_tiercache.bench ddp`` launches 2 CPU processes (gloo, Lightning's "launched externally"
mode, one thread each) per variant: a plain fit, and the same fit with ``TierCacheCallback()`` at its defaults.
Each pair of processes is fresh, and the variants rotate (each goes first, second and third in turn). Rank 0
records the wall time of every step (``on_train_batch_end`` to the next); a round's figure is the median step
after ``--warmup-steps``, and the result is the median over rounds of variant / plain. The ``control`` variant is
a second plain fit: its ratio (1 on a quiet machine) shows how much of a ratio is the machine's noise.

Three workloads run in each pair of processes:

- ``mlp``: a 6-layer, 768-wide MLP at batch 32 (about 40 ms a step on 2 cores of a 2026 VM), where DDP's
  bucketed all-reduce overlaps backward. Target: at most 1.03x.
- ``buffer``: the same MLP keeping a 256 MiB queue buffer that it writes into in place every step (MoCo).
  DDP runs with ``broadcast_buffers=False`` as such a per-rank queue would (else both variants broadcast the
  256 MiB every step). Target: at most 1.02x: the callback never copies a buffer that large per step.
- ``buffer_small``: the queue on a 2-layer, 64-wide MLP (a few ms a step): no target; its difference to plain
  is the callback's fixed per-step cost under DDP, in ms, which the 40 ms steps above hide in noise.

What the callback adds per step on the happy path: the snapshot of what the step logs and of small buffers,
the store's settle at the batch boundary, the offloader's check, and under DDP the OOM agreement: three
integers all-reduced after backward, or inside DDP's last gradient bucket for small gradients (``buffer_small``;
Note: [where the flag rides] in ``oom/ddp.py``); at
each ``log_every_n_steps`` step (none within the default 30 steps) one reduce of the telemetry values, logged
only once the library did something.

Defaults (3 rounds x 3 variants, 30 steps): 9 pairs of fresh processes, a few minutes on 2 idle cores.
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from lightning_tiercache.bench.common import base_parser, emit, median

__all__ = ["main"]

WORKLOADS = ("mlp", "buffer", "buffer_small")
VARIANTS = ("plain", "callback", "control")  # control: a second plain fit
_TARGETS: dict[str, Any] = {"mlp": 1.03, "buffer": 1.02, "buffer_small": "none (fixed cost)"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _module(workload: str, full: bool) -> Any:
    import lightning as L

    class Net(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            width, depth = (64, 2) if workload == "buffer_small" else (768, 6)
            width = width * 2 if full else width
            layers: list[torch.nn.Module] = []
            for _ in range(depth):
                layers += [torch.nn.Linear(width, width), torch.nn.GELU()]
            self.net = torch.nn.Sequential(*layers, torch.nn.Linear(width, 1))
            self.width: int = width
            if workload.startswith("buffer"):
                self.register_buffer("queue", torch.zeros(64 * 2**20))  # 256 MiB of float32
                self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            (x,) = batch
            loss = self.net(x).pow(2).mean()
            if workload.startswith("buffer"):
                queue, ptr = self.get_buffer("queue"), self.get_buffer("ptr")
                with torch.no_grad():
                    queue[int(ptr) % queue.numel()] = loss.detach()
                    ptr += 1
            return loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=1e-3)

    return Net()


def _worker(variant: str, workload: str, steps: int, full: bool, out: Path, spill: str) -> None:
    import lightning as L
    from lightning.pytorch.strategies import DDPStrategy

    from lightning_tiercache.lightning.callback import TierCacheCallback

    module = _module(workload, full)
    data = torch.utils.data.TensorDataset(torch.randn(32 * 2 * steps, module.width))
    loader = torch.utils.data.DataLoader(data, batch_size=32)
    stamps: list[float] = []

    class Stamp(L.Callback):
        def on_train_batch_end(self, *args: Any, **kwargs: Any) -> None:
            stamps.append(time.perf_counter())

    callbacks: list[Any] = [Stamp()]  # plain and control: no TierCacheCallback
    if variant == "callback":
        callbacks.append(TierCacheCallback(spill_dir=spill))
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy=DDPStrategy(broadcast_buffers=not workload.startswith("buffer")),
        max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=callbacks,
    )  # fmt: skip
    trainer.fit(module, loader)
    if trainer.is_global_zero:
        out.write_text(json.dumps([b - a for a, b in itertools.pairwise(stamps)]))


def _launch(variant: str, steps: int, full: bool, tmp: Path, tag: str) -> dict[str, list[float]]:
    """One fresh pair of processes running every workload for ``variant``; rank 0's step times per workload."""
    port = _free_port()
    procs = []
    for rank in (0, 1):
        env = {
            **os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2",
            "NODE_RANK": "0", "LOCAL_RANK": str(rank), "RANK": str(rank), "OMP_NUM_THREADS": "1",
        }  # fmt: skip
        cmd = [sys.executable, "-m", "lightning_tiercache.bench.ddp", "--worker", variant, str(steps), str(tmp), tag]
        if full:
            cmd.append("--full")
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=900)[0] for p in procs]
    if any(p.returncode != 0 for p in procs):
        raise RuntimeError("bench ddp: a worker failed:\n" + "\n".join(log[-2000:] for log in logs))
    return {w: json.loads((tmp / f"{tag}-{w}.json").read_text()) for w in WORKLOADS}


def _worker_main(argv: list[str]) -> int:
    variant, steps, tmp, tag = argv[0], int(argv[1]), Path(argv[2]), argv[3]
    full = "--full" in argv
    import torch.distributed as dist

    for workload in WORKLOADS:
        _worker(variant, workload, steps, full, tmp / f"{tag}-{workload}.json", str(tmp))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "--worker":
        return _worker_main(args[1:])
    p = base_parser("ddp", __doc__.splitlines()[0] if __doc__ else "")
    p.add_argument("--steps", type=int, default=30, help="training steps per fit")
    p.add_argument("--warmup-steps", type=int, default=8, help="steps left out of each fit's median")
    opts = p.parse_args(args)
    rounds = opts.repeats or 3
    times: dict[tuple[str, str], list[float]] = {}
    ratios: dict[tuple[str, str], list[float]] = {}
    deltas: dict[tuple[str, str], list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="tiercache-bench-ddp-") as tmp:
        for r in range(rounds):
            order = VARIANTS[r % 3 :] + VARIANTS[: r % 3]  # each variant goes first, second and third in turn
            got = {v: _launch(v, opts.steps, opts.full, Path(tmp), f"{r}-{v}") for v in order}
            for w in WORKLOADS:
                step = {v: median(got[v][w][opts.warmup_steps :]) for v in VARIANTS}
                for v in VARIANTS:
                    times.setdefault((w, v), []).append(step[v])
                    ratios.setdefault((w, v), []).append(step[v] / step["plain"])
                    deltas.setdefault((w, v), []).append(step[v] - step["plain"])
    rows = [
        {
            "workload": w,
            "variant": v,
            "plain_ms": median(times[(w, "plain")]) * 1e3,
            "variant_ms": median(times[(w, v)]) * 1e3,
            "ratio_median": median(ratios[(w, v)]),
            "delta_ms": median(deltas[(w, v)]) * 1e3,  # per round: variant's median step - plain's
            "ratios": " ".join(f"{x:.3f}" for x in ratios[(w, v)]),
            "target": _TARGETS[w] if v == "callback" else "1 (noise)",
        }
        for w in WORKLOADS
        for v in VARIANTS[1:]
    ]
    emit(
        "ddp: 2 gloo processes, plain vs TierCacheCallback() (no OOM) and plain vs plain (control)",
        rows, opts.json, {"rounds": rounds, "steps": opts.steps, "warmup_steps": opts.warmup_steps},
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
