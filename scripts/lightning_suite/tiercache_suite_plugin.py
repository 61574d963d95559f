"""Appends ``TierCacheCallback()`` to every ``lightning.pytorch.Trainer`` a test builds (``TIERCACHE_SUITE=on``)."""

from __future__ import annotations

import functools
import os
from typing import Any

import pytest


def _wrap_trainer_init() -> None:
    from lightning.pytorch import Trainer

    from lightning_tiercache import TierCacheCallback

    original = Trainer.__init__

    @functools.wraps(original)
    def __init__(self: Trainer, *args: Any, **kwargs: Any) -> None:
        callbacks = kwargs.get("callbacks")
        if callbacks is None:
            callbacks = []
        elif not isinstance(callbacks, list):
            callbacks = [callbacks]
        else:
            callbacks = list(callbacks)
        kwargs["callbacks"] = [*callbacks, TierCacheCallback()]
        original(self, *args, **kwargs)

    Trainer.__init__ = __init__  # type: ignore[method-assign]


def pytest_configure(config: pytest.Config) -> None:
    # Markers of plugins Lightning's CI installs (pytest-rerunfailures); unknown markers fail collection.
    config.addinivalue_line("markers", "flaky: rerun a flaky test (pytest-rerunfailures)")
    if os.environ.get("TIERCACHE_SUITE", "off") == "on":
        _wrap_trainer_init()
