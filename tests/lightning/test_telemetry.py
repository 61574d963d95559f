from __future__ import annotations

import re
from pathlib import Path

import psutil
import pytest
import torch

import lightning_tiercache.lightning.telemetry as telemetry_module
from lightning_tiercache import Kind
from lightning_tiercache.lightning.telemetry import (
    FEATURES,
    METRICS,
    MetricSpec,
    Telemetry,
    TelemetryMetric,
    host_memory,
    metrics_markdown,
    spec,
)

DOCS = Path(__file__).resolve().parents[2] / "docs" / "callback.md"


def keys_of(*features: str) -> set[str]:
    return {s.key for s in METRICS if s.feature in features}


def test_every_key_is_namespaced_unique_and_documented_once() -> None:
    keys = [s.key for s in METRICS]
    assert len(keys) == len(set(keys))
    assert all(re.fullmatch(r"tiercache/[a-z0-9_/]+", k) for k in keys)
    assert {s.feature for s in METRICS} == set(FEATURES)


def test_docs_table_is_generated_from_the_metric_constant() -> None:
    text = DOCS.read_text()
    block = text.split("<!-- metrics:start -->\n", 1)[1].split("<!-- metrics:end -->", 1)[0]
    assert block == metrics_markdown(), "regenerate with: python -m lightning_tiercache.lightning.telemetry"


def test_spec_rejects_unknown_reduction_and_names_the_choices() -> None:
    with pytest.raises(ValueError, match=r"reduce='median' for 'tiercache/x' is not one of sum, max, min, mean"):
        MetricSpec("tiercache/x", "median", "store", "count", None, "x")


def test_spec_lookup_names_undocumented_key() -> None:
    assert spec("tiercache/hit_rate").reduce == "mean"
    with pytest.raises(KeyError, match="tiercache/nope"):
        spec("tiercache/nope")


def test_every_n_must_be_positive() -> None:
    with pytest.raises(ValueError, match="every_n=0 must be an int >= 1 or None"):
        Telemetry(0)


def test_due_matches_lightning_cadence() -> None:
    t = Telemetry(3)
    assert [s for s in range(10) if t.due(s)] == [2, 5, 8]


def test_sample_of_a_store_gives_exactly_the_store_and_system_keys(make_store) -> None:
    store = make_store(device_bytes=4096, host_bytes=4096, disk_bytes="1MiB")
    handles = [store.put(torch.full((512,), float(i))) for i in range(6)]  # 12 KiB > 8 KiB: spills to disk
    store.settle()
    for h in handles:
        store.get(h)
    values = Telemetry(1).sample(store)
    assert set(values) == keys_of("store", "system")
    assert values["tiercache/spills"] >= 1
    assert values["tiercache/bandwidth/to_disk_bytes_per_s"] > 0
    # The window's peak: above 1 only while bytes leaving the tier are still being copied out.
    assert values["tiercache/device/budget_use"] > 0
    assert values["tiercache/device/bytes"] <= 4096
    assert values["tiercache/ranks"] == 1.0
    assert values["tiercache/hit_rate"] + values["tiercache/prefetch/wait_share"] == pytest.approx(1.0)


def test_bandwidth_is_per_window_not_cumulative(make_store) -> None:
    store = make_store(device_bytes=4096, host_bytes=0, disk_bytes="1MiB")
    t = Telemetry(1)
    store.put(torch.ones(2048), kind=Kind.REQUIRED)  # 8 KiB > device budget: goes to disk
    store.settle()
    assert t.sample(store)["tiercache/bandwidth/to_disk_bytes_per_s"] > 0
    assert t.sample(store)["tiercache/bandwidth/to_disk_bytes_per_s"] == 0.0


class _Stats:
    def __init__(self, **stats: float) -> None:
        self._stats = stats

    def stats(self) -> dict[str, float]:
        return self._stats


