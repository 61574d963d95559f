"""Entry point: ``python -m lightning_tiercache.bench NAME [options]``."""

from __future__ import annotations

import importlib
import sys

BENCHES = ("limits", "store", "activations", "kv", "oom", "overhead", "ddp")


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help") or args[0] not in BENCHES:
        print(f"usage: python -m lightning_tiercache.bench {{{','.join(BENCHES)}}} [--json] [--full] [-h]")
        return 0 if not args or args[0] in ("-h", "--help") else 2
    module = importlib.import_module(f"lightning_tiercache.bench.{args[0]}")
    return int(module.main(args[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
