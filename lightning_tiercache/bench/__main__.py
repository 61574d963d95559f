"""Entry point: ``python -m lightning_tiercache.bench NAME [options]`` (``--help`` lists the benchmarks)."""

from __future__ import annotations

import ast
import importlib
import sys
from pathlib import Path

BENCHES = ("limits", "store", "activations", "kv", "oom", "overhead", "ddp")
_PROG = "python -m lightning_tiercache.bench"


def describe(name: str) -> str:
    """The first line of benchmark ``name``'s module docstring, read without importing it (no torch import)."""
    doc = ast.get_docstring(ast.parse((Path(__file__).parent / f"{name}.py").read_text())) or ""
    first = doc.strip().splitlines()[0] if doc.strip() else ""
    text = first.split(": ", 1)[1] if first.startswith("``") and ": " in first else first
    return text[:1].upper() + text[1:]


def usage() -> str:
    return f"usage: {_PROG} {{{','.join(BENCHES)}}} [options]"


def help_text() -> str:
    """The usage line, one line per benchmark and where each one's options are."""
    lines = [usage(), "", "Benchmarks (each measures against a baseline in the same run; see BENCHMARKS.md):"]
    width = max(map(len, BENCHES))
    lines += [f"  {name:<{width}}  {describe(name)}" for name in BENCHES]
    lines += ["", f"Options of one benchmark: {_PROG} NAME --help"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(help_text())
        return 0
    if args[0] not in BENCHES:
        sys.stderr.write(f"{usage()}\n{_PROG}: error: argument NAME: invalid choice: {args[0]!r} ")
        sys.stderr.write(f"(choose from {', '.join(BENCHES)})\n")
        return 2
    module = importlib.import_module(f"lightning_tiercache.bench.{args[0]}")
    return int(module.main(args[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
