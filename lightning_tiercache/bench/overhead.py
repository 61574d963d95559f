"""Overhead of ``TierCacheCallback`` when there is nothing to offload: a plain fit vs the same fit with it.

``python -m lightning_tiercache.bench overhead`` trains an MLP whose saved activations are all below the
callback's ``min_offload_bytes`` (so the offloader has nothing to move and nothing runs out of memory) with
and without the callback at its defaults, alternating A B A B after a warm-up, and reports the median
ratio of fit times. What remains is the callback's fixed cost: settling the store at batch boundaries,
entering the offload hooks, the OOM strategy hook's wrapper, telemetry every ``log_every_n_steps`` and the
progress-bar summary. Target: within 1% of the plain run.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from lightning_tiercache.bench.common import alternate, base_parser, emit, median

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


def _fit(model_cls: Any, steps: int, with_callback: bool) -> None:
    import lightning as L

    from lightning_tiercache.callback import TierCacheCallback

    torch.manual_seed(0)
    callbacks: list[L.Callback] = [TierCacheCallback()] if with_callback else []
    trainer = L.Trainer(
        accelerator="auto", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
    )  # fmt: skip
    trainer.fit(model_cls())


def main(argv: list[str]) -> int:
    p = base_parser("overhead", __doc__.splitlines()[0] if __doc__ else "")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per fit")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--depth", type=int, default=None)
    p.add_argument("--batch", type=int, default=None)
    args = p.parse_args(argv)
    width = args.width or (2048 if args.full else 256)
    depth = args.depth or 8
    batch = args.batch or (32 if args.full else 48)  # 48 x 256 x 4 bytes = 48 KiB < the default 64 KiB minimum
    steps = args.steps or (300 if args.full else 150)
    repeats = args.repeats or 7
    model_cls = _model(width, depth, batch, steps)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import logging

        logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
        times = alternate(
            {"plain": lambda: _fit(model_cls, steps, False), "callback": lambda: _fit(model_cls, steps, True)},
            repeats=repeats,
        )
    plain, cb = median(times["plain"]), median(times["callback"])
    ratios = [c / p for p, c in zip(times["plain"], times["callback"], strict=True)]
    rows = [
        {"variant": "plain fit", "median_s": plain, "ratio": 1.0},
        {"variant": "TierCacheCallback() defaults", "median_s": cb, "ratio": cb / plain},
    ]
    extra = {
        "workload": f"MLP width {width} x depth {depth}, batch {batch}, {steps} steps per fit, {repeats} rounds",
        "median of per-round ratios": round(median(ratios), 4),
        "target": "<= 1.01",
    }
    emit("overhead: nothing to offload", rows, args.json, extra)
    return 0
