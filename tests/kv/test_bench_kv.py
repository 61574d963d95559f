"""Smoke test of ``python -m lightning_tiercache.bench kv`` at a tiny size: every line is reported and agrees.

It proves the benchmark runs end to end, that it reports every variant of both workloads and the bound's
figures, and that its variants compute the same tokens and logits; it makes no speed claims.
"""

from __future__ import annotations

import json
import math

from lightning_tiercache.bench import kv

TINY = [
    "--json", "--prompts", "4", "--batch", "2", "--prefix", "32", "--question", "8", "--new", "2", "--block", "8",
    "--layers", "1", "--shots", "2", "--shot-tokens", "16", "--score-questions", "2", "--repeats", "1",
]  # fmt: skip
GENERATE = {"DynamicCache", "Tiered (no reuse)", "Tiered offload", "Tiered reuse", "bound (prefix precomputed)"}
SCORE = {"uncached forward", "score_forward (reuse)", "bound (context precomputed)"}
COLUMNS = {"median s", "tokens/s vs baseline", "of bound", "hit rate", "max |dlogit|"}


def test_bench_kv_reports_every_line_with_equal_results(capsys):
    assert kv.main([*TINY, "--tiering", "1"]) == 0
    out = json.loads(capsys.readouterr().out)
    rows = {(r["workload"].split()[0], r["variant"]): r for r in out["rows"]}
    assert {v for w, v in rows if w == "generate"} == GENERATE
    assert {v for w, v in rows if w == "score"} == SCORE
    for (workload, _), row in rows.items():
        assert set(row) >= COLUMNS, row
        assert row["median s"] > 0 and row["tokens/s vs baseline"] > 0 and row["of bound"] > 0, row
        assert row["max |dlogit|"] <= 1e-4, row
        if workload == "generate":
            assert row["tokens equal"] and row["peak device KV MiB"] > 0, row
    assert rows[("generate", "bound (prefix precomputed)")]["of bound"] == 1
    for workload, variant in [("generate", "Tiered reuse"), ("score", "score_forward (reuse)")]:
        assert rows[(workload, variant)]["hit rate"] > 0.5
    for key in ("dynamic_tokens_per_s", "prefix_prefill_once_s", "scoring_uncached_tokens_per_s"):
        assert out[key] > 0, key
    for key in ("prefix_share_of_dynamic", "scoring_context_share_of_uncached"):
        assert math.isfinite(out[key]) and out[key] < 1, key
    for key in ("reuse_ceiling_of_bound", "scoring_reuse_ceiling_of_bound"):
        assert 0 < out[key] < 1, key
    assert set(out["lossy"]) == {"int8", "int4"} and out["lossy"]["int8"]["token_agreement"] > 0.5
    assert out["workload"]["pad"] == "left" and out["workload"]["mode"] == "default"


def test_the_default_is_the_short_few_shot_workload_and_full_the_long_run():
    short = kv.parse([])
    # Few-shot prompts sharing a ~200-token prefix, 12-24-token questions, left-padded; 4 choices after 5 shots.
    assert (short.prefix, short.question, short.pad, short.new) == (200, 24, "left", 32)
    assert (short.shots, short.choices, short.tiering) == (5, 4, 0)
    assert short.repeats >= 5 and short.prompts // short.batch >= 4  # medians of several rounds of batches
    full = kv.parse(["--full"])
    assert (full.prefix, full.question, full.tiering, full.width) == (1024, 64, 1, 256)
    assert kv.parse(["--full"], cuda=True).width == 1024
    assert kv.parse(["--full", "--prefix", "64", "--tiering", "0"]).prefix == 64  # an option given wins
    assert kv.parse(["--full", "--tiering", "0"]).tiering == 0
