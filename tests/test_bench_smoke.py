"""Smoke tests of ``python -m lightning_tiercache.bench limits``, ``store``, ``overhead`` and ``activations``, tiny.

They prove the benchmarks run end to end and emit well-formed JSON; they make no speed claims.
"""

from __future__ import annotations

import gc
import json
import math
import subprocess
from typing import Any

import pytest
import torch

from lightning_tiercache.bench import limits, store
from lightning_tiercache.bench.__main__ import main as bench_main


def _run(capsys: pytest.CaptureFixture[str], module: Any, argv: list[str]) -> dict[str, Any]:
    assert module.main(argv) == 0
    return json.loads(capsys.readouterr().out)


def _positive(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


def test_limits_json_has_every_limit_finite_and_positive(capsys, tmp_path):
    out = _run(capsys, limits, ["--json", "--size", "256KiB", "--repeats", "1", "--spill-dir", str(tmp_path)])
    assert out["bench"] == "limits"
    assert out["machine"]["cpu_cores"] >= 1
    names = {r["limit"] for r in out["rows"]}
    assert {"memcpy", "file_write", "file_read", "zstd1_compress", "zstd1_decompress"} <= names
    for row in out["rows"]:
        assert _positive(row["GB/s"]), row
    lim = out["limits"]
    for key in ("memcpy_Bps", "file_write_Bps", "file_read_Bps", "zstd1_compress_Bps", "zstd1_ratio"):
        assert _positive(lim[key]), key
    assert lim["nbytes"] == 256 * 1024
    assert list(tmp_path.iterdir()) == []  # scratch files removed


def test_store_json_covers_every_section_codec_and_dtype(capsys, tmp_path):
    out = _run(capsys, store, ["--json", "--size", "256KiB", "--repeats", "1", "--spill-dir", str(tmp_path)])
    assert out["bench"] == "store"
    rows = out["rows"]
    disk = {(r["codec"], r["dtype"], r["op"]) for r in rows if r["section"] == "disk"}
    assert disk == {
        (c, d, op) for c in ("none", "zstd", "byteplane", "auto") for d in store.DTYPES for op in ("write", "read")
    }
    codec = {(r["codec"], r["data"], r["op"]) for r in rows if r["section"] == "codec" and r["dtype"] == "bf16"}
    assert ("byteplane", "gelu", "ratio") in codec and ("byteplane", "layernorm", "compress") in codec
    assert {r["op"] for r in rows if r["section"] == "memory"} == {"device put+get", "host put+get"}
    for row in rows:
        assert _positive(row["fraction"]) and _positive(row["limit"]), row
        if row["GB/s"] is not None:
            assert _positive(row["GB/s"]), row
        if row["section"] == "disk":
            assert _positive(row["record"]) and _positive(row["store/record"]) and _positive(row["ratio"]), row
            assert row["picked"] in ("none", "zstd", "byteplane"), row
    byteplane_bf16 = [r for r in rows if r["section"] == "codec" and r["codec"] == "byteplane" and r["op"] == "ratio"]
    assert all(r["ratio"] > 1.0 for r in byteplane_bf16)
    targets = [r for r in rows if "target" in r and r["target"] is not None]
    assert {r["ok"] for r in targets} <= {"yes", "NO"} and targets
    assert isinstance(out["targets_missed"], list)
    assert list(tmp_path.iterdir()) == []


def test_bench_entry_point_dispatches_and_prints_a_table(capsys, tmp_path):
    assert bench_main(["limits", "--size", "64KiB", "--repeats", "1", "--spill-dir", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert text.startswith("# limits") and "| memcpy" in text and "file_read" in text


@pytest.mark.parametrize("kind", limits.ACTIVATION_KINDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_activation_like_is_deterministic_and_not_uniform_noise(kind, dtype):
    a = limits.activation_like(5000, dtype, kind, seed=3)
    assert a.shape == (5000,) and a.dtype == dtype
    assert torch.equal(a, limits.activation_like(5000, dtype, kind, seed=3))
    x = a.float()
    if kind == "gelu":
        assert x.min() > -0.2  # GELU's floor is about -0.17
    else:
        assert abs(x.mean()) < 0.2 and 0.5 < x.std() < 1.5  # LayerNorm output


def test_activation_like_rejects_unknown_kind():
    with pytest.raises(ValueError, match="kind='relu' is not one of gelu, layernorm"):
        limits.activation_like(10, torch.float32, "relu")


def test_overhead_json_reports_ratios_and_the_callbacks_own_time(capsys):
    from lightning_tiercache.bench import overhead

    argv = ["--json", "--repeats", "1", "--steps", "12", "--skip", "2", "--width", "32", "--batch", "4"]
    out = _run(capsys, overhead, argv)
    (row,) = out["rows"]
    assert row["workload"] == "MLP 32 x 8, batch 4"
    for key in ("plain_step_ms", "step_ratio", "fit_ratio", "self_us_per_step", "self_share", "timers_us_per_step"):
        assert _positive(row[key]), (key, row)
    assert row["timers_us_per_step"] < row["self_us_per_step"]  # the control times the timers alone
    assert row["self_share_net"] < row["self_share"]


def test_overhead_instructions_difference_two_fit_lengths(monkeypatch, capsys):
    """``--instructions``: per-step counts are the slope between the two fit lengths, one-off work cancels."""
    from lightning_tiercache.bench import overhead

    def fake_count(width: int, depth: int, batch: int, steps: int, variant: str) -> int:
        # start-up 5e9, 1e6 a step; an empty callback: 1e3 a step; ours: 2e7 once, 4e3 a step
        extra = {"plain": 0, "empty": 1_000 * steps, "callback": 20_000_000 + 4_000 * steps}[variant]
        return 5_000_000_000 + steps * 1_000_000 + extra

    monkeypatch.setattr(overhead, "_count", fake_count)
    monkeypatch.setattr(overhead.shutil, "which", lambda name: "/usr/bin/valgrind")
    out = _run(capsys, overhead, ["--json", "--instructions", "--skip", "10", "--steps", "30", "--width", "64"])
    (row,) = out["rows"]
    assert row["workload"] == "MLP 64 x 8, batch 48, 1 thread"
    assert (row["plain_instr_per_step"], row["callback_instr_per_step"]) == (1_000_000, 1_004_000)
    assert row["extra_instr_per_step"] == 4_000 and row["one_off_instr"] == 20_000_000
    assert row["extra_share"] == pytest.approx(0.004)
    assert row["empty_extra_instr_per_step"] == 1_000 and row["empty_extra_share"] == pytest.approx(0.001)
    assert out["method"] == "valgrind cachegrind, 1 thread, fits of 10 and 40 steps differenced"


def test_overhead_instructions_reads_valgrinds_count_and_reports_its_failures(monkeypatch):
    from lightning_tiercache.bench import overhead

    seen: dict[str, Any] = {}

    def run(cmd: list[str], **kw: Any) -> Any:
        seen.update(cmd=cmd, env=kw["env"])
        return subprocess.CompletedProcess(cmd, 0, "", "==1== \n==1== I   refs:      19,642,491,277\n")

    monkeypatch.setattr(overhead.subprocess, "run", run)
    assert overhead._count(32, 2, 4, 10, "callback") == 19_642_491_277
    assert seen["cmd"][:2] == ["valgrind", "--tool=cachegrind"] and seen["env"]["OMP_NUM_THREADS"] == "1"
    assert "count_fit(32, 2, 4, 10, 'callback')" in seen["cmd"][-1]
    monkeypatch.setattr(overhead.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, "", "boom"))
    with pytest.raises(RuntimeError, match="valgrind fit failed \\(exit 1\\):\nboom"):
        overhead._count(32, 2, 4, 10, "plain")


def test_overhead_instructions_without_valgrind_says_what_to_install(monkeypatch, capsys):
    from lightning_tiercache.bench import overhead

    monkeypatch.setattr(overhead.shutil, "which", lambda name: None)
    with pytest.raises(SystemExit):
        overhead.main(["--instructions"])
    assert "needs valgrind on PATH" in capsys.readouterr().err


def test_count_fit_runs_one_fit_on_one_thread():
    from lightning_tiercache.bench import overhead

    threads = torch.get_num_threads()
    try:
        overhead.count_fit(16, 1, 2, 3, "callback")
        assert torch.get_num_threads() == 1
        assert gc.get_freeze_count() > 0  # what was alive before the fit is out of the collector's way
    finally:
        torch.set_num_threads(threads)
        gc.unfreeze()


def test_bench_help_describes_every_benchmark_and_an_unknown_one_is_an_invalid_choice(capsys):
    from lightning_tiercache.bench.__main__ import BENCHES

    assert bench_main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in BENCHES:
        (line,) = [x for x in out.splitlines() if x.startswith(f"  {name} ")]
        assert len(line.split()) > 3, line  # a description, not only the name
    assert bench_main(["bogus"]) == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'bogus' (choose from limits," in err


@pytest.mark.slow  # one fresh process per variant for its memory, and two compilations of the blocks
def test_activations_runs_every_cpu_variant_and_reports_a_ratio_and_rss_figures(capsys):
    from lightning_tiercache.bench import activations

    torch._dynamo.reset()
    argv = ["--json", "--model", "tiny", "--repeats", "1", "--min-bytes", "1KiB", "--budget-share", "0.6"]
    out = _run(capsys, activations, argv)
    torch._dynamo.reset()
    rows = {r["variant"]: r for r in out["rows"]}
    assert list(rows) == ["none", "checkpoint", "ours_disk", "ours_disk_ckpt", "ours_compile"]
    assert out["model"]["n_layer"] == 2 and out["ours_device_budget_mib"] > 0
    for name, row in rows.items():
        assert row["note"] is None, (name, row["note"])  # a failed memory child, or a tiercache warning
        assert _positive(row["step_x"]) and _positive(row["peak_rss_mib"]), row
        assert isinstance(row["rss_growth_mib"], int) and _positive(row["resident_mib"]), row
        # the first step's peak and each later step's, reported apart (ours plans from the second step on)
        assert isinstance(row["first_growth_mib"], int), row
        assert len(row["step_growth_mib"].split("/")) == 2, row
        if name.startswith("ours"):
            assert row["moved_mib_step"] is not None and row["wait_ms_step"] is not None, row
        # the timed steps' page faults and kernel time, measured in the variant's own process
        assert row["faults_k_step"] >= 0 and row["sys_s_step"] >= 0, row
    assert rows["ours_disk"]["moved_mib_step"] > 0  # the budget is a share of the saved bytes: some must move
