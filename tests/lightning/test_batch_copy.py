"""NextBatchCopier: the next batch copied ahead on a side stream, handed over only when it is the same batch.

The CPU tests drive the whole logic with fake copy ops (clones instead of CUDA copies), including inside real
Lightning fits; the ``gpu`` test runs the CUDA streams and checks the losses are bit-identical.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning_utilities.core.apply_func import apply_to_collection

from lightning_tiercache.lightning.batch_copy import NextBatchCopier, _Lookahead, peek_next_batch
from lightning_tiercache.lightning.callback import TierCacheCallback

CPU = torch.device("cpu")


class FakeOps:
    """Copies are clones; remembers them and the hand-overs."""

    def __init__(self) -> None:
        self.copies: dict[int, torch.Tensor] = {}  # id of a copy -> the copy
        self.waits: list[tuple[Any, list[torch.Tensor]]] = []

    def copy_async(self, tensors: list[torch.Tensor], device: torch.device) -> tuple[list[torch.Tensor], Any]:
        copies = [t.clone() for t in tensors]
        self.copies.update({id(c): c for c in copies})
        return copies, object()

    def wait(self, token: Any, copies: list[torch.Tensor]) -> None:
        self.waits.append((token, copies))

    def is_copy(self, t: Any) -> bool:
        return isinstance(t, torch.Tensor) and self.copies.get(id(t)) is t


class FakeStrategy:
    def __init__(self) -> None:
        self.calls: list[Any] = []

    def batch_to_device(self, batch: Any, device: Any = None, dataloader_idx: int = 0) -> Any:
        self.calls.append(batch)
        return batch


class FakeTrainer:
    lightning_module = None
    datamodule = None

    def __init__(self) -> None:
        self.strategy = FakeStrategy()


def installed(next_batch: Any = None, peek: Any = None) -> tuple[NextBatchCopier, FakeOps, Any]:
    ops = FakeOps()
    trainer: Any = FakeTrainer()
    copier = NextBatchCopier(CPU, ops=ops, peek=peek or (lambda t: next_batch))
    copier.install(trainer)
    return copier, ops, trainer


def test_the_same_batch_gets_its_copies_once() -> None:
    host: dict[str, Any] = {"x": torch.randn(4, 3), "y": torch.arange(4), "tag": "keep"}
    copier, ops, trainer = installed(host)
    copier.copy_next(trainer, eval=False)
    out = trainer.strategy.batch_to_device(host, dataloader_idx=0)
    assert ops.is_copy(out["x"]) and ops.is_copy(out["y"]) and out["tag"] == "keep"
    assert torch.equal(out["x"], host["x"]) and torch.equal(out["y"], host["y"])
    assert len(ops.waits) == 1 and {id(t) for t in ops.waits[0][1]} == {id(out["x"]), id(out["y"])}
    again = trainer.strategy.batch_to_device(host)  # handed out once: the second call takes the original path
    assert again is host and len(ops.waits) == 1
    assert copier.stats() == {"copied": 1, "matched": 1, "dropped": 0, "no_next": 0}


def test_a_rebuilt_container_with_the_same_tensors_still_matches() -> None:
    # FSDP's and the half-precision plugins' convert_input rebuild the containers but keep fp32 leaves.
    host = (torch.randn(2, 2), torch.randn(2))
    copier, ops, trainer = installed(host)
    copier.copy_next(trainer, eval=False)
    rebuilt = apply_to_collection(host, torch.Tensor, lambda t: t.to(torch.float32))
    assert rebuilt is not host
    out = trainer.strategy.batch_to_device(rebuilt)
    assert all(ops.is_copy(t) for t in out) and copier.stats()["matched"] == 1


def test_another_batch_takes_the_original_path_and_leaves_the_copy_pending() -> None:
    host = torch.randn(3)
    copier, ops, trainer = installed(host)
    copier.copy_next(trainer, eval=False)
    other = host.clone()  # equal values, another object
    assert trainer.strategy.batch_to_device(other) is other
    assert ops.waits == []
    assert ops.is_copy(trainer.strategy.batch_to_device(host))  # e.g. validation ran in between


def test_changed_tensors_are_not_replaced() -> None:
    a, b = torch.zeros(3), torch.zeros(3)
    copier, ops, trainer = installed([a, b])
    copier.copy_next(trainer, eval=False)
    a.add_(1)  # e.g. on_before_batch_transfer changed it in place after the copy started
    out = trainer.strategy.batch_to_device([a, b])
    assert out[0] is a and ops.is_copy(out[1])
    assert torch.equal(out[0], torch.ones(3))


def test_a_transformed_batch_takes_the_original_path() -> None:
    host = [torch.randn(2)]
    copier, ops, trainer = installed(host)
    copier.copy_next(trainer, eval=False)
    converted = [host[0].double()]  # a precision plugin made new tensors
    assert trainer.strategy.batch_to_device(converted) is converted and ops.waits == []


def test_another_target_device_takes_the_original_path() -> None:
    host = torch.randn(2)
    copier, ops, trainer = installed(host)
    copier.copy_next(trainer, eval=False)
    assert trainer.strategy.batch_to_device(host, torch.device("meta")) is host
    assert ops.is_copy(trainer.strategy.batch_to_device(host, CPU))


def test_the_next_batch_start_drops_an_unused_copy() -> None:
    batches = iter([torch.randn(2), torch.randn(2)])
    copier, _, trainer = installed(peek=lambda t: next(batches))
    copier.copy_next(trainer, eval=False)
    copier.copy_next(trainer, eval=False)
    copier.copy_next(trainer, eval=True)  # nothing left: no_next
    assert copier.stats() == {"copied": 2, "matched": 0, "dropped": 1, "no_next": 1}


def test_train_and_eval_copies_are_held_apart() -> None:
    train, val = torch.randn(2), torch.randn(2)
    nxt: list[Any] = [train]
    copier, ops, trainer = installed(peek=lambda t: nxt[0])
    copier.copy_next(trainer, eval=False)
    nxt[0] = val
    copier.copy_next(trainer, eval=True)  # validation inside the epoch
    assert ops.is_copy(trainer.strategy.batch_to_device(val))
    assert ops.is_copy(trainer.strategy.batch_to_device(train))
    assert copier.stats()["matched"] == 2


def test_a_peek_failure_turns_copies_off_quietly(caplog: pytest.LogCaptureFixture) -> None:
    calls = []

    def peek(trainer: Any) -> Any:
        calls.append(1)
        raise AttributeError("'_FitLoop' object has no attribute '_data_fetcher'")

    copier, ops, trainer = installed(peek=peek)
    with caplog.at_level(logging.DEBUG, logger="lightning_tiercache.lightning.batch_copy"):
        copier.copy_next(trainer, eval=False)
        copier.copy_next(trainer, eval=False)
    assert len(calls) == 1 and len([r for r in caplog.records if "next-batch copies are off" in r.message]) == 1
    batch = torch.randn(2)
    assert trainer.strategy.batch_to_device(batch) is batch and ops.copies == {}


def test_batches_without_cpu_tensors_or_with_repeats_are_not_copied() -> None:
    t = torch.randn(2)
    nxt: list[Any] = [None]
    copier, ops, trainer = installed(peek=lambda tr: nxt[0])
    for batch in ({"text": ["a", "b"]}, [t, t], None):
        nxt[0] = batch
        copier.copy_next(trainer, eval=False)
    assert ops.copies == {} and copier.stats()["copied"] == 0


def test_uninstall_restores_the_strategy_exactly() -> None:
    trainer: Any = FakeTrainer()
    copier = NextBatchCopier(CPU, ops=FakeOps(), peek=lambda t: torch.randn(2))
    copier.install(trainer)
    wrapper = vars(trainer.strategy)["batch_to_device"]
    copier.install(trainer)  # a second install is a no-op
    assert vars(trainer.strategy)["batch_to_device"] is wrapper and copier.installed
    copier.copy_next(trainer, eval=False)
    copier.uninstall()
    copier.uninstall()
    assert "batch_to_device" not in vars(trainer.strategy) and not copier.installed
    assert copier.stats()["dropped"] == 1
    copier.copy_next(trainer, eval=False)  # not installed: nothing
    assert copier.stats()["copied"] == 1

    own: Any = FakeTrainer()  # an instance attribute that was there before is put back, the same object
    before = own.strategy.batch_to_device
    own.strategy.batch_to_device = before
    copier.install(own)
    assert vars(own.strategy)["batch_to_device"] is not before
    copier.uninstall()
    assert vars(own.strategy)["batch_to_device"] is before


def test_a_custom_transfer_hook_turns_it_off() -> None:
    class Custom(BoringModel):
        def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
            return batch

    trainer: Any = FakeTrainer()
    trainer.lightning_module = Custom()
    copier = NextBatchCopier(CPU, ops=FakeOps(), peek=lambda t: torch.randn(2))
    copier.install(trainer)
    assert not copier.installed and "batch_to_device" not in vars(trainer.strategy)


def test_inference_tensors_are_copied_unless_a_before_transfer_hook_could_change_them() -> None:
    with torch.inference_mode():  # eval loops read batches under inference mode: no version counter
        host = torch.randn(2)
    copier, ops, trainer = installed(host)
    copier.copy_next(trainer, eval=True)
    assert ops.is_copy(trainer.strategy.batch_to_device(host))

    class Before(BoringModel):
        def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
            return batch

    hooked: Any = FakeTrainer()
    hooked.lightning_module = Before()
    copier = NextBatchCopier(CPU, ops=ops, peek=lambda t: host)
    copier.install(hooked)
    copier.copy_next(hooked, eval=True)
    assert copier.installed and copier.stats()["copied"] == 0
    assert hooked.strategy.batch_to_device(host) is host


def test_cuda_is_needed_without_fake_ops() -> None:
    with pytest.raises(ValueError, match="needs a CUDA device"):
        NextBatchCopier(CPU)


def test_lookahead_keeps_every_item_and_defers_errors() -> None:
    look = _Lookahead(iter([1, 2]))
    assert look.peek() == 1 and look.peek() == 1
    assert list(look) == [1, 2]
    end = _Lookahead(iter([]))
    end.peek()
    with pytest.raises(StopIteration):
        next(end)
    with pytest.raises(StopIteration):
        next(end)

    def broken() -> Iterator[int]:
        yield 1
        raise OSError("worker died")

    bad = _Lookahead(broken())
    assert next(bad) == 1
    bad.peek()  # the error belongs to the next() that would have met it
    with pytest.raises(OSError, match="worker died"):
        next(bad)


class _Fetcher:
    def __init__(self, batches: list[Any], iterator: Any, done: bool = False) -> None:
        self.batches, self.iterator, self.done = batches, iterator, done


class _Loop:
    def __init__(self, fetcher: Any) -> None:
        self._data_fetcher = fetcher


class _Trainer:
    def __init__(self, fetcher: Any) -> None:
        self._active_loop = _Loop(fetcher)


def over(fetcher: Any) -> Any:
    """A stand-in trainer whose active loop has ``fetcher``."""
    return _Trainer(fetcher)


def test_peek_reads_the_fetcher_or_gives_none() -> None:
    unsized = _Fetcher([("b1", 1, 0)], iterator=None)
    assert peek_next_batch(over(unsized)) == "b1"
    sized = _Fetcher([], iterator=iter([("b1", 1, 0), ("b2", 2, 0)]))
    assert peek_next_batch(over(sized)) == "b1"
    assert isinstance(sized.iterator, _Lookahead) and next(sized.iterator) == ("b1", 1, 0)
    assert peek_next_batch(over(_Fetcher([], iterator=iter([("x", 0, 0)]), done=True))) is None
    assert peek_next_batch(over(object())) is None  # dataloader_iter fetcher
    assert peek_next_batch(over(None)._active_loop) is None  # no loop at all


# ---------------------------------------------------------------------------------------------- Lightning fits


class Recorder(BoringModel):
    """Records every batch and loss a step sees, and whether its tensor was a copy made ahead."""

    def __init__(self, data: torch.Tensor, sized: bool, is_copy: Any = None) -> None:
        super().__init__()
        self.data, self.sized, self.is_copy = data, sized, is_copy
        self.seen: list[tuple[str, torch.Tensor]] = []
        self.losses: list[torch.Tensor] = []
        self.from_copy: list[bool] = []

    def _loader(self) -> Any:
        ds: Any = torch.utils.data.TensorDataset(self.data)
        if not self.sized:
            rows = list(self.data)
            ds = _Unsized(rows)
        return torch.utils.data.DataLoader(ds, batch_size=4)

    def train_dataloader(self) -> Any:
        return self._loader()

    def val_dataloader(self) -> Any:
        return self._loader()

    def _record(self, stage: str, batch: Any) -> torch.Tensor:
        x = batch[0] if isinstance(batch, list | tuple) else batch
        self.seen.append((stage, x.clone()))
        self.from_copy.append(bool(self.is_copy and self.is_copy(x)))
        return x

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        out: Any = super().training_step(self._record("train", batch), batch_idx)
        self.losses.append(out["loss"].detach().clone())
        return out

    def validation_step(self, batch: Any, batch_idx: int) -> Any:
        return super().validation_step(self._record("val", batch), batch_idx)


class _Unsized(torch.utils.data.IterableDataset):
    def __init__(self, rows: list[torch.Tensor]) -> None:
        self.rows = rows

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter(self.rows)


class CopyAhead(L.Callback):
    """The callback's wiring of the copier, with fake ops, on CPU."""

    def __init__(self) -> None:
        self.ops = FakeOps()
        self.copier = NextBatchCopier(CPU, ops=self.ops)

    def setup(self, trainer: L.Trainer, pl_module: Any, stage: str) -> None:
        self.copier.install(trainer)

    def teardown(self, trainer: L.Trainer, pl_module: Any, stage: str) -> None:
        self.copier.uninstall()

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        self.copier.copy_next(trainer, eval=False)

    def on_validation_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        self.copier.copy_next(trainer, eval=True)


