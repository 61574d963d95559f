"""gather_events: local behaviour without a process group, JSON encoding, the per-rank cap, and 2-rank gloo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch

from lightning_tiercache.store.events import MAX_DETAIL_CHARS, gather_events


def test_without_a_process_group_returns_local_pairs_tagged_rank_zero() -> None:
    assert not torch.distributed.is_initialized()
    pairs = [("store", {"event": "spill", "detail": "first", "time": 1.5}), ("oom", {"event": "split", "step": 3})]
    assert gather_events(pairs) == [
        (0, "store", {"event": "spill", "detail": "first", "time": 1.5}),
        (0, "oom", {"event": "split", "step": 3}),
    ]
    assert gather_events([]) == []


def test_odd_values_become_json_scalars_or_strings() -> None:
    event: dict[Any, Any] = {
        "path": Path("/tmp/x"),
        "t": torch.tensor(3),
        "nested": {"a": [1, 2]},
        "flag": True,
        "none": None,
        "nan": float("nan"),
        "long": "x" * (MAX_DETAIL_CHARS + 50),
        7: "int key",
    }
    ((rank, source, out),) = gather_events([("activations", event)])
    assert (rank, source) == (0, "activations")
    assert out["path"] == "/tmp/x"
    assert out["t"] == "tensor(3)"
    assert out["nested"] == "{'a': [1, 2]}"
    assert out["flag"] is True and out["none"] is None and out["nan"] != out["nan"]
    assert out["long"] == "x" * MAX_DETAIL_CHARS
    assert out["7"] == "int key"
    json.dumps(out)  # what travels between ranks must encode


def test_cap_keeps_newest_events_after_a_dropped_marker() -> None:
    pairs = [("store", {"event": f"e{i}"}) for i in range(10)]
    out = gather_events(pairs, max_events=4)
    assert len(out) == 4
    rank, source, marker = out[0]
    assert (rank, source, marker["event"]) == (0, "events", "events_dropped")
    assert marker["detail"] == "7 older events dropped"
    assert [e["event"] for _, _, e in out[1:]] == ["e7", "e8", "e9"]
    assert len(gather_events([("store", {"event": "e"})] * 300)) == 256  # the default cap
    assert len(gather_events(pairs, max_events=10)) == 10  # at the cap nothing is dropped
    with pytest.raises(ValueError, match="max_events"):
        gather_events(pairs, max_events=0)


WORKER = textwrap.dedent(
    """
    import json, sys
    import torch.distributed as dist
    from lightning_tiercache.store.events import gather_events

    rank, store_file, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    dist.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank, world_size=2)
    try:
        # Round 1: rank 0 has two events, rank 1 none. Round 2: the other way round, with an odd value.
        first = [("store", {"event": "spill", "n": 0}), ("oom", {"event": "split", "n": 1})] if rank == 0 else []
        second = [] if rank == 0 else [("oom", {"event": f"r1e{i}", "obj": object}) for i in range(3)]
        results = [gather_events(first), gather_events(second)]
        with open(out, "w") as f:
            json.dump(results, f)
    finally:
        # Before exit: gloo's threads otherwise race the interpreter exit.
        dist.barrier()
        dist.destroy_process_group()
    """
)


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_two_gloo_ranks_both_get_every_rank_s_events_in_order(tmp_path: Path) -> None:
    script = tmp_path / "gather.py"
    script.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    logs = [tmp_path / f"err{r}.txt" for r in range(2)]
    procs = []
    for r in range(2):  # stderr to files, not pipes: a full pipe would block one rank inside a collective
        with open(logs[r], "w") as err:
            argv = [sys.executable, str(script), str(r), str(tmp_path / "store"), str(tmp_path / f"out{r}.json")]
            procs.append(subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=err, stderr=err))
    for r, p in enumerate(procs):
        try:
            p.wait(timeout=50)
        finally:
            if p.poll() is None:
                p.kill()
        assert p.returncode == 0, logs[r].read_text()[-3000:]
    expected = [
        [[0, "store", {"event": "spill", "n": 0}], [0, "oom", {"event": "split", "n": 1}]],
        [[1, "oom", {"event": f"r1e{i}", "obj": "<class 'object'>"}] for i in range(3)],
    ]
    for r in range(2):
        assert json.loads((tmp_path / f"out{r}.json").read_text()) == expected