def test_parts_add_their_keys() -> None:
    values = Telemetry(1).sample(
        None,
        activations=_Stats(offloaded_bytes=10, unpacks=4, unpack_waits=1, unpack_wait_s=0.5, prefetch_lead=2),
        oom=_Stats(oom_retries=3, current_micro_batches=4),
        kv=_Stats(hits=3, misses=1, hit_tokens=48, blocks=5, evictions=0),
    )
    assert set(values) == keys_of("system", "activations", "oom", "kv")
    assert values["tiercache/activations/unpack_wait_share"] == 0.25
    assert values["tiercache/oom/micro_batches"] == 4
    assert values["tiercache/kv/hit_rate"] == 0.75


def test_metric_reduces_each_key_with_its_own_operation() -> None:
    """Two fake ranks: the gather returns this rank's state and a second rank's (the state times 3)."""

    def fake_gather(t: torch.Tensor, group: object = None) -> list[torch.Tensor]:
        return [t, t * 3]

    m = TelemetryMetric(dist_sync_fn=fake_gather, distributed_available_fn=lambda: True)
    local = {s.key: 2.0 for s in METRICS}
    m.update(local)
    out = m.compute()
    expected = {"sum": 8.0, "max": 6.0, "min": 2.0, "mean": 4.0}
    for s in METRICS:
        assert out[s.key] == expected[s.reduce], s.key
    m.update(local)  # states were restored after the sync: reducing again gives the same answer
    assert m.compute() == out


def test_reduce_returns_only_the_sampled_keys_and_keeps_them_as_last() -> None:
    t = Telemetry(1)
    out = t.reduce({"tiercache/hit_rate": 0.5, "tiercache/spills": 3.0})
    assert out == {"tiercache/hit_rate": 0.5, "tiercache/spills": 3.0}
    assert t.last == out


def test_log_hands_values_to_every_logger() -> None:
    seen: list[tuple[dict[str, float], int | None]] = []

    class Logger:
        def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
            seen.append((metrics, step))

    Telemetry(1).log([Logger(), Logger()], {"tiercache/spills": 1.0}, step=7)
    assert seen == [({"tiercache/spills": 1.0}, 7)] * 2


@pytest.mark.skipif(not Path("/proc/meminfo").exists(), reason="reads /proc on Linux only")
def test_host_memory_agrees_with_psutil() -> None:
    hold = torch.ones(8 << 20, dtype=torch.uint8)  # 8 MiB resident while both read
    rss, available = host_memory()
    assert abs(rss - psutil.Process().memory_info().rss) < 4 << 20
    assert abs(available - psutil.virtual_memory().available) < 256 << 20  # other processes come and go
    assert rss >= hold.numel()


def test_host_memory_falls_back_to_psutil_when_proc_cannot_be_read(monkeypatch) -> None:
    def refuse(*args: object, **kwargs: object) -> object:
        raise PermissionError("no /proc here")

    monkeypatch.setattr(telemetry_module, "open", refuse, raising=False)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: type("VM", (), {"available": 12345})())
    rss, available = host_memory()
    assert available == 12345
    assert rss > 0


def test_host_ram_is_read_at_most_once_per_interval(monkeypatch) -> None:
    reads: list[int] = []

    def fake() -> tuple[int, int]:
        reads.append(1)
        return len(reads) * 10, len(reads) * 100

    monkeypatch.setattr(telemetry_module, "host_memory", fake)
    slow = Telemetry(1, host_every_s=3600.0)
    first, second = slow.sample(None), slow.sample(None)
    assert len(reads) == 1
    assert second["tiercache/host_ram/rss_bytes"] == first["tiercache/host_ram/rss_bytes"] == 10.0
    every = Telemetry(1, host_every_s=0.0)
    assert every.sample(None)["tiercache/host_ram/available_bytes"] == 200.0
    assert every.sample(None)["tiercache/host_ram/available_bytes"] == 300.0
    with pytest.raises(ValueError, match="host_every_s"):
        Telemetry(1, host_every_s=-1.0)
