"""Run a test file as two gloo DDP ranks on this machine and fail the test if they hang or fail."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_two_ranks(script: str, out_dir: Path, timeout_s: float, progress: Callable[[], str] | None = None) -> None:
    """Start ``python script out_dir`` as ranks 0 and 1 and wait for both; ``progress`` explains a hang."""
    port = free_port()
    procs = []
    for rank in (0, 1):
        env = {
            **os.environ,
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "WORLD_SIZE": "2",
            "NODE_RANK": "0",
            "LOCAL_RANK": str(rank),
            "RANK": str(rank),
            "OMP_NUM_THREADS": "1",
        }
        cmd = [sys.executable, script, str(out_dir)]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("DDP workers hung" + (": " + progress() if progress is not None else ""))
        logs.append(out)
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