def fit(tmp_path: Path, model: Recorder, callbacks: list[Any]) -> L.Trainer:
    t = L.Trainer(
        default_root_dir=tmp_path, callbacks=callbacks, logger=False, enable_checkpointing=False,
        enable_model_summary=False, enable_progress_bar=False, accelerator="cpu", max_epochs=2,
        limit_val_batches=3, num_sanity_val_steps=1,
    )  # fmt: skip
    t.fit(model)
    return t


@pytest.mark.parametrize("sized", [True, False], ids=["sized", "unsized"])
def test_a_lightning_fit_uses_the_copies_and_sees_the_same_batches(tmp_path: Path, sized: bool) -> None:
    data = torch.randn(16, 32)  # 4 training batches per epoch
    L.seed_everything(0)
    plain = Recorder(data, sized)
    fit(tmp_path, plain, [])
    L.seed_everything(0)
    cb = CopyAhead()
    model = Recorder(data, sized, is_copy=cb.ops.is_copy)
    t = fit(tmp_path, model, [cb])
    assert [s for s, _ in model.seen] == [s for s, _ in plain.seen]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(model.seen, plain.seen, strict=True))
    assert torch.equal(torch.stack(model.losses), torch.stack(plain.losses))
    # Every batch but the first of each loop run came from a copy: 2 epochs x 3 train, 2 x 2 val, 0 sanity
    # (one batch); all of them were used and handed over once.
    train_from_copy = [c for (s, _), c in zip(model.seen, model.from_copy, strict=True) if s == "train"]
    assert train_from_copy == [False, True, True, True] * 2
    assert cb.copier.stats() == {"copied": 10, "matched": 10, "dropped": 0, "no_next": 5}
    assert len(cb.ops.waits) == 10
    assert "batch_to_device" not in vars(t.strategy)


