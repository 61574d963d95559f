"""Fine-tune a small causal LM on Python's own documentation, with TierCacheCallback doing the memory work.

Activation offload and OOM recovery are on (see ``configs/finetune.yaml``); the run logs to CSV and to W&B
(offline unless ``WANDB_API_KEY`` is set) and ends with a short report::

    python examples/finetune.py --config configs/finetune.yaml
    python examples/finetune.py --config configs/finetune.yaml --trainer.max_steps 200
    python examples/finetune.py --config configs/finetune.yaml --model.checkpoint /path/to/local/hf/checkpoint \
        --data.checkpoint /path/to/local/hf/checkpoint
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import CausalLM, CorpusDataModule, default_loggers, summary_lines
from lightning.pytorch.cli import LightningCLI


def main(args: list[str] | None = None) -> Path | None:
    """Run the fine-tune; returns the path of the last checkpoint (``None`` if none was written)."""
    cli = LightningCLI(
        CausalLM,
        CorpusDataModule,
        run=False,
        args=args,
        trainer_defaults={"logger": default_loggers("runs", "finetune")},
        save_config_kwargs={"overwrite": True},
    )
    cli.trainer.fit(cli.model, cli.datamodule)
    print("\nfine-tune report")
    print("\n".join(summary_lines(cli.trainer)))
    ckpt = cli.trainer.checkpoint_callback
    best = getattr(ckpt, "last_model_path", "") or getattr(ckpt, "best_model_path", "")
    return Path(best) if best else None


if __name__ == "__main__":
    main()
