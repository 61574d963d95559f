from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import pytest

from lightning_tiercache import report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_csv(path: Path, rows: list[dict[str, object]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    cols = sorted({k for r in rows for k in r})
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    return path


def history_rows() -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    for step in range(0, 10, 2):
        rows.append(
            {
                "step": step,
                "tiercache/device/bytes": 2**20 * step,
                "tiercache/host/bytes": 2**21,
                "tiercache/disk/bytes": 0,
                "tiercache/hit_rate": 0.9,
                "tiercache/prefetch/wait_p95_s": 0.001,
            }
        )
        rows.append({"step": step, "train_loss": 1.0})  # the model's own rows have no tiercache keys
    return rows


def test_load_history_keeps_only_tiercache_values_by_step(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "metrics.csv", history_rows())
    history = report.load_history(path)
    assert "train_loss" not in history
    assert history["tiercache/device/bytes"] == [(s, float(2**20 * s)) for s in range(0, 10, 2)]


def test_render_writes_a_png_next_to_the_newest_metrics_csv(tmp_path: Path) -> None:
    write_csv(tmp_path / "lightning_logs" / "version_0" / "metrics.csv", [{"step": 0, "tiercache/hit_rate": 1}])
    newest = write_csv(tmp_path / "lightning_logs" / "version_1" / "metrics.csv", history_rows())
    out = report.render(tmp_path)
    assert out == newest.parent / "tiercache.png"
    assert out.read_bytes()[:8] == PNG_MAGIC


def test_cli_writes_to_out_and_reports_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_csv(tmp_path / "run" / "metrics.csv", history_rows())
    target = tmp_path / "x.png"
    assert report.main([str(tmp_path / "run"), "--out", str(target)]) == 0
    assert target.read_bytes()[:8] == PNG_MAGIC
    assert report.main([str(tmp_path / "empty")]) == 2
    assert "no metrics.csv under" in capsys.readouterr().err


def test_a_csv_without_tiercache_metrics_is_an_error_that_names_the_callback(tmp_path: Path) -> None:
    write_csv(tmp_path / "metrics.csv", [{"step": 0, "train_loss": 1.0}])
    with pytest.raises(ValueError, match="was TierCacheCallback in the trainer's callbacks"):
        report.render(tmp_path)


def test_missing_matplotlib_gives_the_install_hint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    with pytest.raises(ImportError, match="pip install matplotlib"):
        report.render(tmp_path)


def _series(steps: range, **values: float) -> dict[str, list[tuple[int, float]]]:
    return {f"tiercache/{k.replace('__', '/')}": [(s, v) for s in steps] for k, v in values.items()}


def test_plan_titles_a_fine_tune_and_draws_only_what_it_did() -> None:
    history = _series(
        range(4, 20, 5), device__peak_bytes=2**20, host__peak_bytes=2**22, disk__peak_bytes=0.0,
        device__budget_use=1.5, host__budget_use=0.5, disk__budget_use=0.0, gets=10, hit_rate=0.6,
        prefetch__wait_share=0.4, prefetch__wait_p95_s=0.002, activations__offloaded_bytes=1.0,
        oom__retries=0, oom__micro_batches=1, kv__hit_rate=0.0, kv__blocks=0,
    )  # fmt: skip
    title, panels = report.plan(history, name="finetune/version_0")
    assert title == "tiercache, fine-tune: finetune/version_0"
    tiers, budget = panels[0], panels[1]
    assert [label for label, _ in tiers.lines] == ["device", "host"]  # the disk held nothing
    assert budget.refs == ((1.0, "budget"),)
    titles = " ".join(p.title for p in panels)
    assert "OOM" not in titles and "KV" not in titles  # no OOM happened; a fine-tune has no KV panel


def test_plan_shows_oom_recovery_after_an_oom_and_the_kv_cache_in_eval() -> None:
    oom = report.plan(_series(range(3), activations__offloaded_bytes=1.0, oom__retries=1, oom__micro_batches=2))[1]
    assert [p.title for p in oom] == ["OOM recovery"]
    title, panels = report.plan(_series(range(3), device__peak_bytes=2**20, kv__blocks=4, kv__hit_rate=0.8))
    assert title == "tiercache, eval"
    assert [p.title for p in panels][-1].startswith("KV cache")
    assert "budget use" not in " ".join(p.title for p in panels)  # budget use 0 everywhere: no flat panel
