"""The main job: a short fine-tune, then a few-shot eval, then where to look.

    python examples/main.py

Runs ``examples/finetune.py`` with ``configs/finetune.yaml`` and ``examples/eval.py`` with
``configs/eval.yaml`` on the fine-tuned weights (Python's documentation as the corpus, a small Llama-style
model from a config, W&B offline unless ``WANDB_API_KEY`` is set), renders the PNG report of the fine-tune
and prints where the dashboards are. Extra arguments go to both runs (e.g. ``--trainer.max_steps 20``).
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


def main(argv: list[str] | None = None) -> int:
    extra = list(sys.argv[1:] if argv is None else argv)
    sys.argv = sys.argv[:1]  # the arguments go to each LightningCLI explicitly
    ckpt = finetune.main(["--config", str(ROOT / "configs" / "finetune.yaml"), *extra])
    if "wandb" in sys.modules:  # the eval gets a W&B run of its own
        sys.modules["wandb"].finish()
    eval_args = ["--config", str(ROOT / "configs" / "eval.yaml"), *extra]
    if ckpt is not None:
        eval_args += ["--ckpt_path", str(ckpt)]
    eval_example.main(eval_args)

    from lightning_tiercache.report import render

    print("\nwhere to look")
    runs = sorted(glob.glob("runs/finetune/version_*"), key=os.path.getmtime)
    if runs:
        try:
            print(f"  PNG report of the fine-tune:  {render(runs[-1])}")
        except ImportError as err:
            print(f"  (no PNG: {err})")
    wandb_runs = sorted(glob.glob("runs/wandb/*run-*") + glob.glob("runs/*/wandb/*run-*"), key=os.path.getmtime)
    if wandb_runs:
        if os.environ.get("WANDB_API_KEY"):
            print("  W&B runs are online in project 'lightning-tiercache'; build the dashboard with:")
            print("    python -m lightning_tiercache.dashboard --entity YOUR_ENTITY --project lightning-tiercache")
        else:
            print(f"  W&B offline runs: {', '.join(wandb_runs[-2:])}")
            print("    upload with: wandb sync runs/wandb/offline-run-*  (then build the dashboard with")
            print("    python -m lightning_tiercache.dashboard --entity YOUR_ENTITY --project lightning-tiercache)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