class Probe(L.Callback):
    """Whether anything wrapped ``batch_to_device`` at each training batch start."""

    def __init__(self) -> None:
        self.installed: list[bool] = []

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        self.installed.append("batch_to_device" in vars(trainer.strategy))


def test_the_callback_installs_nothing_on_cpu_and_changes_nothing(tmp_path: Path, spill_parent: Path) -> None:
    data = torch.randn(16, 32)
    runs = []
    for copy_next_batch in (True, False):
        L.seed_everything(0)
        model = Recorder(data, sized=True)
        cb = TierCacheCallback(spill_dir=str(spill_parent), copy_next_batch=copy_next_batch, device_bytes="64KiB")
        probe = Probe()
        fit(tmp_path, model, [cb, probe])
        seen = probe.installed
        assert cb.copier is None and seen and not any(seen)
        runs.append(torch.stack(model.losses))
    assert torch.equal(runs[0], runs[1])
    assert list(spill_parent.iterdir()) == []
    with pytest.raises(ValueError, match="copy_next_batch='yes' must be True or False"):
        TierCacheCallback(copy_next_batch="yes")  # type: ignore[arg-type]


def test_the_callback_wires_the_copier_to_batch_starts_and_teardown(
    tmp_path: Path, spill_parent: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ops = FakeOps()
    monkeypatch.setattr(NextBatchCopier, "for_trainer", classmethod(lambda cls, trainer: cls(CPU, ops=ops)))
    cb = TierCacheCallback(spill_dir=str(spill_parent), device_bytes="64KiB")
    model = Recorder(torch.randn(16, 32), sized=True, is_copy=ops.is_copy)
    t = fit(tmp_path, model, [cb])
    assert cb.copier is not None and not cb.copier.installed
    assert cb.copier.stats() == {"copied": 10, "matched": 10, "dropped": 0, "no_next": 5}
    assert sum(model.from_copy) == 10
    assert "batch_to_device" not in vars(t.strategy) and "training_step" not in vars(t.strategy)


class Evaluated(Recorder):
    def test_step(self, batch: Any, batch_idx: int) -> Any:
        return self.validation_step(batch, batch_idx)

    def predict_step(self, batch: Any, batch_idx: int) -> Any:
        return self._record("predict", batch).sum()

    def test_dataloader(self) -> Any:
        return self._loader()

    def predict_dataloader(self) -> Any:
        return self._loader()


@pytest.mark.parametrize("stage", ["validate", "test", "predict"])
def test_eval_stages_use_the_copies_under_inference_mode(
    tmp_path: Path, spill_parent: Path, monkeypatch: pytest.MonkeyPatch, stage: str
) -> None:
    ops = FakeOps()
    monkeypatch.setattr(NextBatchCopier, "for_trainer", classmethod(lambda cls, trainer: cls(CPU, ops=ops)))
    cb = TierCacheCallback(spill_dir=str(spill_parent), device_bytes="64KiB")
    model = Evaluated(torch.randn(16, 32), sized=True, is_copy=ops.is_copy)
    t = L.Trainer(
        default_root_dir=tmp_path, callbacks=[cb], logger=False, accelerator="cpu", enable_progress_bar=False,
        enable_model_summary=False,
    )  # fmt: skip
    getattr(t, stage)(model)
    assert model.from_copy == [False, True, True, True]
    assert cb.copier is not None and cb.copier.stats() == {"copied": 3, "matched": 3, "dropped": 0, "no_next": 1}
    assert "batch_to_device" not in vars(t.strategy)


# ---------------------------------------------------------------------------------------------------- CUDA


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_copies_ahead_from_pinned_memory_with_bit_identical_losses(tmp_path: Path, spill_parent: Path) -> None:
    data = torch.randn(256, 32)

    class Pinned(Recorder):
        def _loader(self) -> Any:
            ds = torch.utils.data.TensorDataset(self.data)
            return torch.utils.data.DataLoader(ds, batch_size=16, pin_memory=True)

    runs, stats = [], []
    for copy_next_batch in (True, False):
        L.seed_everything(0)
        model = Pinned(data, sized=True)
        cb = TierCacheCallback(
            spill_dir=str(spill_parent), device_bytes="1MiB", host_bytes="64MiB", disk_bytes=0,
            copy_next_batch=copy_next_batch,
        )  # fmt: skip
        t = L.Trainer(
            default_root_dir=tmp_path, callbacks=[cb], logger=False, enable_checkpointing=False,
            enable_model_summary=False, enable_progress_bar=False, accelerator="cuda", devices=1, max_epochs=2,
            limit_val_batches=4, num_sanity_val_steps=0,
        )  # fmt: skip
        t.fit(model)
        fit_stats = cb.copier.stats() if cb.copier is not None else None
        t.validate(model)  # stand-alone: batches are inference tensors
        assert "batch_to_device" not in vars(t.strategy)
        stats.append((fit_stats, cb.copier.stats() if cb.copier is not None else None))
        runs.append((torch.stack(model.losses).cpu(), [(s, x.cpu()) for s, x in model.seen]))
    assert stats[1] == (None, None)
    fit_stats, val_stats = stats[0]
    assert fit_stats == {"copied": 2 * 15 + 2 * 3, "matched": 2 * 15 + 2 * 3, "dropped": 0, "no_next": 4}
    assert val_stats == {"copied": 3, "matched": 3, "dropped": 0, "no_next": 1}
    (losses_on, seen_on), (losses_off, seen_off) = runs
    assert torch.equal(losses_on, losses_off)
    assert [s for s, _ in seen_on] == [s for s, _ in seen_off]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(seen_on, seen_off, strict=True))
    assert list(spill_parent.iterdir()) == []


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_copy_ops_hand_over_exact_values() -> None:
    from lightning_tiercache.lightning.batch_copy import CudaCopyOps

    device = torch.device("cuda", torch.cuda.current_device())
    ops = CudaCopyOps(device)
    src = [torch.randn(1 << 22).pin_memory(), torch.arange(1 << 20).pin_memory()]
    torch.cuda._sleep(50_000_000)  # the current stream is busy: the copies queue behind it, the wait after them
    copies, event = ops.copy_async(src, device)
    ops.wait(event, copies)
    assert all(c.device == device for c in copies)
    assert all(torch.equal(c.cpu(), s) for c, s in zip(copies, src, strict=True))
