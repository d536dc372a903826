"""The CLI: thin, one error line and exit 2 on bad input, --help everywhere."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from modelfactory.cli import build_parser, main


def test_train_prints_a_summary(by_app, tmp_path, capsys):
    code = main(["train", by_app, "--by", "app,site", "--time", "ts", "--target", "value",
                 "--store", str(tmp_path / "s"), "--scheduler", "inline", "-p", "season_length=12", "--quiet"])
    out = capsys.readouterr().out
    assert code == 0
    assert "12 groups, ok 12, failed 0, skipped 0" in out
    assert f"written to {tmp_path / 's'}" in out


def test_json_summary(by_app, tmp_path, capsys):
    assert main(["train", by_app, "--by", "app,site", "--time", "ts", "--target", "value",
                 "--store", str(tmp_path / "s"), "--scheduler", "inline", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["counts"] == {"ok": 12, "failed": 0, "skipped": 0} and summary["kind"] == "train"


@pytest.mark.parametrize("argv, message", [
    (["--target", "latency"], "error: The target column 'latency' is not in the dataset"),
    (["--target", "value", "--model", "seasonl"], "error: Unknown model 'seasonl'. Did you mean 'seasonal'?"),
    (["--target", "value", "-p", "threshold=-1"], "error: The 'threshold' parameter of SeasonalProfile must be a float >= 0.0. Got -1 instead."),
])
def test_bad_input_is_one_error_line_and_exit_2(by_app, tmp_path, capsys, argv, message):
    store = tmp_path / "s"
    code = main(["train", by_app, "--by", "app,site", "--time", "ts", "--store", str(store),
                 "--scheduler", "inline", *argv])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith(message) and err.count("\n") == 1
    assert "Traceback" not in err
    assert not store.exists()


def test_missing_data_from_a_real_shell(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "modelfactory", "train", str(tmp_path / "nope"), "--by", "app",
                           "--time", "ts", "--target", "value", "--store", str(tmp_path / "s")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: No file or folder at '{tmp_path / 'nope'}'. Check the path (and credentials for s3://)."]


def test_every_command_has_help(capsys):
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert {"train", "demo"} <= set(commands)
    for name in commands:
        with pytest.raises(SystemExit) as exit_:
            main([name, "--help"])
        assert exit_.value.code == 0
        assert "usage: python -m modelfactory " + name in capsys.readouterr().out


def test_demo_runs_end_to_end_on_a_local_cluster(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "modelfactory", "demo", "--out", str(tmp_path), "--series", "200",
                           "--days", "3", "--workers", "2"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "200 groups, ok 200, failed 0, skipped 0" in proc.stdout
    assert (tmp_path / "store" / "LATEST").exists()
    assert "Dask dashboard: http://" in proc.stderr
