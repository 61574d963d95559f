"""The OOM layer: recover from out-of-memory inside a step without changing what the optimizer sees.

``recovery`` detects OOMs, frees caches and runs the micro-batch ladder with grow-back and cross-rank
agreement; ``microbatch`` runs one step as micro-batches with retry; ``split`` splits batches and merges
outputs; ``rollback`` snapshots metric state so a retried step counts once. Plain PyTorch: the Lightning step
hook (:mod:`lightning_tiercache.lightning.step_hook`) drives it.
"""

from __future__ import annotations

from lightning_tiercache.oom.microbatch import MicroBatchRunner, StepResult, micro_batches
from lightning_tiercache.oom.recovery import MicroBatchPolicy, OOMConfig, is_oom_error
from lightning_tiercache.oom.split import batch_size_of, merge_outputs, split_batch

__all__ = [
    "MicroBatchPolicy",
    "MicroBatchRunner",
    "OOMConfig",
    "StepResult",
    "batch_size_of",
    "is_oom_error",
    "merge_outputs",
    "micro_batches",
    "split_batch",
]
