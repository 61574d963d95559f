"""Memory the callback's CPU default really frees: peak RSS of a fit, in a fresh process, under default glibc."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# One fit of a wide MLP (about 128 MiB of activations saved per step, 32 MiB of gradients) in this process;
# prints the growth of the peak RSS over the training steps (VmHWM after Linux's clear_refs at the second
# batch), in bytes.
_FIT = """
import json, sys, torch, lightning as L
from lightning_tiercache import TierCacheCallback

def status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))

class Wide(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Linear(1024, 1024), torch.nn.GELU())
                                         for _ in range(8)], torch.nn.Linear(1024, 1))
    def training_step(self, batch, i):
        return self.net(batch[0]).square().mean()
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-3)
    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(5 * 2048, 1024)), batch_size=2048)

class Peak(L.Callback):
    base = None
    def on_train_batch_start(self, trainer, module, batch, i):
        if i == 1:  # after one step: the allocator and the store have warmed up
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            Peak.base = status("VmRSS")

torch.manual_seed(0)
torch.set_num_threads(1)
mode, spill = sys.argv[1], sys.argv[2]
cbs = [Peak()]
if mode == "callback":
    cbs.append(TierCacheCallback(device_bytes="16MiB", spill_dir=spill, kv_cache=False, progress_bar=False))
trainer = L.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, callbacks=cbs)
trainer.fit(Wide())
print(json.dumps({"growth": status("VmHWM") - Peak.base}))
"""


def _growth(mode: str, spill: Path) -> int:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}  # default glibc settings
    out = subprocess.run(
        [sys.executable, "-c", _FIT, mode, str(spill)], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return int(json.loads(out.stdout.strip().splitlines()[-1])["growth"])


def test_the_callbacks_cpu_default_lowers_peak_rss_under_default_glibc(spill_parent: Path) -> None:
    plain = _growth("plain", spill_parent)
    ours = _growth("callback", spill_parent)
    activations = 8 * 2048 * 1024 * 4 * 2  # each block saves its linear's input and the GELU's input
    assert plain > 0.5 * activations  # the plain fit really holds its activations
    assert ours < 0.6 * plain, (ours, plain)  # offload to disk (the CPU default) returned the memory
