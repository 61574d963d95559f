"""2-process CPU DDP (gloo): a fit with the callback completes and logs metrics reduced across ranks, once."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SCRIPT = textwrap.dedent(
    """
    import json
    import sys
    import lightning as L
    import torch
    from lightning.pytorch.demos.boring_classes import BoringModel
    from lightning.pytorch.loggers import CSVLogger
    from lightning_tiercache import TierCacheCallback

    class Wide(BoringModel):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Sequential(torch.nn.Linear(32, 256), torch.nn.ReLU(), torch.nn.Linear(256, 2))

    class Events(L.Callback):  # rank 1 adds a fake OOM event; rank 0 keeps a W&B bridge on a fake logger
        bridge = None

        def on_train_start(self, trainer, pl_module):
            if trainer.is_global_zero:
                from lightning_tiercache.lightning.wandb_support import WandbBridge

                class Experiment:
                    def define_metric(self, *args, **kwargs): pass
                    def log(self, *args, **kwargs): pass

                class FakeWandbLogger:
                    experiment = Experiment()

                Events.bridge = cb._wandb = WandbBridge(FakeWandbLogger())

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_rank == 1 and batch_idx == 0:
                cb.runtime.hook.events.append({"time": 0.0, "event": "fake", "detail": "from rank 1"})

    out, spill = sys.argv[1], sys.argv[2]
    cb = TierCacheCallback(device_bytes="1KiB", host_bytes="1KiB", disk_bytes="64MiB", spill_dir=spill,
                           min_offload_bytes=512, log_every_n_steps=2)
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_steps=4, limit_val_batches=0, logger=CSVLogger(out),
        callbacks=[cb, Events()],
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(Wide())
    if trainer.is_global_zero:
        with open(f"{out}/events.json", "w") as f:
            json.dump(Events.bridge.rows, f)
    if torch.distributed.is_initialized():  # before exit: gloo's threads otherwise race the interpreter exit
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    """
)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_two_process_ddp_fit_logs_reduced_metrics_once(tmp_path: Path) -> None:
    script = tmp_path / "ddp_fit.py"
    script.write_text(SCRIPT)
    spill = tmp_path / "spill"
    spill.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "logs"), str(spill)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=110,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    (metrics,) = (tmp_path / "logs").rglob("metrics.csv")  # rank zero alone wrote
    with open(metrics) as f:
        rows = [r for r in csv.DictReader(f) if r.get("tiercache/ranks")]
    assert [r["step"] for r in rows] == ["1", "3"]  # one row per logging step, not one per rank
    for r in rows:
        assert float(r["tiercache/ranks"]) == 2.0  # summed over both ranks
    last = rows[-1]
    assert float(last["tiercache/activations/offloaded_bytes"]) > 0  # summed over ranks
    assert float(last["tiercache/host_ram/rss_bytes"]) > 0
    assert list(spill.iterdir()) == []
    # Rank 0's W&B events table holds both ranks' events, each with its own rank.
    events = json.loads((tmp_path / "logs" / "events.json").read_text())
    assert [r[:5] for r in events if r[4] == "from rank 1"] == [[1, 1, "oom", "fake", "from rank 1"]]
