"""2-process CPU DDP: the ranks' machine-sized host and disk budgets add up to one node's share, not one each."""

from __future__ import annotations

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
    from lightning_tiercache import TierCacheCallback
    from lightning_tiercache.store.budgets import NODE_SHARE, host_free_bytes
    from lightning_tiercache.store.tiers import Tier

    out, spill = sys.argv[1], sys.argv[2]

    class Record(L.Callback):
        def on_train_start(self, trainer, pl_module):
            import shutil
            budgets = cb.runtime.store.budgets
            row = {
                "host": budgets[Tier.HOST], "disk": budgets[Tier.DISK],
                "host_share": NODE_SHARE * host_free_bytes(), "disk_share": NODE_SHARE * shutil.disk_usage(spill).free,
            }
            with open(f"{out}/rank{trainer.global_rank}.json", "w") as f:
                json.dump(row, f)

    cb = TierCacheCallback(spill_dir=spill)
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_steps=1, limit_val_batches=0, logger=False,
        callbacks=[cb, Record()], enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(BoringModel())
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    """
)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_two_ranks_share_one_node_budget(tmp_path: Path) -> None:
    script = tmp_path / "ddp_budgets.py"
    script.write_text(SCRIPT)
    spill = tmp_path / "spill"
    spill.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE")}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path), str(spill)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=110,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    # Each rank measured the node's share itself; the budgets of both together must fit the larger one.
    assert sum(r["host"] for r in rows) <= max(r["host_share"] for r in rows) * 1.02
    assert sum(r["disk"] for r in rows) <= max(r["disk_share"] for r in rows) * 1.02
    assert min(r["host"] for r in rows) > 0 and min(r["disk"] for r in rows) > 0
