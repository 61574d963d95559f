"""OOM recovery benchmark: throughput after recovery vs a hand-configured micro-batch loop, and memory flatness.

``python -m lightning_tiercache.bench oom [--json] [--full] [--repeats N]``

* Throughput: OOM is injected above a batch-size threshold, so the runner learns the split (counting the
  failed attempts); afterwards it is timed against a hand-written loop that splits the same batch into the
  same micro-batches, same model and data, alternating A B A B. Target ratio >= 0.95.
* Memory: 100 forced recoveries (a fresh policy each step, so every step fails twice before it fits); on CUDA
  ``memory_allocated`` before and after, on CPU the process RSS. Must be flat.
"""

from __future__ import annotations

import gc
from typing import Any

import psutil
import torch
from torch import nn

from lightning_tiercache.bench.common import alternate, base_parser, emit, median
from lightning_tiercache.lightning.testing import OOMInjector
from lightning_tiercache.oom.microbatch import MicroBatchRunner
from lightning_tiercache.oom.recovery import MicroBatchPolicy, OOMConfig
from lightning_tiercache.oom.split import split_batch


def _model(width: int, device: torch.device) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, 2 * width), nn.GELU(), nn.Linear(2 * width, 1)
    ).to(device)


def _memory(device: torch.device) -> int:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        return int(torch.cuda.memory_allocated(device))
    return int(psutil.Process().memory_info().rss)


def main(argv: list[str]) -> int:
    p = base_parser("oom", __doc__ or "")
    p.add_argument("--recoveries", type=int, default=100)
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    width, batch_size, threshold = (1024, 256, 64) if args.full else (256, 128, 32)
    repeats = args.repeats or (20 if args.full else 15)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, width, generator=g).to(device)
    y = torch.randn(batch_size, 1, generator=g).to(device)

    net = _model(width, device)
    params = list(net.parameters())
    opt = torch.optim.SGD(params, lr=1e-3)
    injector = OOMInjector(above_batch_size=threshold).attach(net[0])
    config = OOMConfig(grow_back_after_steps=0)
    policy = MicroBatchPolicy(config)
    runner = MicroBatchRunner(config, policy, device=device)

    def micro_step(part: Any, scale: float) -> torch.Tensor:
        mx, my = part
        loss = nn.functional.mse_loss(net(mx), my)
        (loss if scale == 1.0 else loss * scale).backward()
        return loss.detach()

    first = runner.run_train((x, y), micro_step, params)
    opt.step()
    opt.zero_grad()
    learned = policy.micro_batches

    def recovered() -> None:
        runner.run_train((x, y), micro_step, params)
        opt.step()
        opt.zero_grad()

    def hand() -> None:
        for mx, my in split_batch((x, y), learned):
            loss = nn.functional.mse_loss(net(mx), my) * (len(mx) / batch_size)
            loss.backward()
        opt.step()
        opt.zero_grad()

    times = alternate({"hand_micro_batches": hand, "recovered": recovered}, repeats=repeats, warmup=2)
    ratio = median(times["hand_micro_batches"]) / median(times["recovered"])

    forced = 0
    before = 0
    for i in range(args.recoveries // 2 + 5):
        if i == 5:  # warm-up steps first, so allocator and caches reached their steady state
            before, forced = _memory(device), 0
        fresh = MicroBatchRunner(config, MicroBatchPolicy(config), device=device)
        res = fresh.run_train((x, y), micro_step, params)
        forced += res.attempts - 1
        opt.zero_grad()
    after = _memory(device)
    injector.detach()

    rows = [
        {
            "batch": batch_size,
            "oom_above": threshold,
            "learned_micro_batches": learned,
            "failed_attempts": first.attempts - 1,
            "throughput_ratio": ratio,
            "target": ">= 0.95",
            "hand_step_ms": median(times["hand_micro_batches"]) * 1e3,
            "recovered_step_ms": median(times["recovered"]) * 1e3,
        }
    ]
    unit = "cuda memory_allocated" if device.type == "cuda" else "process RSS"
    extra = {
        "forced_recoveries": forced,
        "memory": f"{unit} before {before / 2**20:.1f} MiB, after {after / 2**20:.1f} MiB, "
        f"growth {(after - before) / 2**20:+.2f} MiB",
    }
    emit("oom recovery", rows, args.json, extra)
    return 0
