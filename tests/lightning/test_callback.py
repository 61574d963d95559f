from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.demos.boring_classes import BoringModel, RandomDataset
from lightning.pytorch.loggers import CSVLogger

from lightning_tiercache import TierCacheCallback
from lightning_tiercache.lightning.runtime import batch_input_ids
from lightning_tiercache.lightning.telemetry import METRICS
from lightning_tiercache.lightning.testing import OOMInjector

KEYS = {s.key for s in METRICS}


def keys_of(*features: str) -> set[str]:
    return {s.key for s in METRICS if s.feature in features}


def make_callback(spill: Path, **kw: Any) -> TierCacheCallback:
    kw.setdefault("device_bytes", "64KiB")
    kw.setdefault("host_bytes", "256KiB")
    kw.setdefault("disk_bytes", "64MiB")
    kw.setdefault("min_offload_bytes", 1024)
    return TierCacheCallback(spill_dir=str(spill), **kw)


def trainer(tmp_path: Path, cb: TierCacheCallback, **kw: Any) -> L.Trainer:
    kw.setdefault("max_steps", 4)
    kw.setdefault("log_every_n_steps", 2)
    kw.setdefault("enable_progress_bar", False)
    return L.Trainer(
        default_root_dir=tmp_path, callbacks=[cb, *kw.pop("extra", [])], logger=CSVLogger(tmp_path),
        enable_checkpointing=False, enable_model_summary=False,
        limit_val_batches=2, num_sanity_val_steps=0, accelerator="cpu", **kw,
    )  # fmt: skip


def rows(t: L.Trainer) -> list[dict[str, str]]:
    with open(Path(t.logger.log_dir) / "metrics.csv") as f:
        return list(csv.DictReader(f))


