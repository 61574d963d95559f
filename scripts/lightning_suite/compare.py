"""Compare two JUnit reports of Lightning's suite (without and with ``TierCacheCallback()``).

Usage: ``python scripts/lightning_suite/compare.py OUT_DIR/off.xml OUT_DIR/on.xml``. Prints the outcome counts
of each run and every test whose outcome differs, with the first line of its failure message.
"""

from __future__ import annotations

import collections
import sys
import xml.etree.ElementTree as ET


def outcomes(path: str) -> dict[str, tuple[str, str]]:
    """``{test id: (outcome, first line of the message)}``; outcome is passed, failed, error or skipped."""
    out: dict[str, tuple[str, str]] = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        test_id = f"{case.get('classname')}::{case.get('name')}"
        outcome, message = "passed", ""
        for kind in ("failure", "error", "skipped"):
            node = case.find(kind)
            if node is not None:
                outcome = {"failure": "failed"}.get(kind, kind)
                message = (node.get("message") or node.text or "").strip().splitlines()[0:1]
                message = message[0][:200] if message else ""
                break
        out[test_id] = (outcome, message)
    return out


def main(off_path: str, on_path: str) -> int:
    off, on = outcomes(off_path), outcomes(on_path)
    for name, run in (("without", off), ("with", on)):
        counts = collections.Counter(o for o, _ in run.values())
        print(f"{name} the callback: {len(run)} tests, " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    differ = sorted(t for t in off.keys() | on.keys() if off.get(t, ("absent", ""))[0] != on.get(t, ("absent", ""))[0])
    print(f"{len(differ)} differ:")
    for t in differ:
        a, b = off.get(t, ("absent", "")), on.get(t, ("absent", ""))
        print(f"  {t}: {a[0]} -> {b[0]}  {b[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
