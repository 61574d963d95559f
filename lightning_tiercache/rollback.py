"""Snapshots of metric states, so that a step that ran out of memory can run again without counting twice.

A retried step must leave torchmetrics states and the values ``self.log`` accumulates as if the failed attempt
never ran. Cloning every tensor state before every step costs more than a short step can afford, so
:class:`MetricSnapshots` learns, per metric class and state name, how the class changes a state:

- replaced by assignment (``self.total = self.total + x``, as Lightning's logged values do): the old tensor is
  never touched again, so keeping a reference to it is a snapshot;
- changed in place (``self.total += x``, as many torchmetrics metrics do): it must be cloned.

It tells the two apart by the tensors' version counters, which every in-place operation bumps. A state is
cloned until a step has shown it is replaced, and goes back to being cloned for good the first time its counter
moves. Inference tensors have no version counter and are always cloned. List states only ever grow by
``append`` (torchmetrics' contract): their length is the snapshot.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

import torch

__all__ = ["MetricSnapshots", "Snapshot"]

log = logging.getLogger(__name__)

_ATTRS = ("_update_count", "_computed", "_forward_cache", "has_reset")
_VALUE, _LENGTH, _REF, _CLONE, _ATTR = range(5)
_ABSENT = object()

#: One saved state: ``(name, kind, saved value, the live tensor when cloned, its version counter)``.
Snapshot = list[tuple[str, int, Any, Any, int]]


class MetricSnapshots:
    """Saves and restores the states of ``torchmetrics.Metric`` objects, cloning only what must be cloned.

    Example::

        snaps = MetricSnapshots()
        saved = snaps.save(metric)
        try:
            metric.update(preds, target)
            ...
        except torch.OutOfMemoryError:
            snaps.restore(metric, saved)  # as if update had not run
        else:
            snaps.learn(metric, saved)  # next time, a state that was replaced is not cloned

    Args:
        replaced: states known to be replaced, never changed in place, as ``{metric class: state names}``; they
            start as references instead of clones (their version counters are still checked every step).
    """

    def __init__(self, replaced: Mapping[type, Iterable[str]] | None = None) -> None:
        self._by_ref: dict[tuple[type, str], bool] = {
            (cls, name): True for cls, names in (replaced or {}).items() for name in names
        }

    def save(self, metric: Any) -> Snapshot:
        """The states of ``metric`` (a reference or a clone of each tensor state) and its bookkeeping fields."""
        out: Snapshot = []
        by_ref = self._by_ref
        cls = type(metric)
        own = vars(metric)  # torchmetrics keeps states as plain attributes; a miss goes through getattr
        for name in getattr(metric, "_defaults", ()):
            v = own[name] if name in own else getattr(metric, name)
            if isinstance(v, torch.Tensor):
                if v.is_inference():  # no version counter to learn from (eval under inference_mode)
                    out.append((name, _CLONE, v.clone(), None, 0))
                elif by_ref.get((cls, name)):
                    out.append((name, _REF, v, None, v._version))
                else:
                    out.append((name, _CLONE, v.clone(), v, v._version))
            elif isinstance(v, list):
                out.append((name, _LENGTH, len(v), None, 0))
            else:
                out.append((name, _VALUE, v, None, 0))
        for attr in _ATTRS:  # a missing name would cost a trip through nn.Module.__getattr__
            out.append((attr, _ATTR, own.get(attr, _ABSENT), None, 0))
        return out

    def learn(self, metric: Any, saved: Snapshot) -> None:
        """After an attempt that succeeded: note which tensor states were replaced and which changed in place."""
        cls = type(metric)
        for name, kind, value, live, version in saved:
            if kind == _CLONE and live is not None:
                key = (cls, name)
                if live._version != version:
                    self._by_ref[key] = False
                elif key not in self._by_ref and getattr(metric, name) is not live:
                    self._by_ref[key] = True
            elif kind == _REF and value._version != version:
                self._by_ref[(cls, name)] = False

    def restore(self, metric: Any, saved: Snapshot) -> None:
        """Put ``metric`` back to what :meth:`save` saw."""
        cls = type(metric)
        for name, kind, value, _, version in saved:
            if kind == _LENGTH:
                del getattr(metric, name)[value:]
                continue
            if kind == _ATTR:
                if value is _ABSENT:
                    vars(metric).pop(name, None)
                else:
                    vars(metric)[name] = value
                continue
            if kind == _REF and value._version != version:
                # Replaced on every step seen so far, changed in place this time: the old value is gone.
                self._by_ref[(cls, name)] = False
                log.warning(
                    "tiercache: %s.%s changed in place after steps that replaced it; the retried step starts from "
                    "its changed value (it is cloned before every step from now on)",
                    cls.__name__,
                    name,
                )
            setattr(metric, name, value)
