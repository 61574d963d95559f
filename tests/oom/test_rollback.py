"""MetricSnapshots: exact rollback of metric states, cloning only states that are changed in place."""

from __future__ import annotations

import logging

import pytest
import torch
import torchmetrics

from lightning_tiercache.oom.rollback import MetricSnapshots


class InPlace(torchmetrics.Metric):
    def __init__(self) -> None:
        super().__init__()
        self.add_state("total", torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("seen", [], dist_reduce_fx="cat")

    def update(self, x: torch.Tensor) -> None:
        self.total += x.sum()
        self.seen.append(x)

    def compute(self) -> torch.Tensor:
        return self.total


class Replaced(torchmetrics.Metric):
    def __init__(self) -> None:
        super().__init__()
        self.add_state("total", torch.tensor(0.0), dist_reduce_fx="sum")
        self.in_place = False

    def update(self, x: torch.Tensor) -> None:
        if self.in_place:
            self.total += x.sum()
        else:
            self.total = self.total + x.sum()

    def compute(self) -> torch.Tensor:
        return self.total


@pytest.mark.parametrize("cls", [InPlace, Replaced])
def test_restore_undoes_an_update_exactly(cls: type[torchmetrics.Metric]) -> None:
    snaps = MetricSnapshots()
    m = cls()
    for _ in range(4):  # the first steps learn, the later ones use what was learned
        saved = snaps.save(m)
        m.update(torch.tensor([1.0, 2.0]))
        snaps.learn(m, saved)
    assert m.compute().item() == 12.0
    saved = snaps.save(m)
    m.update(torch.tensor([100.0]))
    snaps.restore(m, saved)
    assert m.compute().item() == 12.0
    assert m._update_count == 4
    if cls is InPlace:
        assert len(m.seen) == 4


def test_only_states_changed_in_place_are_cloned() -> None:
    snaps = MetricSnapshots()
    a, b = InPlace(), Replaced()
    for m in (a, b):
        saved = snaps.save(m)
        m.update(torch.tensor([1.0]))
        snaps.learn(m, saved)
    total_a = next(e for e in snaps.save(a) if e[0] == "total")
    total_b = next(e for e in snaps.save(b) if e[0] == "total")
    assert total_a[2] is not a.total  # cloned: update changes it in place
    assert total_b[2] is b.total  # a reference: update replaces it


def _learned_replaced() -> tuple[MetricSnapshots, Replaced]:
    """A ``Replaced`` metric after one learning step (its state is snapshotted by reference), now in place."""
    snaps, m = MetricSnapshots(), Replaced()
    saved = snaps.save(m)
    m.update(torch.tensor([1.0]))
    snaps.learn(m, saved)
    m.in_place = True
    return snaps, m


def test_a_state_that_turns_in_place_is_cloned_again() -> None:
    snaps, m = _learned_replaced()
    saved = snaps.save(m)  # by reference now
    m.update(torch.tensor([5.0]))
    snaps.learn(m, saved)  # learn sees the counter move: clone from now on
    saved = snaps.save(m)
    m.update(torch.tensor([7.0]))
    snaps.restore(m, saved)
    assert m.total.item() == 6.0


def test_an_in_place_change_of_a_referenced_state_is_reported(caplog: pytest.LogCaptureFixture) -> None:
    # The one case that cannot be exact: a referenced state changed in place on the failing step.
    snaps, m = _learned_replaced()
    saved = snaps.save(m)
    m.update(torch.tensor([2.0]))
    with caplog.at_level(logging.WARNING):
        snaps.restore(m, saved)
    assert "changed in place" in caplog.text
    assert next(e for e in snaps.save(m) if e[0] == "total")[2] is not m.total


def test_inference_tensors_are_cloned() -> None:
    snaps = MetricSnapshots()
    with torch.inference_mode():
        m = InPlace()
        m.update(torch.tensor([1.0]))
    saved = snaps.save(m)
    with torch.inference_mode():
        m.update(torch.tensor([3.0]))
    snaps.learn(m, saved)
    snaps.restore(m, saved)
    assert m.total.item() == 1.0


def test_a_step_that_did_not_touch_a_state_teaches_nothing() -> None:
    snaps = MetricSnapshots()
    m = InPlace()
    saved = snaps.save(m)
    snaps.learn(m, saved)  # no update this step: neither replaced nor changed
    saved = snaps.save(m)
    m.update(torch.tensor([4.0]))
    snaps.restore(m, saved)
    assert m.total.item() == 0.0


def _short_path() -> tuple[MetricSnapshots, Replaced]:
    """A ``Replaced`` metric whose snapshots have settled on the short path (a tuple, every state referenced)."""
    snaps, m = MetricSnapshots(), Replaced()
    for _ in range(3):
        saved = snaps.save(m)
        m.update(torch.tensor([1.0]))
        snaps.learn(m, saved)
    assert isinstance(snaps.save(m), tuple)
    return snaps, m


def test_short_path_restores_like_the_long_one() -> None:
    snaps, m = _short_path()
    before, count = m.total, m._update_count
    saved = snaps.save(m)
    m.update(torch.tensor([50.0]))
    m._forward_cache = torch.tensor(1.0)  # a bookkeeping field changed: it is put back too
    snaps.restore(m, saved)
    assert m.total is before and m.total.item() == 3.0
    assert m._update_count == count
    assert m._forward_cache is None


def test_short_path_notices_a_state_that_turns_in_place(caplog: pytest.LogCaptureFixture) -> None:
    snaps, m = _short_path()
    m.in_place = True
    saved = snaps.save(m)
    m.update(torch.tensor([5.0]))
    snaps.learn(m, saved)  # the counter moved: the short path is gone, the state is cloned from now on
    saved = snaps.save(m)
    assert isinstance(saved, list)
    m.update(torch.tensor([7.0]))
    with caplog.at_level(logging.WARNING):
        snaps.restore(m, saved)
    assert m.total.item() == 8.0
    assert "changed in place" not in caplog.text


def test_short_path_falls_back_when_a_state_is_no_longer_a_plain_tensor() -> None:
    snaps, m = _short_path()
    with torch.inference_mode():
        m.total = m.total + 1  # an inference tensor: no version counter
    saved = snaps.save(m)
    assert isinstance(saved, list)
    with torch.inference_mode():
        m.update(torch.tensor([2.0]))
    snaps.restore(m, saved)
    assert m.total.item() == 4.0
