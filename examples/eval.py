"""Few-shot generation eval of a causal LM on Python's documentation, with the tiered KV cache.

Every prompt starts with the same few-shot prefix; ``TierCacheCallback(kv_cache=True)`` makes the model's
``generate`` use a ``TieredKVCache`` that stores the prefix's K/V blocks once and reuses them for every
later prompt. Ends with a short report (token accuracy, tokens/s, prefix hit rate)::

    python examples/eval.py --config configs/eval.yaml
    python examples/eval.py --config configs/eval.yaml --ckpt_path runs/finetune/version_0/checkpoints/last.ckpt
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import CausalLM, CorpusDataModule, default_loggers, summary_lines
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI


class _EvalCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
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
        print(f"  {'generated tokens/s':<28} {model.gen_tokens / model.gen_seconds:,.0f}")
    print("\n".join(summary_lines(cli.trainer)))
    return {k: float(v) for k, v in (results[0] if results else {}).items()}


if __name__ == "__main__":
    main()
