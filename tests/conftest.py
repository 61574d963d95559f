from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from lightning_tiercache import TierConfig, TierStore

# Subprocesses the tests start import this checkout's package, not whichever one is installed.
_ROOT = str(Path(__file__).resolve().parents[1])
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_ROOT, os.environ.get("PYTHONPATH")) if p)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def spill_parent(tmp_path):
    d = tmp_path / "spill"
    d.mkdir()
    return d


@pytest.fixture
def make_store(spill_parent):
    """Build stores that spill under the test's temp dir; all are closed after the test."""
    stores: list[TierStore] = []

    def make(**kw) -> TierStore:
        kw.setdefault("spill_dir", str(spill_parent))
        kw.setdefault("device", "cpu")
        s = TierStore(TierConfig(**kw))
        stores.append(s)
        return s

    yield make
    for s in stores:
        s.close()
