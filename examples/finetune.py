"""Fine-tune a small causal LM on Python's own documentation, with TierCacheCallback doing the memory work.

Activation offload and OOM recovery are on (see ``configs/finetune.yaml``; every callback argument is a
``--tiercache.<argument>`` flag); the run logs to CSV and to W&B (offline unless ``WANDB_API_KEY`` is set) and
ends with the callback's summary and a PNG of the CSV log::

    python examples/finetune.py --config configs/finetune.yaml
    python examples/finetune.py --config configs/finetune.yaml --trainer.max_steps 200 --tiercache.host_bytes 1GiB
    python examples/finetune.py --config configs/finetune.yaml --model.checkpoint /path/to/local/hf/checkpoint \
        --data.checkpoint /path/to/local/hf/checkpoint
    python examples/finetune.py --help     # every argument, the callback's with their choices

``--inject_oom_above N`` raises an out-of-memory error in the first decoder layer whenever a batch has more
than ``N`` samples (``lightning_tiercache.lightning.testing.OOMInjector``), to watch the callback recover:
the summary then reports the retries and the split it learned.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import CausalLM, CorpusDataModule, default_loggers, render_png, summary_lines
from lightning.pytorch.cli import LightningArgumentParser

from lightning_tiercache.lightning.cli import TierCacheCLI
from lightning_tiercache.lightning.testing import OOMInjector


class _FinetuneCLI(TierCacheCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        super().add_arguments_to_parser(parser)
        parser.add_argument(
            "--inject_oom_above",
            type=int | None,
            default=None,
            help="demo of OOM recovery: raise an injected out-of-memory error for batches above this many samples",
        )


def main(args: list[str] | None = None, name: str = "finetune", title: str = "fine-tune") -> Path | None:
    """Run the fine-tune; returns the path of the last checkpoint (``None`` if none was written)."""
    cli = _FinetuneCLI(
        CausalLM,
        CorpusDataModule,
        run=False,
        args=args,
        trainer_defaults={"logger": default_loggers("runs", name)},
        save_config_kwargs={"overwrite": True},
    )
    above = cli.config.get("inject_oom_above")
    injector = None
    if above is not None:
        injector = OOMInjector(above_batch_size=above, phase="forward").attach(cli.model.model.model.layers[0])
    cli.trainer.fit(cli.model, cli.datamodule)
    print(f"\n{title} report")
    if injector is not None:
        injector.detach()
        print(f"  injected out-of-memory errors: {injector.injected:,} (batches above {above} samples)")
    print("\n".join(summary_lines(cli.trainer)))
    print(render_png(cli.trainer))
    ckpt = cli.trainer.checkpoint_callback
    best = getattr(ckpt, "last_model_path", "") or getattr(ckpt, "best_model_path", "")
    return Path(best) if best else None


if __name__ == "__main__":
    main()
