"""The main job: a short fine-tune, a short fine-tune with injected OOMs, a few-shot eval, then where to look.

    python examples/main.py

Runs ``examples/finetune.py`` with ``configs/finetune.yaml``; then a second, 6-step fine-tune in which an
injected out-of-memory error (``lightning_tiercache.lightning.testing.OOMInjector``: a real
``torch.OutOfMemoryError`` raised in the first decoder layer for batches above 4 samples) shows the callback
recover by splitting batches; then ``examples/eval.py`` with ``configs/eval.yaml`` on the fine-tuned weights
(Python's documentation as the corpus, a small Llama-style model from a config, W&B offline unless
``WANDB_API_KEY`` is set). Each run ends with the callback's summary and a PNG of its CSV log. Extra arguments
go to every run (e.g. ``--trainer.max_steps 20`` or ``--tiercache.host_bytes 16MiB``).
"""

from __future__ import annotations

import glob
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

import eval as eval_example  # noqa: E402
import finetune  # noqa: E402

#: The injected-OOM demo: its steps and the batch size above which every forward runs out of memory.
OOM_DEMO_STEPS = 6
OOM_DEMO_ABOVE = 4


def _finish_wandb() -> None:
    if "wandb" in sys.modules:  # each run gets a W&B run of its own
        sys.modules["wandb"].finish()


def main(argv: list[str] | None = None) -> int:
    extra = list(sys.argv[1:] if argv is None else argv)
    sys.argv = sys.argv[:1]  # the arguments go to each LightningCLI explicitly
    config = ["--config", str(ROOT / "configs" / "finetune.yaml")]
    ckpt = finetune.main([*config, *extra])
    _finish_wandb()

    print(f"\n=== OOM recovery demo: {OOM_DEMO_STEPS} steps with an injected out-of-memory error above ", end="")
    print(f"{OOM_DEMO_ABOVE} samples per batch (batches of 8) ===")
    demo = ["--trainer.max_steps", str(OOM_DEMO_STEPS), "--trainer.limit_val_batches", "0"]
    demo += ["--trainer.enable_checkpointing", "false", "--trainer.callbacks", "null"]
    demo += ["--inject_oom_above", str(OOM_DEMO_ABOVE), "--tiercache.oom_grow_back_after_steps", "0"]
    finetune.main([*config, *demo, *extra], name="finetune_oom_demo", title="OOM recovery demo (injected OOM)")
    _finish_wandb()

    eval_args = ["--config", str(ROOT / "configs" / "eval.yaml"), *extra]
    if ckpt is not None:
        eval_args += ["--ckpt_path", str(ckpt)]
    eval_example.main(eval_args)

    print("\nwhere to look")
    for name in ("finetune", "finetune_oom_demo", "eval"):
        pngs = sorted(glob.glob(f"runs/{name}/version_*/tiercache.png"), key=os.path.getmtime)
        if pngs:
            print(f"  PNG report ({name}): {pngs[-1]}")
    wandb_runs = sorted(glob.glob("runs/wandb/*run-*") + glob.glob("runs/*/wandb/*run-*"), key=os.path.getmtime)
    if wandb_runs:
        if os.environ.get("WANDB_API_KEY"):
            print("  W&B runs are online in project 'lightning-tiercache'; build the dashboard with:")
            print("    python -m lightning_tiercache.dashboard --entity YOUR_ENTITY --project lightning-tiercache")
        else:
            print(f"  W&B offline runs: {', '.join(wandb_runs[-3:])}")
            print("    upload with: wandb sync runs/wandb/offline-run-*  (then build the dashboard with")
            print("    python -m lightning_tiercache.dashboard --entity YOUR_ENTITY --project lightning-tiercache)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
