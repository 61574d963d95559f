"""What the activation offload tests share: tiny GPT configurations and the store budgets they offload into."""

from __future__ import annotations

from typing import Any

from lightning_tiercache.bench.gpt import GPTConfig

#: Two blocks, 32 tokens: the exactness, lifetime and policy tests.
TINY = GPTConfig(vocab_size=128, seq_len=32, n_layer=2, n_head=4, d_model=64)
#: Two narrow blocks, 16 tokens: many steps on the simulated asynchronous device.
SMALLEST = GPTConfig(vocab_size=64, seq_len=16, n_layer=2, n_head=2, d_model=32)
#: Four blocks, 64 tokens: enough saved bytes per step for a budget to cut through.
BUDGETED = GPTConfig(vocab_size=128, seq_len=64, n_layer=4, n_head=4, d_model=64)


def offload_stores(small: str, large: str, codec: str) -> dict[str, dict[str, Any]]:
    """Store configurations by where offload lands: ``host`` (no disk) or ``disk`` (a host tier as small as
    the device tier), each with a ``small`` device tier so that offload has to move tensors."""
    return {
        "host": {"device_bytes": small, "host_bytes": large, "disk_bytes": 0},
        "disk": {"device_bytes": small, "host_bytes": small, "disk_bytes": large, "codec": codec},
    }