class Wide(BoringModel):
    """BoringModel with activations big enough to pass min_offload_bytes and spill past a 16 KiB device tier."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Sequential(torch.nn.Linear(32, 512), torch.nn.ReLU(), torch.nn.Linear(512, 2))

    def train_dataloader(self) -> Any:
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(64, 32)), batch_size=16)

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        return super().training_step(batch[0], batch_idx)


def test_bad_arguments_fail_at_construction_naming_the_argument(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="device_bytes='lots' is not a size"):
        TierCacheCallback(device_bytes="lots")
    with pytest.raises(ValueError, match="log_every_n_steps=0 must be an int >= 1"):
        TierCacheCallback(log_every_n_steps=0)
    with pytest.raises(ValueError, match="loss_reduction must be one of"):
        TierCacheCallback(oom_loss_reduction="median")
    with pytest.raises(ValueError, match="offload_idle_probe_every=-1 must be an int >= 0"):
        TierCacheCallback(offload_idle_probe_every=-1)
    with pytest.raises(ValueError, match=r"^kv_quant='int3' is not one of none, int8, int4"):
        TierCacheCallback(kv_quant="int3")
    with pytest.raises(ValueError, match=r"^oom_loss_reduction must be one of"):
        TierCacheCallback(oom_loss_reduction="median")
    with pytest.raises(ValueError, match=r"^host_bytes='-1GiB' must be >= 0 bytes"):
        TierCacheCallback(host_bytes="-1GiB")
    with pytest.raises(ValueError, match=r"^log_metrics='no' must be True or False"):
        TierCacheCallback(log_metrics="no")  # type: ignore[arg-type]


def test_get_finds_the_callback_or_says_how_to_add_it(tmp_path: Path, spill_parent: Path) -> None:
    cb = make_callback(spill_parent)
    assert TierCacheCallback.get(trainer(tmp_path, cb)) is cb
    with pytest.raises(LookupError, match=r"add one: Trainer\(callbacks=\[TierCacheCallback\(\)\]\)"):
        TierCacheCallback.get(L.Trainer(logger=False, enable_checkpointing=False))


def test_fit_logs_documented_keys_every_n_steps_and_cleans_up(tmp_path: Path, spill_parent: Path) -> None:
    cb = make_callback(spill_parent, device_bytes="16KiB", host_bytes="16KiB")  # 32 KiB activations: to disk
    t = trainer(tmp_path, cb)
    strategy = t.strategy
    t.fit(Wide())
    logged = rows(t)
    keys = {k for r in logged for k, v in r.items() if k.startswith("tiercache/") and v != ""}
    assert keys <= KEYS
    assert keys == keys_of("store", "system", "activations", "oom")
    train = [r["step"] for r in logged if r.get("tiercache/activations/offloaded_bytes")]
    assert train == ["1", "3"]  # every 2nd step; the last step was logged, so the stage end adds no row
    val = [r["step"] for r in logged if r.get("tiercache/ranks") and not r.get("tiercache/activations/offloaded_bytes")]
    assert val == []  # the end-of-epoch validation used no store: no empty row
    assert float(logged[-1]["tiercache/activations/offloaded_bytes"]) > 0
    assert float(logged[-1]["tiercache/spills"]) > 0
    assert cb.store is None and list(spill_parent.iterdir()) == []
    assert "training_step" not in vars(strategy)  # the OOM hook put the strategy back


def test_offload_works_with_oom_recovery_off(tmp_path: Path, spill_parent: Path) -> None:
    cb = make_callback(spill_parent, oom_recovery=False, device_bytes="16KiB")  # 32 KiB activations: offloaded
    t = trainer(tmp_path, cb)
    t.fit(Wide())
    keys = {k for r in rows(t) for k, v in r.items() if k.startswith("tiercache/") and v != ""}
    assert keys == keys_of("store", "system", "activations")  # no OOM metrics when recovery is off
    assert float(cb.last_metrics["tiercache/activations/offloaded_bytes"]) > 0


def test_steps_with_nothing_to_offload_run_without_saved_tensor_hooks(tmp_path: Path, spill_parent: Path) -> None:
    cb = make_callback(spill_parent, min_offload_bytes="1MiB")
    seen: dict[str, Any] = {}

    class Peek(L.Callback):
        def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            seen.update(cb.runtime.offloader.stats())

    trainer(tmp_path, cb, max_steps=6, extra=[Peek()]).fit(Wide())
    assert seen["steps"] == 1 and seen["idle_steps"] == 5  # the first forward checked; the rest skipped
    assert seen["packed"] == 0


def test_progress_bar_shows_a_short_summary(tmp_path: Path, spill_parent: Path) -> None:
    shown: dict[str, Any] = {}

    class Peek(L.Callback):
        def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            shown.update(trainer.progress_bar_callback.get_metrics(trainer, pl_module))

    t = trainer(tmp_path, make_callback(spill_parent), log_every_n_steps=1, enable_progress_bar=True, extra=[Peek()])
    bar = t.progress_bar_callback
    t.fit(Wide())
    assert {"tc_hit_rate", "tc_device_use", "tc_micro_batches"} <= set(shown)
    assert shown["tc_micro_batches"] == 1 and 0 <= shown["tc_hit_rate"] <= 1
    assert "get_metrics" not in vars(bar)  # put back at teardown
    assert not {"tc_hit_rate", "tc_device_use", "tc_micro_batches"} & set(t.progress_bar_metrics)  # not self.log


class Boom(L.Callback):
    def on_train_batch_end(self, *args: Any) -> None:
        raise RuntimeError("boom")


def test_exception_mid_fit_releases_everything(tmp_path: Path, spill_parent: Path) -> None:
    cb = make_callback(spill_parent)
    t = trainer(tmp_path, cb, extra=[Boom()])
    with pytest.raises(RuntimeError, match="boom"):
        t.fit(Wide())
    assert cb.store is None and list(spill_parent.iterdir()) == []
    assert "training_step" not in vars(t.strategy)


def test_learned_split_survives_in_state_dict(tmp_path: Path, spill_parent: Path) -> None:
    model = Wide()
    injector = OOMInjector(above_batch_size=4, phase="forward").attach(model.layer)
    cb = make_callback(spill_parent, oom_grow_back_after_steps=0)
    trainer(tmp_path, cb).fit(model)
    injector.detach()
    state = cb.state_dict()
    assert state["oom"]["train"]["micro_batches"] == 4  # 16 samples, OOM above 4: split twice
    assert cb.last_metrics["tiercache/oom/micro_batches"] == 4
    assert cb.last_metrics["tiercache/oom/retries"] >= 2

    fresh = make_callback(spill_parent, oom_grow_back_after_steps=0)
    fresh.load_state_dict(state)  # before setup: kept and handed to the parts at setup
    seen: list[int] = []

    class Probe(L.Callback):
        def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
            seen.append(fresh.runtime.hook.train_policy.micro_batches)

    trainer(tmp_path, fresh, max_steps=1, extra=[Probe()]).fit(Wide())
    assert seen == [4]


def test_validate_alone_logs_eval_keys_per_batch(tmp_path: Path, spill_parent: Path) -> None:
    t = trainer(tmp_path, make_callback(spill_parent), log_every_n_steps=1)
    model = BoringModel()
    OOMInjector(above_batch_size=1, max_faults=1).attach(model.layer)  # the first batch splits: work to report
    t.validate(model, torch.utils.data.DataLoader(RandomDataset(32, 8), batch_size=2))
    logged = [r for r in rows(t) if r.get("tiercache/ranks")]
    assert [r["step"] for r in logged] == ["0", "1"]  # two batches; the end adds no row one step past them
    keys = {k for r in logged for k, v in r.items() if k.startswith("tiercache/") and v != ""}
    assert keys == keys_of("store", "system", "oom")  # no activations outside fit; no HF model, no KV


def test_batch_input_ids_accepts_the_usual_batch_shapes() -> None:
    ids = torch.ones(2, 5, dtype=torch.long)
    assert batch_input_ids({"input_ids": ids}) is ids
    assert batch_input_ids((ids, torch.zeros(2))) is ids
    assert batch_input_ids(ids) is ids
    assert batch_input_ids(torch.ones(2, 5)) is None  # floats are not token ids
    assert batch_input_ids({"x": ids}) is None


@pytest.mark.parametrize("name", ["finetune.yaml", "eval.yaml"])
def test_configs_set_every_callback_argument(name: str) -> None:
    import inspect

    import yaml

    config = yaml.safe_load((Path(__file__).resolve().parents[2] / "configs" / name).read_text())
    params = set(inspect.signature(TierCacheCallback.__init__).parameters) - {"self"}
    assert set(config["tiercache"]) == params  # the --tiercache.<argument> section of TierCacheCLI
    TierCacheCallback(**config["tiercache"])  # every value is valid
