"""TierCacheCLI: the callback's arguments as a ``--tiercache.<argument>`` group, and one-line errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from lightning.pytorch.demos.boring_classes import BoringDataModule, BoringModel

from lightning_tiercache import TierCacheCallback

pytest.importorskip("jsonargparse")
from lightning_tiercache.lightning.cli import TierCacheCLI

ROOT = Path(__file__).resolve().parents[2]


def cli(*args: str) -> TierCacheCLI:
    return TierCacheCLI(
        BoringModel, BoringDataModule, run=False, args=["--trainer.logger", "false", *args],
        save_config_kwargs={"overwrite": True},
    )  # fmt: skip


def test_a_tiercache_flag_reaches_the_one_callback_of_the_trainer(tmp_path: Path) -> None:
    c = cli("--tiercache.host_bytes", "1GiB", "--tiercache.kv_quant", "int8", f"--trainer.default_root_dir={tmp_path}")
    (cb,) = [x for x in c.trainer.callbacks if isinstance(x, TierCacheCallback)]
    assert cb.runtime.tier_config.host_bytes == 2**30
    assert cb.runtime.kv_config is None or cb.runtime.kv_config.quant == "int8"


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("host_bytes", "-1GiB", "--tiercache.host_bytes='-1GiB' must be >= 0 bytes"),
        ("device_bytes", "lots", "--tiercache.device_bytes='lots' is not a size"),
        ("oom_max_micro_batches", "0", "--tiercache.oom_max_micro_batches must be an int >= 1, got 0"),
    ],
)
def test_a_bad_value_exits_2_with_one_line_naming_it(
    flag: str, value: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli(f"--tiercache.{flag}={value}")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_a_value_outside_the_choices_exits_2_naming_the_choices(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli("--tiercache.kv_quant", "int3")
    assert exit_info.value.code == 2
    (err,) = capsys.readouterr().err.strip().splitlines()
    assert "error: --tiercache.kv_quant='int3' is not one of none, int8, int4 (all arguments:" in err


def test_help_lists_every_callback_argument_with_its_choices(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli("--help")
    out = capsys.readouterr().out
    for name in set(TierCacheCallback.__init__.__code__.co_varnames) & set(
        TierCacheCallback.__init__.__kwdefaults__ or {}
    ):
        assert f"--tiercache.{name}" in out, name
    assert "int8" in out and "byteplane" in out and "sum" in out


@pytest.mark.timeout(120)
def test_the_example_cli_takes_a_tiercache_flag_and_rejects_a_bad_one(tmp_path: Path) -> None:
    run = [sys.executable, str(ROOT / "examples" / "finetune.py"), "--config", str(ROOT / "configs" / "finetune.yaml")]
    bad = subprocess.run([*run, "--tiercache.host_bytes=-5"], capture_output=True, text=True, cwd=tmp_path)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1].endswith("error: --tiercache.host_bytes=-5 must be >= 0 bytes")
    assert "Traceback" not in bad.stderr
