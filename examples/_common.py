"""Shared parts of the examples: a small causal LM, an offline corpus and a few-shot generation eval.

The corpus is the documentation text that ships with every Python install (``pydoc_data.topics``), so the
examples run offline. The model is a small Llama-style ``transformers`` model built from a config with random
weights (or a local checkpoint given by path, loaded with ``local_files_only``). Without a checkpoint the
tokenizer is bytes: token = byte + 3, with pad/bos/eos = 0/1/2.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

__all__ = [
    "ByteTokenizer",
    "CausalLM",
    "CorpusDataModule",
    "corpus",
    "default_loggers",
    "render_png",
    "summary_lines",
]

_OFFSET = 3


class ByteTokenizer:
    """UTF-8 bytes as tokens (no download, no vocabulary file)."""

    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2
    vocab_size = 256 + _OFFSET

    def encode(self, text: str) -> list[int]:
        return [b + _OFFSET for b in text.encode("utf-8")]

    def decode(self, ids: list[int]) -> str:
        return bytes(i - _OFFSET for i in ids if i >= _OFFSET).decode("utf-8", errors="replace")


def corpus() -> dict[str, str]:
    """Topic name -> documentation text, from the ``pydoc_data`` package of this Python."""
    from pydoc_data.topics import topics

    return dict(sorted(topics.items()))


def _split(names: list[str]) -> tuple[list[str], list[str]]:
    """Every 8th topic (in sorted order: stable across machines) is held out for evaluation."""
    return [n for i, n in enumerate(names) if i % 8], [n for i, n in enumerate(names) if i % 8 == 0]


class _Chunks(Dataset[dict[str, torch.Tensor]]):
    def __init__(self, ids: list[int], seq_len: int, limit: int | None) -> None:
        n = (len(ids) - 1) // seq_len
        self.data = torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)
        if limit is not None:
            self.data = self.data[:limit]

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.data[i]}


class _Prompts(Dataset[dict[str, torch.Tensor]]):
    def __init__(self, rows: list[tuple[list[int], list[int]]]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        prompt, target = self.rows[i]
        return {"input_ids": torch.tensor(prompt), "target_ids": torch.tensor(target)}


class CorpusDataModule(L.LightningDataModule):
    """Python's documentation as a language-modelling corpus and a few-shot completion task.

    Args:
        seq_len: tokens per training sequence.
        batch_size: sequences (or prompts) per batch.
        max_train_batches: cap on training sequences, in batches (``None``: the whole corpus).
        val_task: ``"lm"`` (held-out next-token loss) or ``"fewshot"`` (generation with a shared prefix).
        shots: example passages in the shared few-shot prefix.
        shot_chars: characters of each example passage.
        question_chars: characters of the held-out passage each prompt ends with.
        answer_tokens: tokens to generate and compare with the real continuation.
        num_prompts: prompts in the few-shot eval.
        checkpoint: a local ``transformers`` checkpoint whose tokenizer to use (``None``: bytes).
    """

    def __init__(
        self,
        seq_len: int = 128,
        batch_size: int = 8,
        max_train_batches: int | None = None,
        val_task: str = "lm",
        shots: int = 3,
        shot_chars: int = 96,
        question_chars: int = 48,
        answer_tokens: int = 8,
        num_prompts: int = 16,
        checkpoint: str | None = None,
    ) -> None:
        super().__init__()
        if val_task not in ("lm", "fewshot"):
            raise ValueError(f"val_task={val_task!r} is not one of lm, fewshot")
        self.save_hyperparameters()
        self.tokenizer: Any = _tokenizer(checkpoint)

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text))

    def setup(self, stage: str) -> None:
        hp = self.hparams
        docs = corpus()
        train, held = _split(list(docs))
        limit = hp.max_train_batches * hp.batch_size if hp.max_train_batches else None
        self.train_set = _Chunks(self._encode("\n\n".join(docs[n] for n in train)), hp.seq_len, limit)
        self.lm_set = _Chunks(self._encode("\n\n".join(docs[n] for n in held)), hp.seq_len, 4 * hp.batch_size)
        prefix = "Python documentation, first lines of each topic.\n\n" + "".join(
            f"Topic: {n}\n{_flat(docs[n])[: hp.shot_chars]}\n\n" for n in train[: hp.shots]
        )
        rows = []
        for n in held:
            text = _flat(docs[n])
            if len(text) < hp.question_chars + 64:
                continue
            prompt = self._encode(prefix + f"Topic: {n}\n" + text[: hp.question_chars])
            rest = self._encode(text[hp.question_chars : hp.question_chars + 64])
            rows.append((prompt, rest[: hp.answer_tokens]))
        width = min(len(p) for p, _ in rows)  # equal lengths: the tail of the question is cut, no padding needed
        self.prompt_set = _Prompts([(p[:width], t) for p, t in rows[: hp.num_prompts]])

    def _loader(self, data: Dataset[Any], **kwargs: Any) -> DataLoader[Any]:
        # Pinned host batches let the callback's next-batch copy overlap with compute on CUDA.
        return DataLoader(data, batch_size=self.hparams.batch_size, pin_memory=torch.cuda.is_available(), **kwargs)

    def train_dataloader(self) -> DataLoader[Any]:
        return self._loader(self.train_set, shuffle=True, drop_last=True)

    def val_dataloader(self) -> DataLoader[Any]:
        return self._loader(self.prompt_set if self.hparams.val_task == "fewshot" else self.lm_set)

    def test_dataloader(self) -> DataLoader[Any]:
        return self._loader(self.prompt_set)


def _flat(text: str) -> str:
    return " ".join(text.split())


def _tokenizer(checkpoint: str | None) -> Any:
    if checkpoint is None:
        return ByteTokenizer()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(checkpoint, local_files_only=True)


class CausalLM(L.LightningModule):
    """Fine-tunes a causal LM; validation is next-token loss or few-shot greedy generation.

    Args:
        checkpoint: a local ``transformers`` checkpoint folder (``None``: a small Llama built from a config).
        hidden_size: width of the model built from a config.
        layers: decoder layers of the model built from a config.
        heads: attention heads (key/value heads are half as many).
        lr: AdamW learning rate.
    """

    def __init__(
        self,
        checkpoint: str | None = None,
        hidden_size: int = 128,
        layers: int = 4,
        heads: int = 4,
        lr: float = 3e-3,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = _build_model(checkpoint, hidden_size, layers, heads)
        self.gen_seconds = 0.0
        self.gen_tokens = 0
        self.gen_calls = 0

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        ids = batch["input_ids"]
        loss = self.model(input_ids=ids, labels=ids).loss
        self.log("train_loss", loss, prog_bar=True, batch_size=ids.shape[0])
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        ids = batch["input_ids"]
        if "target_ids" in batch:
            self.log("fewshot_token_acc", self._generate_and_score(batch), prog_bar=True, batch_size=ids.shape[0])
        else:
            loss = self.model(input_ids=ids, labels=ids).loss
            self.log("val_loss", loss, prog_bar=True, batch_size=ids.shape[0])

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.log("fewshot_token_acc", self._generate_and_score(batch), batch_size=batch["input_ids"].shape[0])

    def _generate_and_score(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Greedy answers; with ``TierCacheCallback(kv_cache=True)`` ``generate`` reuses the shared prefix."""
        ids, target = batch["input_ids"], batch["target_ids"]
        start = time.perf_counter()
        first = self.gen_calls == 0
        self.gen_calls += 1
        out = self.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=target.shape[1],
            min_new_tokens=target.shape[1],
            do_sample=False,
            pad_token_id=0,
        )
        if not first:  # the first call warms transformers up; leave it out of tokens/s
            self.gen_seconds += time.perf_counter() - start
            self.gen_tokens += target.numel()
        return (out[:, ids.shape[1] :] == target).float().mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)


