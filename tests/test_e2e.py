"""End to end: a short fine-tune and a few-shot eval of the example LM through the callback, CSV and W&B offline."""

from __future__ import annotations

import csv
import sys
from pathlib import Path
from typing import Any

import lightning as L
import pytest
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, WandbLogger

from lightning_tiercache import TierCacheCallback
from lightning_tiercache.lightning.telemetry import METRICS
from lightning_tiercache.lightning.testing import OOMInjector
from lightning_tiercache.lightning.wandb_support import EVENTS_KEY

pytest.importorskip("transformers")
wandb = pytest.importorskip("wandb")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from _common import CausalLM, CorpusDataModule  # noqa: E402

KEYS = {s.key for s in METRICS}


def keys_of(*features: str) -> set[str]:
    return {s.key for s in METRICS if s.feature in features}


def logged_keys(log_dir: str) -> set[str]:
    with open(Path(log_dir) / "metrics.csv") as f:
        return {k for r in csv.DictReader(f) for k, v in r.items() if k.startswith("tiercache/") and v != ""}


def callback(spill: Path) -> TierCacheCallback:
    return TierCacheCallback(
        device_bytes="64KiB", host_bytes="128KiB", disk_bytes="256MiB", spill_dir=str(spill),
        min_offload_bytes=4096, kv_block_tokens=16, oom_grow_back_after_steps=0,
    )  # fmt: skip


def tiny_model() -> CausalLM:
    return CausalLM(hidden_size=32, layers=2, heads=2)


def make_trainer(tmp_path: Path, cb: TierCacheCallback, loggers: list[Any], **kw: Any) -> L.Trainer:
    kw.setdefault("log_every_n_steps", 2)
    return L.Trainer(
        default_root_dir=tmp_path, accelerator="cpu", callbacks=[cb, *kw.pop("extra", [])], logger=loggers,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, **kw,
    )  # fmt: skip


@pytest.fixture
def wandb_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    yield
    wandb.finish()


@pytest.mark.timeout(300)
def test_finetune_eval_and_resume_through_the_callback(tmp_path: Path, spill_parent: Path, wandb_offline: Any) -> None:
    data = CorpusDataModule(seq_len=32, batch_size=4, max_train_batches=6)
    model = tiny_model()
    injector = OOMInjector(above_batch_size=2, phase="forward").attach(model.model.model.layers[0])
    wb = WandbLogger(project="tiercache-e2e", save_dir=str(tmp_path), offline=True)
    csv_logger = CSVLogger(tmp_path, name="fit")
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    cb = callback(spill_parent)
    trainer = make_trainer(tmp_path, cb, [csv_logger, wb], max_steps=4, limit_val_batches=1, extra=[ckpt])
    trainer.fit(model, data)
    injector.detach()

    # CSV: every logged key is documented, and every key of the parts that ran is there.
    assert logged_keys(csv_logger.log_dir) == keys_of("store", "system", "activations", "oom")
    assert cb.last_metrics["tiercache/oom/micro_batches"] == 2  # batches of 4, OOM above 2
    assert list(spill_parent.iterdir()) == []

    # W&B (offline): the live run's summary holds our summaries and the events table.
    summary = wb.experiment.summary
    assert summary["tiercache/device/peak_bytes"]["max"] > 0
    assert 0 <= summary["tiercache/hit_rate"]["min"] <= 1
    assert summary["tiercache/oom/retries"]["max"] >= 1
    assert summary[EVENTS_KEY]["_type"] == "table-file"

    # Few-shot eval with the tiered KV cache: the shared prefix is served from the store after the first batch.
    fewshot = CorpusDataModule(val_task="fewshot", batch_size=2, num_prompts=4, shots=2, answer_tokens=2)
    eval_csv = CSVLogger(tmp_path, name="eval")
    ecb = callback(spill_parent)
    make_trainer(tmp_path, ecb, [eval_csv, wb], log_every_n_steps=1).validate(model, fewshot)
    assert logged_keys(eval_csv.log_dir) == keys_of("store", "system", "oom", "kv")
    assert ecb.last_metrics["tiercache/kv/hit_tokens"] > 0
    assert summary["tiercache/kv/hit_rate"]["min"] >= 0
    assert list(spill_parent.iterdir()) == []

    # Resume: the learned split comes back from the checkpoint before the first resumed step.
    fresh = callback(spill_parent)
    seen: list[int] = []

    class Probe(L.Callback):
        def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
            seen.append(fresh.runtime.hook.train_policy.micro_batches)

    resumed = make_trainer(tmp_path, fresh, [CSVLogger(tmp_path, name="resume")], max_steps=5, extra=[Probe()])
    resumed.fit(tiny_model(), data, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert seen == [2]
    assert resumed.global_step == 5
    assert list(spill_parent.iterdir()) == []


@pytest.mark.timeout(300)
def test_the_main_jobs_oom_demo_shows_a_recovered_oom(tmp_path: Path, wandb_offline: Any, monkeypatch, capsys) -> None:
    import finetune
    import main as main_job

    monkeypatch.chdir(tmp_path)  # the example writes its runs/ folder under the working directory
    config = ["--config", str(Path(__file__).resolve().parents[1] / "configs" / "finetune.yaml")]
    demo = ["--trainer.max_steps", "2", "--trainer.limit_val_batches", "0"]
    demo += ["--trainer.enable_checkpointing", "false", "--trainer.callbacks", "null"]
    demo += ["--inject_oom_above", str(main_job.OOM_DEMO_ABOVE), "--tiercache.oom_grow_back_after_steps", "0"]
    finetune.main([*config, *demo], name="oom_demo", title="OOM recovery demo (injected OOM)")
    out = capsys.readouterr().out
    assert "OOM recovery demo (injected OOM) report" in out
    assert "injected out-of-memory errors: 1 " in out
    assert "training steps retried after an out-of-memory error: 1, now 2 micro-batches per batch" in out
