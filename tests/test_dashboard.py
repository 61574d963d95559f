from __future__ import annotations

import importlib.util
import json

import pytest

from lightning_tiercache import dashboard
from lightning_tiercache.lightning.telemetry import METRICS
from lightning_tiercache.lightning.wandb_support import EVENTS_KEY


def line_keys(spec: dict) -> list[str]:
    return [k for sec in spec["sections"] for p in sec["panels"] if p["type"] == "line" for k in p["y"]]


def test_spec_plots_every_documented_key_exactly_once_over_the_trainer_step() -> None:
    spec = dashboard.panel_spec()
    keys = line_keys(spec)
    assert sorted(keys) == sorted(s.key for s in METRICS)
    assert all(p["x"] == "trainer/global_step" for sec in spec["sections"] for p in sec["panels"] if "x" in p)


def test_spec_has_the_events_table_and_is_plain_json() -> None:
    spec = dashboard.panel_spec("mine")
    assert spec["name"] == "mine"
    tables = [p for sec in spec["sections"] for p in sec["panels"] if p["type"] == "table"]
    assert tables == [{"type": "table", "title": "events", "key": EVENTS_KEY}]
    assert json.loads(json.dumps(spec)) == spec


def test_per_tier_measures_share_one_panel() -> None:
    spec = dashboard.panel_spec()
    panels = {p["title"]: p for sec in spec["sections"] for p in sec["panels"]}
    assert panels["bytes per tier (bytes)"]["y"] == [f"tiercache/{t}/bytes" for t in ("device", "host", "disk")]


def test_workspace_builds_offline_with_the_official_api() -> None:
    pytest.importorskip("wandb_workspaces")
    ws = dashboard.build_workspace("my-team", "my-project")
    assert (ws.entity, ws.project, ws.name) == ("my-team", "my-project", "tiercache health")
    assert [s.name for s in ws.sections] == [s["name"] for s in dashboard.panel_spec()["sections"]]
    assert sum(len(getattr(p, "y", [])) for s in ws.sections for p in s.panels) == len(METRICS)
    ws._to_model()  # the saved form is built locally too; only save() needs the network


def test_unknown_panel_type_is_rejected() -> None:
    pytest.importorskip("wandb_workspaces")
    spec = {"name": "x", "sections": [{"name": "s", "panels": [{"type": "pie", "title": "p"}]}]}
    with pytest.raises(ValueError, match="panel type 'pie' in section 's' is not one of line, table"):
        dashboard.build_workspace("e", "p", spec)


def test_cli_dry_run_json_prints_the_spec_without_network(capsys: pytest.CaptureFixture[str]) -> None:
    assert dashboard.main(["--entity", "e", "--project", "p", "--dry-run", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["entity"], out["project"]) == ("e", "p")
    assert sorted(line_keys(out)) == sorted(s.key for s in METRICS)


def test_cli_dry_run_needs_no_entity_but_saving_does(capsys: pytest.CaptureFixture[str]) -> None:
    assert dashboard.main(["--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "[tiercache: tiers and prefetch]" in out and "for ENTITY/PROJECT built locally, not saved" in out
    with pytest.raises(SystemExit) as exit_info:
        dashboard.main([])
    assert exit_info.value.code == 2
    assert "--entity and --project are needed to save the workspace" in capsys.readouterr().err


def test_cli_without_the_workspace_package_says_how_to_install(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb_workspaces" else real(name, *a)
    )
    assert dashboard.main(["--entity", "e", "--project", "p"]) == 2
    assert "pip install wandb-workspaces" in capsys.readouterr().err
