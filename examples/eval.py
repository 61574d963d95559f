"""Few-shot generation eval of a causal LM on Python's documentation, with the tiered KV cache.

Every prompt starts with the same few-shot prefix; ``TierCacheCallback(kv_cache=True)`` makes the model's
``generate`` use a ``TieredKVCache`` that stores the prefix's K/V blocks once and reuses them for every
later prompt. Every callback argument is a ``--tiercache.<argument>`` flag. Ends with the callback's summary
(prefix reuse, tier peaks), the token accuracy and tokens/s::

    python examples/eval.py --config configs/eval.yaml
    python examples/eval.py --config configs/eval.yaml --ckpt_path runs/finetune/version_0/checkpoints/last.ckpt
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import CausalLM, CorpusDataModule, default_loggers, render_png, summary_lines
from lightning.pytorch.cli import LightningArgumentParser

from lightning_tiercache.lightning.cli import TierCacheCLI


class _EvalCLI(TierCacheCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        super().add_arguments_to_parser(parser)
        parser.add_argument("--ckpt_path", type=str | None, default=None, help="weights to evaluate (a .ckpt)")


def main(args: list[str] | None = None) -> dict[str, float]:
    """Run the eval; returns the final metrics."""
    cli = _EvalCLI(
        CausalLM,
        CorpusDataModule,
        run=False,
        args=args,
        trainer_defaults={"logger": default_loggers("runs", "eval")},
        save_config_kwargs={"overwrite": True},
    )
    ckpt = cli.config.get("ckpt_path")
    results = cli.trainer.validate(cli.model, cli.datamodule, ckpt_path=ckpt)
    model = cli.model
    print("\neval report")
    if model.gen_seconds:
        print(f"  {'generated tokens/s':<28} {model.gen_tokens / model.gen_seconds:,.0f} (after the first batch)")
    print("\n".join(summary_lines(cli.trainer)))
    print(render_png(cli.trainer))
    return {k: float(v) for k, v in (results[0] if results else {}).items()}


if __name__ == "__main__":
    main()
