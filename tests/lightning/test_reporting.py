"""What a run reports: logged windows, the switches that turn reporting off, the counters and the run-end summary."""

from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, Logger

from lightning_tiercache import TierCacheCallback
from lightning_tiercache.lightning.summary import RunSummary, format_count
from lightning_tiercache.lightning.testing import OOMInjector
from tests.recording_logger import Recorder

DOCS = Path(__file__).resolve().parents[2] / "docs" / "callback.md"
TIERS = ("device", "host", "disk")


class Wide(L.LightningModule):
    """Activations big enough to pass min_offload_bytes and spill past small tiers; validation stores nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Sequential(torch.nn.Linear(32, 512), torch.nn.ReLU(), torch.nn.Linear(512, 2))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.layer(batch[0]).pow(2).mean()

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val", self.layer(batch[0]).sum())

    def train_dataloader(self) -> Any:
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(64, 32)), batch_size=16)

    def val_dataloader(self) -> Any:
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(32, 32)), batch_size=16)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def callback(spill: Path, **kw: Any) -> TierCacheCallback:
    # No disk tier: where an entry lands does not depend on when a background spill finishes.
    kw.setdefault("device_bytes", "16KiB")
    kw.setdefault("host_bytes", "1MiB")
    kw.setdefault("disk_bytes", 0)
    return TierCacheCallback(spill_dir=str(spill), min_offload_bytes=1024, **kw)


def fit(tmp_path: Path, cb: TierCacheCallback, *loggers: Logger, **kw: Any) -> L.Trainer:
    kw.setdefault("max_steps", 5)
    kw.setdefault("log_every_n_steps", 2)
    model = kw.pop("model", None) or Wide()
    trainer = L.Trainer(
        default_root_dir=tmp_path, callbacks=[cb, *kw.pop("extra", [])], logger=list(loggers) or False,
        enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=kw.pop("bar", False),
        limit_val_batches=2, num_sanity_val_steps=0, accelerator="cpu", **kw,
    )  # fmt: skip
    trainer.fit(model)
    return trainer


def tier_rows(log_dir: str) -> list[dict[str, str]]:
    with open(Path(log_dir) / "metrics.csv") as f:
        return [r for r in csv.DictReader(f) if r.get("tiercache/ranks")]


def test_every_logged_window_holds_the_peaks_of_its_steps_and_none_is_past_the_last(
    tmp_path: Path, spill_parent: Path
) -> None:
    cb = callback(spill_parent)
    csv_logger = CSVLogger(tmp_path)
    trainer = fit(tmp_path, cb, csv_logger)  # 4 batches an epoch: validation after step 4; 5 steps
    rows = tier_rows(csv_logger.log_dir)
    assert [r["step"] for r in rows] == ["1", "3", "4"]  # every 2nd step, then the last one; never step 5
    assert trainer.global_step == 5
    used = [t for t, peak in cb.summary().peak_bytes.items() if peak > 0]
    assert "host" in used
    for r in rows:  # every training window offloaded activations: each tier that holds them shows a peak
        assert all(float(r[f"tiercache/{t}/peak_bytes"]) > 0 for t in used), r
        assert all(float(r[f"tiercache/{t}/budget_use"]) > 0 for t in used), r


def test_the_summary_equals_the_callbacks_own_peaks_and_the_largest_window(tmp_path: Path, spill_parent: Path) -> None:
    cb = callback(spill_parent)
    csv_logger = CSVLogger(tmp_path)
    fit(tmp_path, cb, csv_logger, log_every_n_steps=1)
    store = cb.stats()["store"]
    summary = cb.summary()
    assert summary.peak_bytes == {t: store["tiers"][t]["peak_bytes"] for t in TIERS}
    rows = tier_rows(csv_logger.log_dir)
    for t in TIERS:  # the windows cover the stage: their largest peak is the stage's peak
        assert max(float(r[f"tiercache/{t}/peak_bytes"]) for r in rows) == summary.peak_bytes[t]
    assert summary.peak_bytes["device"] > 0 and summary.peak_bytes["host"] > 0
    text = str(summary)
    assert "tiercache fit summary" in text
    assert f"{format_count(store['puts'])} entries in" in text
    assert "device memory saved: about" in text
    assert not re.search(r"\de[+-]\d", text)  # no scientific notation


def test_log_metrics_off_sends_no_key_to_any_logger_and_leaves_the_bar(tmp_path: Path, spill_parent: Path) -> None:
    cb = callback(spill_parent, log_metrics=False)
    recorder = Recorder()
    seen: dict[str, Any] = {}

    class Peek(L.Callback):
        def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            seen["bar"] = dict(trainer.progress_bar_callback.get_metrics(trainer, pl_module))
            seen["patched"] = "get_metrics" in vars(trainer.progress_bar_callback)

    fit(tmp_path, cb, recorder, CSVLogger(tmp_path), log_every_n_steps=1, bar=True, extra=[Peek()])
    assert recorder.calls  # Lightning's own metrics still arrive
    assert not [k for _, m in recorder.calls for k in m if k.startswith("tiercache/")]
    assert not seen["patched"] and not [k for k in seen["bar"] if k.startswith("tc_")]
    assert cb.stats()["store"]["puts"] > 0  # the counters are still there


def test_progress_bar_off_leaves_the_bar_untouched_but_logs(tmp_path: Path, spill_parent: Path) -> None:
    cb = callback(spill_parent, progress_bar=False)
    recorder = Recorder()
    seen: dict[str, Any] = {}

    class Peek(L.Callback):
        def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
            bar = trainer.progress_bar_callback
            seen["patched"] = seen.get("patched", False) or "get_metrics" in vars(bar)

    fit(tmp_path, cb, recorder, log_every_n_steps=1, bar=True, extra=[Peek()])
    assert seen == {"patched": False}
    assert any(k.startswith("tiercache/") for _, m in recorder.calls for k in m)


def _documented_counters() -> dict[str, list[str]]:
    """Part -> counters, from the docs' table of ``cb.stats()``."""
    text = DOCS.read_text().split("<!-- counters:start -->", 1)[1].split("<!-- counters:end -->", 1)[0]
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        m = re.fullmatch(r'`cb\.stats\(\)\["(\w+)"\]`', cells[0]) if len(cells) == 3 else None
        if m:  # names in parentheses are the fields of the entry before them (per tier)
            nested = re.findall(r"`(\w+)` \(([^)]*)\)", cells[2])
            out.update({f"{m.group(1)}.{k}": re.findall(r"`(\w+)`", inner) for k, inner in nested})
            out[m.group(1)] = re.findall(r"`(\w+)`", re.sub(r"\([^)]*\)", "", cells[2]))
    return out


