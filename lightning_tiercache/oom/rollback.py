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

A metric whose states are all kept by reference (every value ``self.log`` accumulates) is saved on a short
path: its states and their version counters are read by ``operator.attrgetter`` and ``map``, without a Python
loop; any surprise there (a state that is no longer a plain tensor) falls back to the long path.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

__all__ = ["MetricSnapshots", "Snapshot"]

log = logging.getLogger(__name__)

_ATTRS = ("_update_count", "_computed", "_forward_cache", "has_reset")
_VALUE, _LENGTH, _REF, _CLONE, _ATTR = range(5)
_ABSENT = object()
_ABSENTS = (_ABSENT,) * len(_ATTRS)  # `map(own.get, _ATTRS, _ABSENTS)`: the fields' defaults, without a Python loop

_version_of = operator.attrgetter("_version")

#: The long path: one saved state per entry, ``(name, kind, saved value, the live tensor when cloned, its version
#: counter)``, and the bookkeeping fields as one last entry (their values in ``_ATTRS`` order). The short path:
#: ``(state names, their tensors, their version counters, the bookkeeping fields)``.
_Long = list[tuple[str, int, Any, Any, int]]
_Short = tuple[tuple[str, ...], tuple[Any, ...], tuple[int, ...], tuple[Any, ...]]
Snapshot = _Long | _Short


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
        # (class, state names) -> a getter of all the states, for metrics whose every state is a by-reference
        # tensor (the short path); emptied whenever a state goes back to being cloned.
        self._all_ref: dict[tuple[type, tuple[str, ...]], Callable[[Any], tuple[Any, ...]]] = {}

    def save(self, metric: Any) -> Snapshot:
        """The states of ``metric`` (a reference or a clone of each tensor state) and its bookkeeping fields."""
        own = vars(metric)  # torchmetrics keeps states as plain attributes; a miss goes through getattr
        names = tuple(getattr(metric, "_defaults", ()))
        key = (type(metric), names)
        getter = self._all_ref.get(key)
        if getter is not None:
            try:
                values = getter(metric)
                # Inference tensors raise here (no version counter); anything not a tensor has no `_version`.
                return names, values, tuple(map(_version_of, values)), tuple(map(own.get, _ATTRS, _ABSENTS))
            except (AttributeError, RuntimeError):
                del self._all_ref[key]
        out = self._save_long(metric, own, names)
        if names and all(kind == _REF for _, kind, *_ in out[:-1]):
            self._all_ref[key] = operator.attrgetter(*names) if len(names) > 1 else _one_getter(names[0])
        return out

    def _save_long(self, metric: Any, own: dict[str, Any], names: tuple[str, ...]) -> list[Any]:
        out: list[Any] = []
        by_ref = self._by_ref
        cls = type(metric)
        for name in names:
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
        # One entry for the bookkeeping fields (a missing name would cost a trip through nn.Module.__getattr__).
        out.append(("", _ATTR, tuple(map(own.get, _ATTRS, _ABSENTS)), None, 0))
        return out

    def learn(self, metric: Any, saved: Snapshot) -> None:
        """After an attempt that succeeded: note which tensor states were replaced and which changed in place."""
        cls = type(metric)
        if isinstance(saved, tuple):  # the short path: every state by reference
            names, values, versions, _ = saved
            if tuple(map(_version_of, values)) != versions:
                for name, value, version in zip(names, values, versions, strict=True):
                    if value._version != version:
                        self._clone_from_now_on(cls, name)
            return
        for name, kind, value, live, version in saved:
            if kind == _CLONE and live is not None:
                key = (cls, name)
                if live._version != version:
                    self._clone_from_now_on(cls, name)
                elif key not in self._by_ref and getattr(metric, name) is not live:
                    self._by_ref[key] = True
            elif kind == _REF and value._version != version:
                self._clone_from_now_on(cls, name)

    def _clone_from_now_on(self, cls: type, name: str) -> None:
        self._by_ref[(cls, name)] = False
        self._all_ref.clear()

    def restore(self, metric: Any, saved: Snapshot) -> None:
        """Put ``metric`` back to what :meth:`save` saw."""
        cls = type(metric)
        if isinstance(saved, tuple):  # the short path: as the long path would have saved it
            names, values, versions, attrs = saved
            entries: _Long = [(n, _REF, v, None, ver) for n, v, ver in zip(names, values, versions, strict=True)]
            entries.append(("", _ATTR, attrs, None, 0))
        else:
            entries = saved
        for name, kind, value, _, version in entries:
            if kind == _LENGTH:
                del getattr(metric, name)[value:]
                continue
            if kind == _ATTR:
                own = vars(metric)
                for attr, v in zip(_ATTRS, value, strict=True):
                    if v is _ABSENT:
                        own.pop(attr, None)
                    else:
                        own[attr] = v
                continue
            if kind == _REF and value._version != version:
                # Replaced on every step seen so far, changed in place this time: the old value is gone.
                self._clone_from_now_on(cls, name)
                log.warning(
                    "tiercache: %s.%s changed in place after steps that replaced it; the retried step starts from "
                    "its changed value (it is cloned before every step from now on)",
                    cls.__name__,
                    name,
                )
            setattr(metric, name, value)


def _one_getter(name: str) -> Callable[[Any], tuple[Any, ...]]:
    get = operator.attrgetter(name)  # with one name, attrgetter gives the value itself, not a 1-tuple
    return lambda metric: (get(metric),)
