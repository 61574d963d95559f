"""Smoke test of ``python -m lightning_tiercache.bench kv`` at a tiny size: every variant runs and agrees.

It proves the benchmark runs end to end and that its variants compute the same tokens and logits; it makes
no speed claims.
"""

from __future__ import annotations

import json

from lightning_tiercache.bench import kv

TINY = [
    "--json", "--prompts", "4", "--batch", "2", "--prefix", "32", "--question", "8", "--new", "2", "--block", "8",
    "--layers", "1", "--shots", "2", "--shot-tokens", "16", "--score-questions", "2", "--repeats", "1",
]  # fmt: skip


def test_bench_kv_runs_generation_scoring_and_bounds_with_equal_results(capsys):
    assert kv.main(TINY) == 0
    out = json.loads(capsys.readouterr().out)
    rows = {(r["workload"].split()[0], r["variant"]): r for r in out["rows"]}
    generate = {v for w, v in rows if w == "generate"}
    assert {"DynamicCache", "Tiered reuse", "bound (prefix precomputed)", "Tiered offload"} <= generate
    assert {v for w, v in rows if w == "score"} == {
        "uncached forward", "score_forward (reuse)", "bound (context precomputed)"
    }  # fmt: skip
    for (workload, _), row in rows.items():
        assert row["max |dlogit|"] <= 1e-4, row
        if workload == "generate":
            assert row["tokens equal"], row
    assert rows[("generate", "Tiered reuse")]["hit rate"] > 0.5
    assert rows[("score", "score_forward (reuse)")]["hit rate"] > 0.5
    assert out["workload"]["pad"] == "left"
