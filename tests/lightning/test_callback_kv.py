"""KV prefix reuse through the callback: scoring in ``validation_step``, reuse across ``validate()`` calls on
unchanged weights, and nothing stale after a training step."""

from __future__ import annotations

import gc
import re
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_tiercache import TierCacheCallback
from lightning_tiercache.bench.kv_workload import pad_rows
from lightning_tiercache.kv.prefix import mask_positions
from tests.kv_models import tiny_model

BLK = 8
CONTEXT = 40  # five blocks of few-shot context shared by every row


def _rows(n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    context = torch.randint(3, 128, (CONTEXT,), generator=g)
    rows = []
    for _ in range(n):
        ids = torch.cat([context, torch.randint(3, 128, (6,), generator=g)])
        rows.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return rows


class Scorer(L.LightningModule):
    """Scores each batch with prefix reuse and checks the logits against the uncached forward."""

    def __init__(self, family: str = "llama") -> None:
        super().__init__()
        self.model = tiny_model(family)
        self.stats: list[dict[str, Any]] = []
        self.worst = 0.0

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        ids = batch["input_ids"]
        return self.model(ids, labels=ids).loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        kv = TierCacheCallback.get(self.trainer).kv_cache
        scored = kv.score(ids, mask, logits_from=CONTEXT)
        ref = self.model(ids, attention_mask=mask, position_ids=mask_positions(mask)).logits[:, scored.start :]
        self.worst = max(self.worst, (scored.logits - ref).abs().max().item())

    def on_validation_epoch_end(self) -> None:
        self.stats.append(dict(TierCacheCallback.get(self.trainer).kv_cache.stats()))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.5)


def _trainer(cb: TierCacheCallback, tmp_path: Any, **kw: Any) -> L.Trainer:
    return L.Trainer(
        default_root_dir=tmp_path, accelerator="cpu", callbacks=[cb], logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0, **kw,
    )  # fmt: skip


@pytest.mark.parametrize("kv_model_version", [None, "v1"])
def test_second_validate_hits_and_nothing_stale_after_a_training_step(tmp_path, spill_parent, kv_model_version):
    module = Scorer()
    cb = TierCacheCallback(
        kv_block_tokens=BLK, kv_model_version=kv_model_version, spill_dir=str(spill_parent),
        device_bytes="16KiB", host_bytes="16KiB", disk_bytes="64MiB", oom_recovery=False,  # blocks spill to disk
    )  # fmt: skip
    val = DataLoader(_rows(4), batch_size=2)
    for _ in range(3):
        _trainer(cb, tmp_path).validate(module, val)
    first, *later = module.stats
    assert first["shared_prefill_blocks"] == 5 and first["stored_blocks"] > 0  # computed once, then served
    for s in later:  # served from the first call's blocks, also after a call that only served
        assert s["shared_prefill_blocks"] == 0 and s["stored_blocks"] == 0 and s["hits"] == 4 * 5
    _trainer(cb, tmp_path, max_steps=1, limit_val_batches=0).fit(module, DataLoader(_rows(2, seed=1), batch_size=2))
    _trainer(cb, tmp_path).validate(module, val)
    third = module.stats[-1]
    assert third["shared_prefill_blocks"] == 5  # new weights: the context is computed again, not served stale
    assert module.worst <= 1e-5  # the served logits follow the trained weights too
    del cb
    gc.collect()
    assert list(spill_parent.iterdir()) == []  # the kept store is closed with its callback


def _doc_example() -> str:
    """The multiple-choice ``validation_step`` example of docs/kv.md, as written."""
    text = (Path(__file__).resolve().parents[2] / "docs" / "kv.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    return next(b for b in blocks if "class ChoiceScorer" in b)


def test_the_documented_choice_scorer_runs_and_is_served_the_context(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = tiny_model("llama")
    g = torch.Generator().manual_seed(3)
    context_tokens = 130  # two whole blocks of the callback's default 64 tokens before the first logits needed
    context = torch.randint(3, 128, (context_tokens,), generator=g)
    questions = []
    for label in (2, 0, 3):
        question = torch.randint(3, 128, (5,), generator=g)
        rows = [torch.cat([context, question, torch.randint(3, 128, (k,), generator=g)]) for k in (2, 1, 3, 2)]
        ids, mask = pad_rows(rows, "right")
        questions.append({"input_ids": ids, "attention_mask": mask, "label": torch.tensor(label)})
    namespace: dict[str, Any] = {"model": model, "context_tokens": context_tokens, "questions": questions}
    exec(compile(_doc_example(), "docs/kv.md", "exec"), namespace)
    expected = []
    with torch.no_grad():
        for q in questions:  # the same choice from the uncached forward
            ids, mask = q["input_ids"], q["attention_mask"]
            logp = model(ids, attention_mask=mask).logits[:, context_tokens - 1 : -1].log_softmax(-1)
            picked = logp.gather(-1, ids[:, context_tokens:, None])[..., 0] * mask[:, context_tokens:]
            expected.append(int(picked.sum(-1).argmax()))
    scorer = namespace["trainer"].lightning_module
    assert scorer.picks == expected
    kv = TierCacheCallback.get(namespace["trainer"]).stats()["kv"]
    assert kv["hits"] == 3 * 4 * 2  # every choice of every question was served the context's two blocks


def test_a_copy_leaves_out_the_store_kept_between_eval_stages(tmp_path, spill_parent):
    # Lightning's ddp_spawn pickles the Trainer's callbacks; the store kept for the next validate stays here.
    import pickle

    module = Scorer()
    cb = TierCacheCallback(kv_block_tokens=BLK, spill_dir=str(spill_parent), oom_recovery=False)
    _trainer(cb, tmp_path).validate(module, DataLoader(_rows(2), batch_size=2))
    assert cb.runtime._kept is not None  # the prefix blocks wait for the next eval stage
    copied = pickle.loads(pickle.dumps(cb))
    assert copied.runtime._kept is None and copied.store is None
    _trainer(copied, tmp_path).validate(module, DataLoader(_rows(2), batch_size=2))  # a working callback