def test_every_counter_the_docs_name_is_read_through_stats(tmp_path: Path, spill_parent: Path) -> None:
    documented = _documented_counters()
    assert {"store", "activations", "oom", "kv"} <= set(documented)
    model = Wide()
    injector = OOMInjector(above_batch_size=8, phase="forward").attach(model.layer)
    cb = callback(spill_parent)
    live: dict[str, Any] = {}

    class Peek(L.Callback):
        def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            live.update(TierCacheCallback.get(trainer).stats())

    fit(tmp_path, cb, model=model, extra=[Peek()])
    injector.detach()
    after = cb.stats()
    assert cb.store is None and set(after) == set(live)  # the final counters outlive the store
    for part in ("store", "activations", "oom"):
        assert set(documented[part]) <= set(after[part]), part
    for tier in TIERS:
        assert set(documented["store.tiers"]) <= set(after["store"]["tiers"][tier])
    assert after["oom"]["oom_retries"] >= 1 and after["oom"]["current_micro_batches"] == 2
    assert cb.summary().oom_retries == after["oom"]["oom_retries"] + after["oom"]["eval_oom_retries"]
    assert "training steps retried after an out-of-memory error: 1, now 2 micro-batches" in str(cb.summary())
    kv = pytest.importorskip("lightning_tiercache.kv.generate")
    assert set(documented["kv"]) <= set(kv.COUNTERS) | {"hit_rate"}


def test_summary_names_a_tier_over_budget_and_what_to_change() -> None:
    stats = {
        "store": {
            "tiers": {
                "device": {"peak_bytes": 6 << 20, "budget": 4 << 20, "added_over_budget": 3},
                "host": {"peak_bytes": 9 << 20, "budget": 8 << 20, "added_over_budget": 0},  # the entry in flight
                "disk": {"peak_bytes": 0, "budget": 1 << 30, "added_over_budget": 0},
            },
            "puts": 4088,
            "gets": 4088,
            "hits": 4000,
            "spills": 1234567,
            "spill_bytes": int(1.75 * 2**30),
            "evictions": 3,
        }
    }
    text = str(RunSummary.from_stats("fit", stats))
    assert "device 6.00 MiB of 4.00 MiB" in text
    assert "over budget: the device tier peaked at 6.00 MiB, 1.5x its 4.00 MiB budget, with 3 entries put" in text
    # the host tier's peak is within budget plus the one entry in flight that the store allows: not flagged
    assert "host 9.00 MiB of 8.00 MiB" in text and "one entry on its way down may pass it" in text
    assert "raise device_bytes" in text and "host tier peaked" not in text
    assert "4,088 entries in" in text and "1,234,567 spilled to disk (1.75 GiB)" in text
