"""Machine-sized budgets: a node's share of RAM and disk divided among its processes, capped by cgroup limits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightning_tiercache import Tier, TierConfig
from lightning_tiercache.store import budgets
from lightning_tiercache.store.budgets import cgroup_free_bytes, local_world_size, resolve_budgets

GiB = 1 << 30
CPU = torch.device("cpu")


def _write(root: Path, rel: str, files: dict[str, str]) -> None:
    d = root / rel
    d.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (d / name).write_text(text)


def test_cgroup_v2_limit_and_usage_give_the_free_bytes(tmp_path):
    proc = tmp_path / "cgroup"
    proc.write_text("0::/job/step\n")
    _write(tmp_path, "job", {"memory.max": str(8 * GiB), "memory.current": str(7 * GiB)})
    _write(tmp_path, "job/step", {"memory.max": "max", "memory.current": str(5 * GiB)})
    _write(tmp_path, "job", {"memory.stat": f"anon 1\ninactive_file {GiB // 2}\n"})
    assert cgroup_free_bytes(tmp_path, proc) == GiB + GiB // 2  # the tighter ancestor, page cache counted free


def test_cgroup_v1_memory_hierarchy_is_read_and_no_limit_means_none(tmp_path):
    proc = tmp_path / "cgroup"
    proc.write_text("4:memory:/ctr\n3:cpuset:/\n")
    _write(tmp_path, "memory/ctr", {"memory.limit_in_bytes": str(4 * GiB), "memory.usage_in_bytes": str(GiB)})
    assert cgroup_free_bytes(tmp_path, proc) == 3 * GiB
    _write(tmp_path, "memory/ctr", {"memory.limit_in_bytes": "9223372036854771712"})
    assert cgroup_free_bytes(tmp_path, proc) is None


def test_host_budget_is_capped_by_the_cgroup(monkeypatch, tmp_path):
    monkeypatch.setattr(budgets.psutil, "virtual_memory", lambda: type("VM", (), {"available": 64 * GiB})())
    monkeypatch.setattr(budgets, "cgroup_free_bytes", lambda: 4 * GiB)
    got = resolve_budgets(TierConfig(device="cpu", spill_dir=str(tmp_path)), CPU, 1)
    assert got[Tier.HOST] == 2 * GiB


@pytest.mark.parametrize("var", budgets.LOCAL_SIZE_VARS)
def test_machine_sized_budgets_are_divided_among_the_node_processes(monkeypatch, tmp_path, var):
    for name in budgets.LOCAL_SIZE_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(budgets, "host_free_bytes", lambda: 16 * GiB)
    monkeypatch.setattr(budgets, "_disk_free_bytes", lambda cfg: 100 * GiB)
    cfg = TierConfig(device="cpu", spill_dir=str(tmp_path))
    alone = resolve_budgets(cfg, CPU)
    monkeypatch.setenv(var, "4")
    assert local_world_size() == 4
    shared = resolve_budgets(cfg, CPU)
    assert (alone[Tier.HOST], alone[Tier.DISK]) == (8 * GiB, 50 * GiB)
    assert (shared[Tier.HOST], shared[Tier.DISK]) == (2 * GiB, 50 * GiB // 4)
    explicit = resolve_budgets(TierConfig(device="cpu", spill_dir=str(tmp_path), host_bytes="1GiB"), CPU)
    assert explicit[Tier.HOST] == GiB  # an explicit size is used as given


def test_local_world_size_must_be_positive():
    with pytest.raises(ValueError, match="local_world_size=0 must be None or an int >= 1"):
        TierConfig(local_world_size=0)
