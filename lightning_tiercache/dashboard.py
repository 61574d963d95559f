"""Build a W&B workspace (dashboard) for tiercache runs: ``python -m lightning_tiercache.dashboard``.

The panel spec is plain data built offline from :data:`lightning_tiercache.lightning.telemetry.METRICS`
(:func:`panel_spec`), so it can be printed (``--dry-run``, ``--json``) and tested without network. Only
``save`` talks to W&B, through the official workspace API (the optional package ``wandb-workspaces``).

Example::

    python -m lightning_tiercache.dashboard --entity my-team --project my-finetune
    python -m lightning_tiercache.dashboard --entity my-team --project my-finetune --dry-run --json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from typing import Any

from lightning_tiercache.lightning.telemetry import METRICS, MetricSpec
from lightning_tiercache.lightning.wandb_support import EVENTS_KEY

__all__ = ["SECTIONS", "STEP_KEY", "build_workspace", "main", "panel_spec", "require_workspaces"]

#: The x axis of every line plot: Lightning's ``WandbLogger`` step metric.
STEP_KEY = "trainer/global_step"
#: Section title of each telemetry part, in the order they appear in the workspace.
SECTIONS = {
    "store": "tiercache: tiers and prefetch",
    "system": "tiercache: host memory",
    "cuda": "tiercache: device memory",
    "activations": "tiercache: activation offload",
    "oom": "tiercache: OOM recovery",
    "kv": "tiercache: KV cache",
}
_PLACEHOLDER_ENTITY, _PLACEHOLDER_PROJECT = "ENTITY", "PROJECT"  # shown by a dry run without them
_INSTALL_HINT = "the dashboard needs the W&B workspace API: pip install wandb-workspaces"
_TIERS = ("device", "host", "disk")
_TITLES = {"store/ratio": "hit rate", "store/count": "store events (count)"}


def _panel_of(s: MetricSpec) -> tuple[str, str]:
    """(panel id, panel title) of a key: per-tier keys share a panel per measure; others per group and unit."""
    parts = s.key.split("/")
    if len(parts) == 3 and parts[1] in _TIERS:
        return f"tiers/{parts[2]}", f"{parts[2]} per tier ({s.unit})"
    group = parts[1] if len(parts) == 3 else "store"
    panel_id = f"{group}/{s.unit}"
    return panel_id, _TITLES.get(panel_id, f"{group} ({s.unit})")


def panel_spec(name: str = "tiercache health") -> dict[str, Any]:
    """The workspace as plain data: sections of line panels (every key of METRICS once) and the events table."""
    sections: dict[str, dict[str, dict[str, Any]]] = {feature: {} for feature in SECTIONS}
    for s in METRICS:
        panel_id, title = _panel_of(s)
        panel = sections[s.feature].setdefault(
            panel_id, {"type": "line", "title": title, "x": STEP_KEY, "y": [], "summary": s.summary}
        )
        panel["y"].append(s.key)
    out = [
        {"name": SECTIONS[feature], "panels": list(panels.values())} for feature, panels in sections.items() if panels
    ]
    out.append({"name": "tiercache: events", "panels": [{"type": "table", "title": "events", "key": EVENTS_KEY}]})
    return {"name": name, "sections": out}


def require_workspaces() -> None:
    """Raise ``ImportError`` with the install hint when ``wandb-workspaces`` is missing."""
    if importlib.util.find_spec("wandb_workspaces") is None:
        raise ImportError(_INSTALL_HINT)


def build_workspace(entity: str, project: str, spec: dict[str, Any] | None = None) -> Any:
    """The ``wandb_workspaces`` ``Workspace`` for ``spec`` (built locally; call ``.save()`` to upload).

    Raises:
        ImportError: ``wandb-workspaces`` is not installed (the message says how to install it).
        ValueError: a panel type in ``spec`` is not ``line`` or ``table``.
    """
    require_workspaces()
    import wandb_workspaces.reports.v2 as wr
    import wandb_workspaces.workspaces as ws

    spec = spec or panel_spec()
    sections = []
    for sec in spec["sections"]:
        panels: list[Any] = []
        for p in sec["panels"]:
            if p["type"] == "line":
                panels.append(wr.LinePlot(title=p["title"], x=p["x"], y=list(p["y"])))
            elif p["type"] == "table":
                panels.append(wr.WeavePanelSummaryTable(table_name=p["key"]))
            else:
                raise ValueError(f"panel type {p['type']!r} in section {sec['name']!r} is not one of line, table")
        sections.append(ws.Section(name=sec["name"], panels=panels, is_open=True))
    return ws.Workspace(entity=entity, project=project, name=spec["name"], sections=sections)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lightning_tiercache.dashboard",
        description="Create a W&B workspace with tiercache's panels for a project.",
    )
    parser.add_argument("--entity", help="W&B entity (user or team); needed to save, optional with --dry-run")
    parser.add_argument("--project", help="W&B project; needed to save, optional with --dry-run")
    parser.add_argument("--name", default="tiercache health", help="workspace name")
    parser.add_argument("--dry-run", action="store_true", help="build the panels and print them; upload nothing")
    parser.add_argument("--json", action="store_true", help="print the panel spec as JSON")
    args = parser.parse_args(argv)
    if not args.dry_run and not (args.entity and args.project):
        parser.error("--entity and --project are needed to save the workspace (or look at it first with --dry-run)")
    args.entity = args.entity or _PLACEHOLDER_ENTITY
    args.project = args.project or _PLACEHOLDER_PROJECT
    spec = panel_spec(args.name)
    if args.json:
        print(json.dumps({"entity": args.entity, "project": args.project, **spec}, indent=2))
    elif args.dry_run:
        for sec in spec["sections"]:
            print(f"[{sec['name']}]")
            for p in sec["panels"]:
                print(f"  {p['title']}: {', '.join(p['y']) if p['type'] == 'line' else p['key']}")
    try:
        workspace = build_workspace(args.entity, args.project, spec)
    except ImportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.dry_run:
        if not args.json:
            print(f"dry run: workspace {spec['name']!r} for {args.entity}/{args.project} built locally, not saved")
        return 0
    saved = workspace.save()
    print(f"workspace saved: {saved.url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
