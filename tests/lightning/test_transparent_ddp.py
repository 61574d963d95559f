"""2-process CPU DDP (gloo) with ``TierCacheCallback()``: what DDP users rely on still holds.

Eval with different batch counts per rank finishes (no per-step collective, telemetry included), a
communication hook the module registers runs on every training step as often as without the callback, a fit
without a hook gets the same weights bit for bit with no blocking collective added (the OOM flag rides with
DDP's last bucket, Note: [carried flag]), and an eval OOM on one rank splits there alone and counts every sample
once. The test launches this file twice as a
script (Lightning's "launched externally" mode); each process runs every scenario and writes what it saw.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.ddp_launch import run_two_ranks


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_ddp_eval_with_uneven_batches_and_comm_hooks_behave_as_without_the_callback(tmp_path: Path) -> None:
    run_two_ranks(
        __file__, tmp_path, 200, lambda: "".join((tmp_path / f"progress-{r}.txt").read_text() for r in (0, 1))
    )
    seen = [json.loads((tmp_path / f"seen-{rank}.json").read_text()) for rank in (0, 1)]
    # predict: 5 samples on 2 ranks are 3 and 2 batches; validate: 3 and 2 batches by construction.
    assert [s["predicted"] for s in seen] == [3, 2]
    assert [s["validated"] for s in seen] == [3, 2]
    # Telemetry under DDP eval: no per-batch reduce (it would wait for a batch rank 1 never runs); one row per
    # stage, at its end, reduced over both ranks (rank 1's OOM retry), at rank zero's last batch.
    assert seen[0]["rows"] == [[[2, 2.0, 1.0]], [[2, 2.0, 1.0]]]
    for s in seen:
        assert s["hook_calls"] == s["hook_calls_plain"] >= s["train_steps"] == 4
        # No hook of the module's: the callback's flag rides with the buckets. Per step, one asynchronous
        # all-reduce launched inside backward (the model's one small bucket, DDP's own reduce done by the
        # callback's hook, with the flag inside it), no blocking collective added, the same weights bit for bit.
        assert s["blocking_no_hook"] == s["blocking_no_hook_plain"], s
        assert s["async_no_hook"] - s["async_no_hook_plain"] == 4, s
        assert s["weights_equal_no_hook"]
        # With OOM recovery off the callback is not DDP's hook: DDP reduces in C++ as without it.
        assert s["calls_oom_off"] == {"blocking": s["blocking_no_hook_plain"], "async": s["async_no_hook_plain"]}
    # One rank ran out of memory in validation: it split alone; the logged sums equal the plain run's.
    assert [s["eval_splits"] for s in seen] == [0, 1]
    assert seen[0]["val_sum"] == pytest.approx(seen[0]["val_sum_plain"], rel=1e-6)
    assert seen[1]["val_sum"] == seen[0]["val_sum"]


def _worker(out_dir: Path) -> None:  # pragma: no cover - runs in subprocesses
    import lightning as L
    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_tiercache import TierCacheCallback
    from lightning_tiercache.lightning.testing import OOMInjector

    rank = int(os.environ["RANK"])
    progress = out_dir / f"progress-{rank}.txt"

    def note(what: str) -> None:
        with progress.open("a") as f:
            f.write(f"rank {rank}: {what}\n")

    def data(n: int, seed: int = 1) -> TensorDataset:
        g = torch.Generator().manual_seed(seed)
        return TensorDataset(torch.randn(n, 8, generator=g), torch.randn(n, 1, generator=g))

    class Net(L.LightningModule):
        def __init__(self, comm_hook: bool = True) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.l1 = nn.Linear(8, 16)
            self.l2 = nn.Linear(16, 1)
            self.hook_calls = 0
            self.comm_hook = comm_hook

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.l2(torch.tanh(self.l1(x)))

        def on_fit_start(self) -> None:
            if not self.comm_hook:
                return
            model = self.trainer.strategy.model

            # No annotations: DDP checks a hook's annotations against its own types, and these would be strings.
            def counting_allreduce(state, bucket):
                self.hook_calls += 1
                t = bucket.buffer().div_(dist.get_world_size())
                return dist.all_reduce(t, async_op=True).get_future().then(lambda f: f.value()[0])

            model.register_comm_hook(None, counting_allreduce)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return nn.functional.mse_loss(self(x), y)

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            x, y = batch
            self.log("val_sum", (self(x) - y).abs().sum(), reduce_fx="sum", sync_dist=True)

        def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return self(batch[0])

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    def trainer(callbacks: list[Any], **kw: Any) -> L.Trainer:
        kw.setdefault("logger", False)
        return L.Trainer(
            accelerator="cpu", devices=2, strategy="ddp", enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, callbacks=callbacks, **kw,
        )  # fmt: skip

    def tiercache() -> TierCacheCallback:
        return TierCacheCallback(spill_dir=str(out_dir))

    seen: dict[str, Any] = {}
    model = Net()

    note("predict with 5 samples")
    counter = _Count()
    trainer([tiercache(), counter]).predict(model, DataLoader(data(5), batch_size=1))
    seen["predicted"] = counter.batches

    note("validate with 3 and 2 batches")
    counter = _Count()
    uneven = DataLoader(data(3 if rank == 0 else 2, seed=2 + rank), batch_size=1)
    trainer([tiercache(), counter], use_distributed_sampler=False).validate(model, uneven)
    seen["validated"] = counter.batches

    note("telemetry every batch: predict and validate with 3 and 2 batches, an OOM on rank 1")
    from lightning.pytorch.loggers import Logger

    class Recorder(Logger):
        name, version = "recorder", 0  # type: ignore[assignment]

        def __init__(self) -> None:
            super().__init__()
            self.rows: list[list[Any]] = []

        def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
            if "tiercache/ranks" in metrics:
                self.rows.append([step, metrics["tiercache/ranks"], metrics["tiercache/oom/retries"]])

        def log_hyperparams(self, *args: Any, **kwargs: Any) -> None:
            pass

    seen["rows"] = []
    for stage in ("predict", "validate"):
        recorder = Recorder()
        fault = OOMInjector(above_batch_size=1, ranks=[1], max_faults=1).attach(model.l1)
        t = trainer([tiercache()], logger=recorder, log_every_n_steps=1, use_distributed_sampler=stage == "predict")
        if stage == "predict":  # Lightning's predict sampler: 5 and 4 samples, 3 and 2 batches of 2
            t.predict(model, DataLoader(data(9), batch_size=2))
        else:
            t.validate(model, DataLoader(data(6 if rank == 0 else 4, seed=2 + rank), batch_size=2), verbose=False)
        fault.detach()
        seen["rows"].append(recorder.rows)

    note("fit with a comm hook")
    train = DataLoader(data(64), batch_size=8)  # the distributed sampler gives each rank 32 samples
    plain = Net()
    trainer([], max_steps=4).fit(plain, train)
    seen["hook_calls_plain"] = plain.hook_calls
    hooked = Net()
    counter = _Count()
    trainer([tiercache(), counter], max_steps=4).fit(hooked, train)
    seen["hook_calls"] = hooked.hook_calls
    seen["train_steps"] = counter.train_batches

    note("fit without a comm hook")
    calls = {"blocking": 0, "async": 0}
    all_reduce = dist.all_reduce

    def counting_all_reduce(*args: Any, **kwargs: Any) -> Any:
        calls["async" if kwargs.get("async_op") else "blocking"] += 1
        return all_reduce(*args, **kwargs)

    dist.all_reduce = counting_all_reduce
    try:
        runs = []
        for callbacks in ([], [tiercache()], [TierCacheCallback(spill_dir=str(out_dir), oom_recovery=False)]):
            calls["blocking"] = calls["async"] = 0
            net = Net(comm_hook=False)
            trainer(callbacks, max_steps=4).fit(net, train)
            runs.append((dict(calls), [p.detach().clone() for p in net.parameters()]))
    finally:
        dist.all_reduce = all_reduce
    (plain_calls, plain_weights), (cb_calls, cb_weights), (off_calls, _) = runs
    seen["calls_oom_off"] = off_calls
    seen["blocking_no_hook_plain"], seen["async_no_hook_plain"] = plain_calls["blocking"], plain_calls["async"]
    seen["blocking_no_hook"], seen["async_no_hook"] = cb_calls["blocking"], cb_calls["async"]
    seen["weights_equal_no_hook"] = all(torch.equal(a, b) for a, b in zip(plain_weights, cb_weights, strict=True))

    note("validate with an OOM on rank 1")
    val = DataLoader(data(16, seed=7), batch_size=8)
    plain_val = trainer([]).validate(Net(), val, verbose=False)
    split_model = Net()
    OOMInjector(above_batch_size=4, ranks=[1], max_faults=1).attach(split_model.l1)
    cb = tiercache()
    got = trainer([cb]).validate(split_model, val, verbose=False)
    seen["val_sum_plain"] = plain_val[0]["val_sum"]
    seen["val_sum"] = got[0]["val_sum"]
    seen["eval_splits"] = cb.state_dict()["oom"]["eval"]["counters"]["splits"]

    note("done")
    (out_dir / f"seen-{rank}.json").write_text(json.dumps(seen))
    # Tear the process group down before interpreter exit: gloo's threads otherwise race the exit.
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


class _Count:
    """A callback counting the batches each stage ran on this rank (a class at module level: picklable)."""

    def __new__(cls) -> Any:
        import lightning as L

        class Count(L.Callback):
            def __init__(self) -> None:
                self.batches = 0
                self.train_batches = 0

            def on_predict_batch_end(self, *args: Any, **kwargs: Any) -> None:
                self.batches += 1

            def on_validation_batch_end(self, *args: Any, **kwargs: Any) -> None:
                self.batches += 1

            def on_train_batch_end(self, *args: Any, **kwargs: Any) -> None:
                self.train_batches += 1

        return Count()


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
