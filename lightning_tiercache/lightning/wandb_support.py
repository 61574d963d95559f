"""W&B extras for a run with a ``WandbLogger``: metric summaries and a table of notable events.

Imported by the callback only when one of the trainer's loggers is a ``WandbLogger``; the rest of the library
never imports ``wandb``. Everything here runs on global rank zero (the logger's ``experiment`` is a dummy
elsewhere); the callback gathers every rank's events there first
(:func:`lightning_tiercache.store.events.gather_events`), so the events table holds all ranks' events, each
row with the rank it came from.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any

from lightning_tiercache.lightning.telemetry import METRICS, MetricSpec

__all__ = ["EVENTS_KEY", "EVENT_COLUMNS", "WandbBridge", "find_wandb_logger"]

#: The key of the events table in the run.
EVENTS_KEY = "tiercache/events"
#: Columns of the events table.
EVENT_COLUMNS = ("step", "rank", "source", "event", "detail", "time")
_STEP_METRIC = "trainer/global_step"


def find_wandb_logger(loggers: Iterable[Any]) -> Any | None:
    """The first ``WandbLogger`` among ``loggers``, or ``None`` (no ``wandb`` import needed to check)."""
    from lightning.pytorch.loggers import WandbLogger

    for logger in loggers:
        if isinstance(logger, WandbLogger):
            return logger
    return None


class WandbBridge:
    """Defines W&B summaries for :data:`~lightning_tiercache.lightning.telemetry.METRICS` and keeps the events table.

    Args:
        logger: a Lightning ``WandbLogger``.
        specs: the metric specs whose summaries to define.
    """

    def __init__(self, logger: Any, specs: Iterable[MetricSpec] = METRICS) -> None:
        self.logger = logger
        self.rows: list[list[Any]] = []
        self._logged_rows = 0
        run = logger.experiment
        run.define_metric(_STEP_METRIC)
        for s in specs:
            if s.summary is not None:
                run.define_metric(s.key, summary=s.summary, step_metric=_STEP_METRIC)

    def add_events(self, events: Iterable[Mapping[str, Any]], *, step: int, source: str, rank: int = 0) -> None:
        """Remember notable events (``{"event", "detail", "time"}`` dicts from the parts' ``drain_events``)."""
        for e in events:
            self.rows.append(
                [
                    int(step),
                    int(rank),
                    source,
                    str(e.get("event", "")),
                    str(e.get("detail", ""))[:500],
                    float(e.get("time", time.time())),
                ]
            )

    def flush(self) -> bool:
        """Log the whole events table if rows were added since the last flush. Returns whether it logged."""
        if len(self.rows) == self._logged_rows:
            return False
        import wandb

        table = wandb.Table(columns=list(EVENT_COLUMNS), data=[list(r) for r in self.rows])
        self.logger.experiment.log({EVENTS_KEY: table})
        self._logged_rows = len(self.rows)
        return True
