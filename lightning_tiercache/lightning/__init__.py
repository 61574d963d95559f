"""The Lightning layer: the only part of the library that imports Lightning.

``callback`` holds :class:`TierCacheCallback`, a thin shell over ``runtime`` (the parts one process runs);
``step_hook`` wraps the strategy's step calls for OOM split-and-retry; ``telemetry`` turns counters into
rank-reduced metrics for the Trainer's loggers; ``batch_copy`` copies the next batch to the device on a side
stream; ``wandb_support`` adds W&B summaries and the events table; ``testing`` injects OOMs.
"""

from __future__ import annotations

from lightning_tiercache.lightning.callback import TierCacheCallback
from lightning_tiercache.lightning.testing import OOMInjector

__all__ = ["OOMInjector", "TierCacheCallback"]
