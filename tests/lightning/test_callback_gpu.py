"""TierCacheCallback on one CUDA device: under FSDP, and a plain fit with activation offload, bit for bit.

Run with ``pytest -m gpu tests/lightning/test_callback_gpu.py`` on a machine with a CUDA device.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from lightning_tiercache.lightning.callback import TierCacheCallback

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


class Wide(L.LightningModule):
    """An MLP whose 16 x 1024 fp32 activations (64 KiB) pass ``min_offload_bytes`` and overflow a 64 KiB tier."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(64, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 1024), torch.nn.ReLU(),
            torch.nn.Linear(1024, 1),
        )  # fmt: skip
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(128, 64, generator=g), torch.randn(128, generator=g)
        self.losses: list[torch.Tensor] = []

    def _loss(self, batch: Any) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x).squeeze(-1), y)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.losses.append(loss.detach().clone())
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", self._loss(batch))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def _loader(self) -> torch.utils.data.DataLoader[Any]:
        ds = torch.utils.data.TensorDataset(self.x, self.y)
        return torch.utils.data.DataLoader(ds, batch_size=16, pin_memory=True)

    def train_dataloader(self) -> torch.utils.data.DataLoader[Any]:
        return self._loader()

    def val_dataloader(self) -> torch.utils.data.DataLoader[Any]:
        return self._loader()


def make_callback(spill: Path, **kw: Any) -> TierCacheCallback:
    kw.setdefault("device_bytes", "64KiB")  # activations go past the device tier: to host, then disk
    kw.setdefault("host_bytes", "256KiB")
    kw.setdefault("disk_bytes", "64MiB")
    kw.setdefault("min_offload_bytes", 1024)
    return TierCacheCallback(spill_dir=str(spill), **kw)


def make_trainer(tmp_path: Path, callbacks: list[Any], **kw: Any) -> L.Trainer:
    kw.setdefault("logger", False)
    return L.Trainer(
        default_root_dir=tmp_path, accelerator="cuda", devices=1, callbacks=callbacks, max_steps=6,
        limit_val_batches=2, num_sanity_val_steps=0, enable_checkpointing=False, enable_model_summary=False,
        enable_progress_bar=False, **kw,
    )  # fmt: skip


@pytest.fixture
def own_process_group() -> Iterator[None]:
    """FSDP on one device still starts a (one-rank) process group in this process: end it and its env after."""
    env = dict(os.environ)
    yield
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    os.environ.clear()
    os.environ.update(env)


@pytest.mark.timeout(300)
def test_fsdp_fit_on_one_gpu_logs_and_cleans_up(tmp_path: Path, spill_parent: Path, own_process_group: None) -> None:
    cb = make_callback(spill_parent, log_every_n_steps=1)
    logger = CSVLogger(tmp_path)
    t = make_trainer(tmp_path, [cb], strategy="fsdp", logger=logger)
    strategy = t.strategy
    t.fit(Wide())
    assert t.state.finished and t.global_step == 6
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    tc = [r for r in rows if r.get("tiercache/ranks")]
    assert tc and {float(r["tiercache/ranks"]) for r in tc} == {1.0}

    def logged(key: str) -> list[float]:
        return [float(r[key]) for r in tc if r.get(key)]

    assert logged("tiercache/activations/offloaded_bytes") and max(logged("tiercache/activations/offloaded_bytes")) > 0
    assert logged("tiercache/device_memory/allocated_bytes")
    # FSDP's convert_input rebuilds the batch's tuple; its tensors are the ones copied ahead.
    assert cb.copier is not None and cb.copier.stats()["matched"] > 0
    assert cb.store is None and list(spill_parent.iterdir()) == []  # the rank's spill folder is gone
    assert not {"training_step", "backward", "batch_to_device"} & set(vars(strategy))


@pytest.mark.timeout(300)
def test_single_gpu_fit_with_activation_offload_is_bit_identical(tmp_path: Path, spill_parent: Path) -> None:
    L.seed_everything(0)
    plain = Wide()
    make_trainer(tmp_path, []).fit(plain)
    L.seed_everything(0)
    model = Wide()
    cb = make_callback(spill_parent)
    make_trainer(tmp_path, [cb]).fit(model)
    assert cb.last_metrics["tiercache/activations/offloaded_bytes"] > 0
    assert len(model.losses) == len(plain.losses) == 6
    assert torch.equal(torch.stack(model.losses), torch.stack(plain.losses))
    for a, b in zip(model.parameters(), plain.parameters(), strict=True):
        assert torch.equal(a, b)
    assert list(spill_parent.iterdir()) == []