def _build_model(checkpoint: str | None, hidden_size: int, layers: int, heads: int) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if checkpoint is not None:
        return AutoModelForCausalLM.from_pretrained(checkpoint, local_files_only=True)
    config = LlamaConfig(
        vocab_size=ByteTokenizer.vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=2048,
        pad_token_id=ByteTokenizer.pad_token_id,
        bos_token_id=ByteTokenizer.bos_token_id,
        eos_token_id=ByteTokenizer.eos_token_id,
    )
    return LlamaForCausalLM(config)


def default_loggers(save_dir: str | Path, name: str) -> list[dict[str, Any]]:
    """LightningCLI logger specs: CSV, plus W&B (offline unless ``WANDB_API_KEY`` is set) when wandb is installed."""
    import importlib.util

    loggers: list[dict[str, Any]] = [
        {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(save_dir), "name": name}}
    ]
    if importlib.util.find_spec("wandb") is not None:
        offline = not os.environ.get("WANDB_API_KEY")
        args = {"project": "lightning-tiercache", "name": name, "save_dir": str(save_dir), "offline": offline}
        loggers.append({"class_path": "lightning.pytorch.loggers.WandbLogger", "init_args": args})
    return loggers


def summary_lines(trainer: L.Trainer) -> list[str]:
    """The callback's run-end summary, the run's own final metrics and where its logs are."""
    from lightning_tiercache import TierCacheCallback

    try:
        lines = TierCacheCallback.get(trainer).summary().lines()
    except LookupError:
        lines = ["(no TierCacheCallback in this run)"]
    lines += [f"  {name:<28} {float(value):,.4g}" for name, value in sorted(trainer.callback_metrics.items())]
    for logger in trainer.loggers:
        where = getattr(logger, "log_dir", None) or getattr(logger, "save_dir", None)
        lines.append(f"  {type(logger).__name__ + ' logs':<28} {where}")
    return lines


def render_png(trainer: L.Trainer) -> str:
    """Render the CSV log of the run to a PNG and say where it is (or why there is none)."""
    from lightning.pytorch.loggers import CSVLogger

    from lightning_tiercache.report import render

    for logger in trainer.loggers:
        if isinstance(logger, CSVLogger):
            try:
                return f"  {'PNG report':<28} {render(logger.log_dir)}"
            except (ImportError, ValueError) as err:
                return f"  (no PNG: {err})"
    return "  (no PNG: the run has no CSVLogger)"
