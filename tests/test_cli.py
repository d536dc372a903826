"""The CLI: thin, one error line and exit 2 on bad input, --help everywhere."""
from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from _servers import NotAScheduler

import modelfactory
from modelfactory.cli import build_parser, main


def test_train_prints_a_summary(by_app, tmp_path, capsys):
    code = main(["train", by_app, "--by", "app,site", "--time", "ts", "--target", "value",
                 "--store", str(tmp_path / "s"), "--scheduler", "inline", "-p", "season_length=12", "--quiet"])
    out = capsys.readouterr().out
    assert code == 0
    assert "12 groups, ok 12, failed 0, skipped 0" in out
    assert f"written to {tmp_path / 's'}" in out


def test_a_summary_says_how_many_failures_it_does_not_list_and_where_they_are(tmp_path, capsys):
    # five "failed" lines and nothing more, for 8 failed groups; and "1 groups"
    import pyarrow as pa
    import pyarrow.compute as pc
    from _data import metrics_table, write

    t = metrics_table(series=10, hours=48, apps=1)
    broken = pc.is_in(t["site"], pa.array([f"s{i:03d}" for i in range(8)]))
    t = t.set_column(t.schema.get_field_index("ts"), "ts", pc.if_else(broken, pa.scalar(None, t["ts"].type), t["ts"]))
    data, store = write(t, tmp_path / "d", ["app"]), str(tmp_path / "s")
    argv = ["--by", "app,site", "--time", "ts", "--target", "value", "--scheduler", "inline", "--quiet"]
    assert main(["train", data, "--store", store, *argv, "-p", "season_length=12"]) == 0
    lines = capsys.readouterr().out.splitlines()
    run = modelfactory.ModelStore(store).latest()
    assert lines[0] == f"run {run} (train): 10 groups, ok 2, failed 8, skipped 0"
    assert [x.startswith("  failed app=a") for x in lines].count(True) == 5
    assert f"  ... and 3 more failed: models show --store {store} --run {run}" in lines
    one = write(t.filter(pc.equal(t["site"], "s009")), tmp_path / "one", ["app"])
    assert main(["score", one, "--store", store, "--out", str(tmp_path / "o"), "--scheduler", "inline",
                 "--quiet"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("(score): 1 group, ok 1, failed 0, skipped 0")
    assert f"scored with the models of run {run}" in lines  # which run "latest" was, in a scheduled job's log


def test_train_resume_says_whether_there_was_a_run_to_resume(by_app, tmp_path, capsys):
    # a scheduled job passing --resume every night could not tell a resume from a new run
    argv = ["train", by_app, "--by", "app,site", "--time", "ts", "--target", "value", "--store",
            str(tmp_path / "s"), "--scheduler", "inline", "-p", "season_length=12", "--resume"]
    assert main(argv) == 0
    assert "nothing to resume: a new run" in capsys.readouterr().out.splitlines()
    assert main([*argv, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["resumed"] is False


def test_workers_with_a_cluster_the_job_does_not_make_is_said_to_be_unused(by_app, tmp_path, caplog):
    # taken without a word with --scheduler inline or a scheduler address
    with caplog.at_level("WARNING", logger="modelfactory"):
        assert main(["train", by_app, "--by", "app,site", "--time", "ts", "--target", "value", "--store",
                     str(tmp_path / "s"), "--scheduler", "inline", "--workers", "4", "-q"]) == 0
    (said,) = [r.getMessage() for r in caplog.records if "workers=" in r.getMessage()]
    assert said == ("workers=4 (--workers) is for the cluster a job makes (local or kube), and is not used: "
                    "cluster='inline' runs every unit in this process")


def test_json_summary(by_app, tmp_path, capsys):
    assert main(["train", by_app, "--by", "app,site", "--time", "ts", "--target", "value",
                 "--store", str(tmp_path / "s"), "--scheduler", "inline", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["counts"] == {"ok": 12, "failed": 0, "skipped": 0} and summary["kind"] == "train"


def test_a_run_that_fits_no_model_is_kept_but_never_becomes_latest(by_app, tmp_path, capsys):
    store = str(tmp_path / "s")
    argv = ["train", by_app, "--by", "app,site", "--time", "ts", "--target", "value", "--store", store,
            "--scheduler", "inline", "--quiet"]
    assert main([*argv, "-p", "season_length=12"]) == 0
    import modelfactory

    st = modelfactory.ModelStore(store)
    good = st.latest()
    capsys.readouterr()
    assert main([*argv, "-p", "season_length=500"]) == 2  # longer than every series: all skipped
    out, err = capsys.readouterr()
    assert "12 groups, ok 0, failed 0, skipped 12" in out
    (line,) = [x for x in err.splitlines() if x.startswith("error:")]
    bad = [r for r in st.runs() if r != good][0]
    assert line.startswith(f"error: run {bad} fitted no model: every group failed or was skipped")
    assert st.latest() == good and st.runs() == sorted([good, bad])
    # scoring goes on with the models of the run that has them
    scored = modelfactory.score(by_app, store=store, out=str(tmp_path / "o"), cluster="inline")
    assert scored.summary["counts"]["ok"] == 12
    # a store whose only run fitted nothing says so, and what to do
    lone = str(tmp_path / "lone")
    assert main([*argv[:-5], "--store", lone, "--scheduler", "inline", "--quiet", "-p", "season_length=500"]) == 2
    (only,) = modelfactory.ModelStore(lone).runs()
    with pytest.raises(modelfactory.exceptions.StoreError,
                       match=rf"No run of the store at .* has fitted a model yet: its runs \({only}\) fitted none.*"
                             r"then train again: with other parameters if those were the cause .*"
                             rf"only the groups that failed \(base='{only}' and retrain='failed'"):
        modelfactory.score(by_app, store=lone, out=str(tmp_path / "o2"), cluster="inline")


def test_models_list_shows_every_run_when_one_cannot_be_read(by_app, tmp_path, capsys):
    # One damaged manifest among a store's runs made `models list` print only the error line:
    # the other runs (and LATEST) were hidden until someone found and removed the bad one by hand.
    store = str(tmp_path / "s")
    argv = ["train", by_app, "--by", "app,site", "--time", "ts", "--target", "value", "--store", store,
            "--scheduler", "inline", "--quiet", "-p", "season_length=12"]
    assert main(argv) == 0 and main(argv) == 0 and main(argv) == 0
    import modelfactory

    old, middle, latest = modelfactory.ModelStore(store).runs()
    (tmp_path / "s" / "runs" / middle / "manifest.json").write_text('{"truncated": ')
    capsys.readouterr()
    assert main(["models", "list", "--store", store]) == 2
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert len(lines) == 3 and lines[0].startswith(f"  {old}  seasonal") and lines[2].startswith(f"* {latest}  seasonal")
    assert lines[1] == f"  {middle}  (cannot be read: see below)"
    (line,) = err.splitlines()
    assert line.startswith(f"error: The manifest of run '{middle}'") and "is not valid JSON" in line
    assert main(["models", "list", "--store", store, "--json"]) == 2
    rows = json.loads(capsys.readouterr().out)["runs"]
    assert [r["run"] for r in rows] == [old, middle, latest] and "not valid JSON" in rows[1]["error"]


def test_models_list_of_a_path_with_nothing_there_is_an_error_not_an_empty_store(tmp_path, capsys):
    # `models list --store modles/` (a typo) printed "no runs in modles/" and exit 0, while
    # `models show` and `report` said there is no store; a folder that exists but holds no run yet
    # is still an empty store.
    assert main(["models", "list", "--store", str(tmp_path / "modles")]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line == (f"error: No model store at '{tmp_path / 'modles'}': there is nothing at that path. Pass "
                    "the --store of python -m modelfactory train.")
    assert not (tmp_path / "modles").exists()
    (tmp_path / "afile").write_text("x")  # a file is no store either (it listed "no runs", as score now refuses)
    assert main(["models", "list", "--store", str(tmp_path / "afile")]) == 2
    assert capsys.readouterr().err.startswith(f"error: '{tmp_path / 'afile'}' is a file, not a model store")
    (tmp_path / "new").mkdir()
    assert main(["models", "list", "--store", str(tmp_path / "new")]) == 0
    assert capsys.readouterr().out == f"no runs in {tmp_path / 'new'}\n"


@pytest.mark.parametrize("argv", [["models", "list"], ["models", "show", "--json"],
                                  ["models", "show", "--key", "app=app0,site=s000"]])
def test_output_read_by_a_reader_that_stops_early_ends_quietly(by_app, tmp_path, argv):
    # `models list | head -1` in a script: the reader goes away, and the command said "error: internal
    # error: BrokenPipeError" (exit 1), or, inside a store operation, "Cannot access the store".
    import os

    store = str(tmp_path / "s")
    assert main(["train", by_app, "--by", "app,site", "--time", "ts", "--target", "value", "--store", store,
                 "--scheduler", "inline", "--quiet", "-p", "season_length=12"]) == 0
    proc = subprocess.Popen([sys.executable, "-m", "modelfactory", *argv, "--store", store],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})  # every print is a write
    proc.stdout.close()  # the reader is gone before the first line (the command is still importing)
    err = proc.stderr.read().decode()
    assert proc.wait(60) == 141 and err == ""


def test_where_reads_only_the_rows_it_names_for_train_and_score(by_app, tmp_path, capsys):
    """The null-key refusal says to leave rows out with a filter: the CLI had none.  --where
    takes conditions on partition keys and columns, joined by 'and' (repeatable)."""
    import modelfactory

    store, base = str(tmp_path / "s"), ["--scheduler", "inline", "--quiet", "-p", "season_length=12"]
    assert main(["train", by_app, "--by", "app,site", "--time", "ts", "--target", "value", "--store", store,
                 "--where", "app in (app0, 'app1') and site != s003", "--where", "value > -1e9", *base]) == 0
    import pyarrow.dataset as ds

    data = ds.dataset(by_app, format="parquet", partitioning="hive").to_table(columns=["app", "site"])
    pairs = set(zip(data["app"].to_pylist(), data["site"].to_pylist()))
    want = {(a, s) for a, s in pairs if a in ("app0", "app1") and s != "s003"}
    assert 0 < len(want) < len(pairs)
    groups = modelfactory.ModelStore(store).groups()
    assert set(zip(groups["app"], groups["site"])) == want and len(groups) == len(want)
    capsys.readouterr()
    assert main(["models", "show", "--store", store]) == 0  # which rows it was fitted on, not only the input's
    shown = capsys.readouterr().out.splitlines()
    rows = modelfactory.ModelStore(store).manifest()["summary"]["rows"]
    text = " ".join(modelfactory.ModelStore(store).manifest()["input"]["filter"]["text"].split())
    assert shown[2] == f"where {text}: {rows:,} of those rows"
    assert "app0" in shown[2] and "(value > -1000000000)" in shown[2]
    assert main(["score", by_app, "--store", store, "--out", str(tmp_path / "o"), "--scheduler", "inline",
                 "--quiet", "--where", "app = app2 or_not"]) == 2
    assert "error: --where 'app = app2 or_not': cannot read the condition" in capsys.readouterr().err
    assert main(["score", by_app, "--store", store, "--out", str(tmp_path / "o"), "--scheduler", "inline",
                 "--quiet", "--where", "app = app0", "--where", "site is not null"]) == 0
    scored = ds.dataset(str(tmp_path / "o"), format="parquet", partitioning="hive",
                        exclude_invalid_files=True).to_table(columns=["app", "site"])
    assert set(zip(scored["app"].to_pylist(), scored["site"].to_pylist())) == {p for p in want if p[0] == "app0"}


def test_the_scores_manifest_records_the_input_and_the_where_and_json_names_the_folders(by_app, tmp_path, capsys):
    """A score's _manifest.json held no word of the data it read nor of its --where, and --json's
    "where" held the output folder (a misnomer beside --where): it is "out" (and "store") now,
    "where" kept this release only."""
    store, out, base = str(tmp_path / "s"), str(tmp_path / "o"), ["--scheduler", "inline", "--json"]
    assert main(["train", by_app, "--by", "app,site", "--time", "ts", "--target", "value", "--store", store,
                 "-p", "season_length=12", *base]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["store"] == summary["where"] == store and "out" not in summary
    assert main(["score", by_app, "--store", store, "--out", out, "--where", "app = app0", *base]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["out"] == summary["where"] == out and summary["store"] == store
    man = json.loads((tmp_path / "o" / "_manifest.json").read_text())
    assert man["input"]["url"] == by_app and man["input"]["filter"]["text"] == '(app == "app0")'
    assert man["input"]["fingerprint"] and man["input"]["rows"] == 4 * 72 and man["input"]["partition_keys"] == ["app"]
    from modelfactory.store import stored_filter

    assert stored_filter(man["input"]["filter"]).equals(__import__("pyarrow.compute").compute.field("app") == "app0")
    assert main(["score", by_app, "--store", store, "--out", out, "--overwrite", *base]) == 0
    assert json.loads((tmp_path / "o" / "_manifest.json").read_text())["input"]["filter"] is None


@pytest.mark.parametrize("where, why", [
    ("app", "cannot read the condition 'app'"),
    ("app = null", "compare with null as 'COLUMN is null'"),
    ("and app = x", "'and' needs a condition on each side"),
    ("site in ('007', 7)", "mix types: quote them all"),
    ("site in 'a', 'b'", "cannot read the condition"),
    ("app = 'unclosed", "cannot read it from"),
    ("value = 99999999999999999999", "99999999999999999999 is beyond a 64-bit integer"),
    ("value in (1, -9223372036854775809)", "-9223372036854775809 is beyond a 64-bit integer"),
    ("value < 1e400", "1e400 is beyond a double"),
    ("app = my app", "cannot read the condition 'app = my app'; quote text that has spaces in it: app = 'my app'"),
    ("app = 'a' or app = b", ("cannot read the condition \"app = 'a' or app = b\"; 'or' is not supported: for "
                              "values of one column write COLUMN in (A, B)")),
    ("value between 1 and 2", "'between' is not supported: write COLUMN >= A and COLUMN <= B"),
    ("app like 'ap%'", "'like' is not supported"),
])
def test_where_mistakes_are_one_error_line(by_app, tmp_path, capsys, where, why):
    code = main(["train", by_app, "--by", "app,site", "--time", "ts", "--target", "value", "--store",
                 str(tmp_path / "s"), "--scheduler", "inline", "--where", where])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"error: --where {where!r}: ") and why in err and err.count("\n") == 1
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("argv, message", [
    (["--target", "latency"], "error: The target column 'latency' is not in the dataset"),
    (["--target", "value", "--model", "seasonl"], "error: Unknown model 'seasonl'. Did you mean 'seasonal'?"),
    (["--target", "value", "-p", "threshold=-1"], "error: The 'threshold' parameter of SeasonalProfile must be a finite float >= 0.0. Got -1 instead."),
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


def test_version_prints_the_versions_a_bug_report_needs(capsys):
    # `modelfactory --version` was "error: the following arguments are required: COMMAND", exit 2
    import pandas
    import pyarrow

    import modelfactory

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"modelfactory {modelfactory.__version__} (Python {sys.version.split()[0]}; dask ")
    assert f"pandas {pandas.__version__}" in out and f"pyarrow {pyarrow.__version__}" in out


def test_demo_runs_end_to_end_on_a_local_cluster(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "modelfactory", "demo", "--out", str(tmp_path), "--series", "200",
                           "--days", "3", "--workers", "2"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "200 groups, ok 200, failed 0, skipped 0" in proc.stdout
    assert (tmp_path / "store" / "LATEST").exists()
    # into a pipe (cron, CI): no progress bar redrawn with carriage returns, no dashboard address
    assert "Dask dashboard" not in proc.stderr and "\r" not in proc.stderr, proc.stderr


def test_the_progress_bar_and_the_dashboard_address_are_shown_on_a_terminal(tmp_path):
    import fcntl
    import pty
    import select
    import struct
    import termios

    primary, secondary = pty.openpty()
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a terminal has a size
    proc = subprocess.Popen([sys.executable, "-m", "modelfactory", "demo", "--out", str(tmp_path), "--series", "50",
                             "--days", "3", "--workers", "1"], stdout=subprocess.PIPE, stderr=secondary)
    os.close(secondary)
    shown = b""
    try:
        while True:
            ready, _, _ = select.select([primary], [], [], 120)
            assert ready, "no output for two minutes"
            try:
                chunk = os.read(primary, 4096)
            except OSError:  # the terminal closed: the process ended
                break
            if not chunk:
                break
            shown += chunk
        assert proc.wait(timeout=60) == 0
    finally:
        os.close(primary)
        if proc.poll() is None:
            proc.kill()
    text = shown.decode(errors="replace")
    assert "Dask dashboard: http://" in text and "train seasonal" in text and "unit" in text, text


def test_demo_refuses_a_bad_model_before_writing_and_a_run_with_no_model_is_exit_2(tmp_path, capsys):
    # The guide: bad input (an unknown model) "is found before anything runs", and a training run
    # that fitted no model prints an error: line and exits 2. demo --model nope wrote the whole
    # dataset first; demo --days 1 (too short for a daily season) exited 0 with a WARNING.
    out = tmp_path / "d1"
    assert main(["demo", "--out", str(out), "--series", "4", "--days", "3", "--model", "nope",
                 "--scheduler", "inline", "--quiet"]) == 2
    assert capsys.readouterr().err.startswith("error: Unknown model 'nope'.") and not out.exists()
    # a model that needs features: demo has no --features and its dataset no feature columns, yet
    # it wrote the dataset, then said "pass features=[...] (--features)", an option demo refuses
    for model in ("random_forest", "isolation_forest"):
        out = tmp_path / model
        assert main(["demo", "--out", str(out), "--series", "4", "--days", "3", "--model", model,
                     "--scheduler", "inline", "--quiet"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: Model {model!r} needs feature columns, and the demo dataset has none")
        assert "seasonal" in err and "--features" in err and not out.exists()
    out = tmp_path / "d2"
    assert main(["demo", "--out", str(out), "--series", "4", "--days", "1", "--scheduler", "inline",
                 "--quiet"]) == 2
    err = capsys.readouterr().err  # refused before the dataset is written, as the models it cannot fit
    assert err.startswith("error: --days 1 gives each series 24 hourly points, and seasonal needs at least 48")
    assert not out.exists()
    assert main(["demo", "--out", str(out), "--series", "4", "--days", "2", "--scheduler", "inline",
                 "--quiet"]) == 0


def test_a_training_that_fits_no_model_is_told_once(tmp_path):
    """`train` printed a WARNING line and then an `error:` line saying the same (no model fitted,
    the commonest reason, LATEST not moved)."""
    from modelfactory.demo import write_dataset

    data = write_dataset(str(tmp_path / "data"), series=4, days=1)
    proc = subprocess.run([sys.executable, "-m", "modelfactory", "train", data, "--by", "app,site", "--time", "ts",
                           "--target", "value", "--store", str(tmp_path / "store"), "--scheduler", "inline"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2, proc.stderr
    told = [line for line in proc.stderr.splitlines() if "fitted no model" in line]
    assert len(told) == 1 and told[0].startswith("error: run "), proc.stderr


# ---------------------------------------------------------------------------------------------
# Cluster trouble is one error line too; Dask's own log lines only with -v
# ---------------------------------------------------------------------------------------------
def _cli(*argv: str, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "modelfactory", *argv], capture_output=True, text=True,
                          timeout=timeout, check=False, env=None if env is None else {**os.environ, **env})


@pytest.mark.timeout(90)
@pytest.mark.parametrize("kind, scheme", [("silent", "tcp"), ("http400", "tcp"), ("http400", "http")])
def test_an_address_that_is_not_a_dask_schedulers_is_one_error_line(by_app, tmp_path, kind, scheme):
    import time

    server = NotAScheduler(kind)
    address = server.address.replace("tcp://", f"{scheme}://")
    start = time.monotonic()
    try:
        proc = _cli("train", by_app, "--by", "app,site", "--time", "ts", "--target", "value",
                    "--store", str(tmp_path / "s"), "--scheduler", address, "-q", timeout=60,
                    env={"MODELFACTORY_CONNECT_TIMEOUT": "3"})
    finally:
        server.close()
    # the silent server: the connect time-out (the setting's 3 s, not the default 20 s), not for ever
    assert time.monotonic() - start < 3 + 12
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    if kind == "silent":  # a second without an answer is said while it waits (not an error line)
        assert lines[0].startswith(f"warning: no answer yet from {address}: waiting up to 3 s"), lines
        lines = lines[1:]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert repr(address) in lines[0] and "tcp://host:8786" in lines[0]


_TRAIN = ["train", "--by", "app,site", "--time", "ts", "--target", "value", "--workers", "1", "-q"]


@pytest.mark.timeout(120)
def test_a_unit_failing_on_a_local_worker_is_the_error_line_alone(corrupt_values, tmp_path):
    """Not also the worker's own "Compute Failed" log lines, with their traceback."""
    proc = _cli(*_TRAIN, corrupt_values, "--store", str(tmp_path / "s"))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "GZip" in lines[0], proc.stderr


@pytest.mark.timeout(180)
def test_dask_log_lines_stay_off_stderr_unless_verbose(by_day, tmp_path):
    # a shuffle: nothing at all on stderr (the scheduler's "Shuffle ... initialized" lines are Dask's)
    quiet = _cli(*_TRAIN, by_day, "--unit-rows", "300", "--store", str(tmp_path / "s1"))
    assert quiet.returncode == 0, quiet.stderr
    assert "(shuffle)" in quiet.stdout
    assert quiet.stderr == ""
    # -v shows them
    verbose = _cli("-v", *_TRAIN, by_day, "--unit-rows", "300", "--store", str(tmp_path / "s2"))
    assert verbose.returncode == 0, verbose.stderr
    assert "distributed.scheduler" in verbose.stderr and "Shuffle" in verbose.stderr


def test_a_usage_mistake_is_one_error_line_with_the_closest_name(capsys):
    cases = [(["train", "d", "--by", "a", "--tme", "ts", "--target", "v", "--store", "s"],
              "error: unrecognized arguments: --tme ts (did you mean --time?); see python -m modelfactory train --help"),
             (["trian", "d"], "(did you mean train?); see python -m modelfactory --help"),
             (["models", "sho"], "(did you mean show?); see python -m modelfactory models --help"),
             (["train", "d"], ("error: the following arguments are required: --by, --target, --store; "
                               "see python -m modelfactory train --help")),
             # the settings' check said "Setting 'workers' in the arguments must be an integer >= 1"
             (["train", "d", "--by", "a", "--target", "v", "--store", "s", "--workers", "0"],
              "error: argument --workers: 0 is less than 1; see python -m modelfactory train --help"),
             (["score", "d", "--store", "s", "--out", "o", "--unit-rows", "1e3"],
              ("error: argument --unit-rows: '1e3' is not a whole number (the digits 0-9); "
               "see python -m modelfactory score --help")),
             # int() took "1_0" as 10 (and "٣" as 3): one typo started 10 workers
             (["train", "d", "--by", "a", "--target", "v", "--store", "s", "--workers", "1_0"],
              ("error: argument --workers: '1_0' is not a whole number (the digits 0-9); "
               "see python -m modelfactory train --help")),
             (["train", "d", "--by", "a", "--target", "v", "--store", "s", "--workers", "٣"],
              "is not a whole number (the digits 0-9)")]
    for argv, want in cases:
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and err.count("\n") == 1 and err.startswith("error: ") and want in err, err


@pytest.mark.parametrize("argv, want", [
    # an option of another command: say so, and point at this command's help
    (["train", "d", "--by", "a", "--target", "v", "--store", "s", "--out", "x"],
     ("error: unrecognized arguments: --out x (--out is not an option of `train`); "
      "see python -m modelfactory train --help")),
    (["models", "show", "--store", "s", "--quiet"],
     ("error: unrecognized arguments: --quiet (--quiet is not an option of `models show`); "
      "see python -m modelfactory models show --help")),
    # a misspelling: the hint comes from this command's own options only
    (["models", "show", "--store", "s", "--trsut"],
     ("error: unrecognized arguments: --trsut (did you mean --trust?); "
      "see python -m modelfactory models show --help")),
    (["models", "list", "--store", "s", "--quite"],
     "error: unrecognized arguments: --quite; see python -m modelfactory models list --help"),
    # sizing the workers: not "did you mean --where?", but how it is done
    (["train", "d", "--by", "a", "--target", "v", "--store", "s", "--threads", "4"],
     ("error: unrecognized arguments: --threads 4 (the workers of the local cluster a job makes have one thread "
      "each and Dask's memory limit (the machine's memory shared out): for others, start one with `dask scheduler` "
      "and `dask worker ADDRESS --nthreads N --memory-limit 8GiB` and pass --scheduler ADDRESS; on Kubernetes, "
      "kube.threads and kube.resources (docs/kubernetes.md)); see python -m modelfactory train --help")),
])
def test_a_usage_hint_names_only_the_failing_commands_own_options(capsys, argv, want):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err == want + "\n", err


@pytest.mark.parametrize("text, value", [("trend=None", None), ("trend=null", None), ("debounce=none", "none"),
                                         ("trend=add", "add"), ("n=3", 3), ("name=Nonesuch", "Nonesuch")])
def test_a_param_of_none_is_read_as_none(text, value):
    args = build_parser().parse_args(["train", "d", "--by", "a", "--target", "v", "--store", "s", "-p", text])
    assert args.param == [(text.split("=")[0], value)]


def test_null_keys_refusal_names_the_where_that_the_cli_then_takes(tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    from _data import metrics_table

    t = metrics_table()
    site = pc.if_else(pc.equal(t["site"], "s002"), pa.scalar(None, pa.string()), t["site"])
    (tmp_path / "data").mkdir()
    pq.write_table(t.set_column(t.schema.get_field_index("site"), "site", site), tmp_path / "data" / "p.parquet")
    argv = ["train", str(tmp_path / "data"), "--by", "app,site", "--time", "ts", "--target", "value",
            "--store", str(tmp_path / "s"), "--scheduler", "inline", "--quiet", "-p", "season_length=12"]
    assert main(argv) == 2
    assert 'on the command line --where "site is not null"' in capsys.readouterr().err
    assert main([*argv, "--where", "site is not null"]) == 0


def test_where_times_finer_than_the_column_numbers_of_two_kinds_and_now(tmp_path, capsys):
    """--where "ts >= '2026-03-04T00:00:00.0005'" on a millisecond column was an internal error
    (ArrowInvalid: casting would lose data); "value in (1, 2.5)" was refused as mixing types (with
    advice to quote the numbers); "ts >= today" was this machine's local time, read as UTC."""
    import pyarrow as pa
    import pyarrow.dataset as ds
    import pyarrow.parquet as pq
    from _data import metrics_table

    from modelfactory.cli import _where
    from modelfactory.exceptions import ModelFactoryError

    t = metrics_table(series=3, hours=72)
    (tmp_path / "data").mkdir()
    pq.write_table(t, tmp_path / "data" / "p.parquet")  # ts: timestamp[ms, tz=UTC] in the file
    data, store = str(tmp_path / "data"), str(tmp_path / "s")
    common = ["--by", "app,site", "--time", "ts", "--target", "value", "--store", store,
              "--scheduler", "inline", "--quiet", "-p", "season_length=12"]
    assert main(["train", data, *common, "--where", "ts < '2026-03-04T00:00:00.0005'"]) == 0
    assert main(["score", data, "--store", store, "--out", str(tmp_path / "o"), "--scheduler", "inline",
                 "--quiet", "--where", "ts >= '2026-03-04T00:00:00.0005'"]) == 0
    scored = ds.dataset(str(tmp_path / "o"), format="parquet", partitioning="hive",
                        exclude_invalid_files=True).to_table()
    assert scored.num_rows == 3 * 23  # 01:00 to 23:00 of the last day: 00:00 is before the literal
    e = _where(["value in (1, 2.5, -3)"])
    assert "1" in str(e) and "2.5" in str(e)
    for bad, why in [("ts in ('2026-03-04T00:00:00.0005')", "finer than"), ("ts >= today", "not a time"),
                     ("ts >= now", "not a time")]:
        with pytest.raises(ModelFactoryError, match=why):
            _where([bad], {"ts": pa.timestamp("ms", "UTC")})
    capsys.readouterr()


def test_where_a_time_past_2262_on_a_coarser_column():
    # "valid_to < '9999-12-31'" on a millisecond column: the literal was made in nanoseconds
    # first, and a bare OverflowError came out
    import pyarrow as pa

    from modelfactory.cli import _where
    from modelfactory.exceptions import ModelFactoryError

    t = pa.table({"k": ["a", "b"], "v": [1.0, 2.0],
                  "valid_to": pa.array([1_700_000_000_000, 253402214400000], pa.timestamp("ms"))})  # 9999-12-31
    for clause, kept in [("valid_to < '9999-12-31'", ["a"]), ("valid_to in ('9999-12-31')", ["b"]),
                         ("valid_to >= '9000-01-01T00:00:00Z'", ["b"])]:
        cond = _where([clause], {"valid_to": pa.timestamp("ms")})
        assert t.filter(cond)["k"].to_pylist() == kept, clause
    for column in (pa.timestamp("ns"), pa.timestamp("s")):
        with pytest.raises(ModelFactoryError, match=r"past what the timestamp\[.*\] column 'valid_to' can hold"):
            _where(["valid_to < '9999-12-31T00:00:00.001'"], {"valid_to": column})


def test_models_show_sums_up_a_large_state_array_unless_full():
    # a user model keeping a window of ten million values printed 230 MB (2 GB of memory, 13 s)
    import numpy as np

    from modelfactory.cli import SHOWN_VALUES, _shown_value

    window = np.arange(SHOWN_VALUES * 2, dtype=np.float64)
    window[10] = np.nan
    assert _shown_value(window, False) == {"array": f"float64 [{SHOWN_VALUES * 2}]", "first": [0.0, 1.0, 2.0, 3.0, 4.0],
                                           "min": 0.0, "max": SHOWN_VALUES * 2 - 1.0,
                                           "mean": float(np.nanmean(window)), "not finite": 1, "all of it": "--full"}
    assert _shown_value(window, True)[:3] == [0.0, 1.0, 2.0] and len(_shown_value(window, True)) == SHOWN_VALUES * 2
    assert _shown_value(np.arange(3), False) == [0, 1, 2] and _shown_value(2.5, False) == 2.5
    assert build_parser().parse_args(["models", "show", "--store", "s", "--key", "a=b", "--full"]).full


def test_a_retrain_says_how_many_groups_it_refit_and_carried_over(tmp_path, capsys):
    # `train --only-changed` printed "4 groups, ok 4" whether it refit all or none of them
    import pyarrow.parquet as pq
    from _data import metrics_table

    (tmp_path / "d").mkdir()
    pq.write_table(metrics_table(series=4, hours=72, apps=1), tmp_path / "d" / "p.parquet")
    common = ["train", str(tmp_path / "d"), "--by", "app,site", "--time", "ts", "--target", "value", "--store",
              str(tmp_path / "s"), "--scheduler", "inline", "-q", "-p", "season_length=12"]
    assert main(common) == 0
    first = modelfactory.ModelStore(str(tmp_path / "s")).latest()
    assert "retrain (" not in capsys.readouterr().out
    assert main([*common, "--only-changed"]) == 0
    assert f"retrain (changed) of run {first}: 0 groups refit, 4 carried over\n" in capsys.readouterr().out
    assert main([*common, "--only-failed", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["retrain"]["carried_over"] == 4
    # models show said "carried over {'<run>': 4}" (a Python dict), or "carried over {}"
    assert main(["models", "show", "--store", str(tmp_path / "s")]) == 0
    assert re.search(rf"\nretrained failed groups of \S+; carried over 4 from {first}\n", capsys.readouterr().out)


def test_filter_given_as_text_from_python_is_read_as_the_clis_where(tmp_path, capsys):
    """The guide calls --where "the CLI's filter=", but filter="app = app0" from Python was a
    TypeError from inside pyarrow ("expected pyarrow._compute.Expression, got str"), a traceback.
    And --where "ts > 5" was Arrow's "no kernel matching input types (timestamp[ms, tz=UTC], int8)"."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from _data import metrics_table

    from modelfactory.exceptions import ModelFactoryError
    from modelfactory.where import parse_where

    t = metrics_table(series=4, hours=72, apps=2)
    (tmp_path / "data").mkdir()
    pq.write_table(t, tmp_path / "data" / "p.parquet")
    data = str(tmp_path / "data")
    args = {"by": ["app", "site"], "time": "ts", "target": "value", "cluster": "inline",
            "params": {"season_length": 12}}
    one_app = str(t["app"][0])
    run = modelfactory.train(data, store=str(tmp_path / "a"), filter=f"app = '{one_app}'", **args)
    both = modelfactory.train(data, store=str(tmp_path / "b"), **args,
                              filter=[f"app = '{one_app}'", "ts >= '2026-03-03'"])
    assert main(["train", data, "--by", "app,site", "--time", "ts", "--target", "value", "--store",
                 str(tmp_path / "c"), "--scheduler", "inline", "--quiet", "-p", "season_length=12",
                 "--where", f"app = '{one_app}'", "--where", "ts >= '2026-03-03'"]) == 0
    cli = modelfactory.ModelStore(str(tmp_path / "c")).manifest()
    assert run.summary["counts"]["ok"] == both.summary["counts"]["ok"] == 2
    assert modelfactory.ModelStore(str(tmp_path / "b")).manifest()["input"]["filter"] == cli["input"]["filter"]
    with pytest.raises(ModelFactoryError, match=r"^filter= 'app = ': "):
        modelfactory.train(data, store=str(tmp_path / "d"), filter="app = ", **args)
    assert modelfactory.train(data, store=str(tmp_path / "e"), filter=[], **args).summary["groups"] == 4  # no conditions
    with pytest.raises(ModelFactoryError, match=r"filter= takes a pyarrow expression .* got int 42"):
        modelfactory.train(data, store=str(tmp_path / "d"), filter=42, **args)
    with pytest.raises(ModelFactoryError, match=r"the column 'ts' is a time \(timestamp\[ms, tz=UTC\]\), and 5 "
                                                r"unquoted is a number: compare it with a quoted time"):
        parse_where(["ts > 5"], {"ts": pa.timestamp("ms", "UTC")})
    assert not (tmp_path / "d").exists()
    capsys.readouterr()


@pytest.mark.parametrize("where, why", [
    # "shard = 07" was Arrow's "no kernel matching input types (string, int8)" and the hint
    # --where "shard = '7'", which matches no shard=07 folder
    ("shard = 07", "the column 'shard' is text (string), and 07 unquoted is a number: quote it to compare "
                   "text, as in --where \"shard = '07'\""),
    ("shard in (07, 08)", "as in --where \"shard = '07'\""),
    ("shard = true", "true unquoted is a boolean"),
    # a number column compared with text was given the partition keys' hint, about another column
    ("value > 1_000", "the column 'value' is a number (double), and 1_000 is text: write a number unquoted"),
    ("value < '5'", "and '5' is text (quoted)"),
])
def test_where_a_value_of_the_wrong_kind_gets_the_fix_in_the_users_own_words(tmp_path, capsys, where, why):
    import pyarrow as pa
    from _data import metrics_table, write

    t = metrics_table(series=2, hours=48)
    t = t.append_column("shard", pa.array(["07"] * len(t)))
    data = write(t, tmp_path / "d", ["shard"])
    argv = ["train", data, "--by", "app,site", "--time", "ts", "--target", "value", "--store",
            str(tmp_path / "s"), "--scheduler", "inline", "--quiet", "-p", "season_length=12"]
    assert main([*argv, "--where", where]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --where {where!r}: ") and why in err and err.count("\n") == 1, err
    if "as in --where" in why:  # the fix it gives works
        assert main([*argv, "--where", "shard = '07'"]) == 0


def test_a_filter_on_a_column_that_does_not_exist_says_so(tmp_path):
    """The error said the partition keys are strings (compare with '7'), whatever the mistake."""
    import pyarrow.compute as pc
    from _data import metrics_table, write

    import modelfactory
    from modelfactory.exceptions import SchemaError

    data = write(metrics_table(series=2, hours=48), tmp_path / "d", ["app"])
    args = dict(by=["app", "site"], time="ts", target="value", store=str(tmp_path / "s"), cluster="inline")
    with pytest.raises(SchemaError, match=r"there is no column 'ap'; did you mean 'app'\?") as err:
        modelfactory.train(data, filter=pc.field("ap") == "app0", **args)
    assert "are strings" not in str(err.value)
    with pytest.raises(SchemaError, match=r"no kernel matching") as err:
        modelfactory.train(data, filter=pc.field("value") > "1", **args)
    assert "are strings" not in str(err.value)
    with pytest.raises(SchemaError, match=r"the partition keys app are strings"):
        modelfactory.train(data, filter=pc.field("app") == 7, **args)


def test_where_reads_only_digits_as_numbers(tmp_path, capsys):
    """Unquoted, 1_000, nan, inf and Unicode digits were numbers (Python's int() and float() take
    them): --where "site = 1_000" then matched no row of a site=1_000 folder, and no group ran."""
    import pyarrow as pa
    from _data import metrics_table, write

    from modelfactory.where import _literal

    assert [_literal(("word", v), "c") for v in ("12", "-1.5", "2e3", ".5", "007")] == [12, -1.5, 2000.0, 0.5, 7]
    assert [_literal(("word", v), "c") for v in ("1_000", "nan", "inf", "Infinity", "\u0661\u0662", "0x10")] == [
        "1_000", "nan", "inf", "Infinity", "\u0661\u0662", "0x10"]
    t = metrics_table(series=3, hours=48)
    t = t.set_column(t.schema.get_field_index("site"), "site",
                     pa.array([{"s000": "1_000", "s001": "nan"}.get(s, s) for s in t["site"].to_pylist()]))
    data = write(t, tmp_path / "d", ["site"])
    assert main(["train", data, "--by", "app,site", "--time", "ts", "--target", "value", "--store",
                 str(tmp_path / "s"), "--scheduler", "inline", "--json", "-p", "season_length=12",
                 "--where", "site in (1_000, nan)"]) == 0
    assert json.loads(capsys.readouterr().out)["counts"]["ok"] == 2


@pytest.mark.parametrize("naive", [False, True])
def test_where_on_the_time_column_scores_one_window(tmp_path, capsys, naive):
    """A scheduled scorer reads one window: --where "ts >= '2026-03-04'" failed with pyarrow's
    "no kernel matching input types (timestamp[s, tz=UTC], string)".  Text compared with a time
    column is now a time of its type (a time without a zone is in the column's)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.dataset as ds
    import pyarrow.parquet as pq
    from _data import metrics_table

    t = metrics_table()
    if naive:
        t = t.set_column(t.schema.get_field_index("ts"), "ts", t["ts"].cast(pa.timestamp("s")))
    (tmp_path / "data").mkdir()
    pq.write_table(t, tmp_path / "data" / "p.parquet")
    data, store = str(tmp_path / "data"), str(tmp_path / "s")
    assert main(["train", data, "--by", "app,site", "--time", "ts", "--target", "value", "--store", store,
                 "--scheduler", "inline", "--quiet", "-p", "season_length=12",
                 "--where", "ts < '2026-03-04'"]) == 0
    out = str(tmp_path / "o")
    assert main(["score", data, "--store", store, "--out", out, "--scheduler", "inline", "--quiet",
                 "--where", "ts >= '2026-03-04T00:00:00Z' and ts < '2026-03-04 06:00'",
                 "--where", "app in (app0, app1)"]) == 0
    scored = ds.dataset(out, format="parquet", partitioning="hive", exclude_invalid_files=True).to_table()
    times = pc.cast(pc.cast(scored["ts"], pa.timestamp("s", scored["ts"].type.tz)), pa.int64()).to_numpy()
    day = 1772582400  # 2026-03-04T00:00:00Z
    assert scored.num_rows > 0 and times.min() == day and times.max() == day + 5 * 3600
    assert set(scored["app"].to_pylist()) == {"app0", "app1"}
    capsys.readouterr()
    assert main(["score", data, "--store", store, "--out", str(tmp_path / "o2"), "--scheduler", "inline",
                 "--where", "ts >= yesterday"]) == 2
    assert "error: --where 'ts >= yesterday': 'yesterday' is not a time for the timestamp[" in capsys.readouterr().err


def test_where_on_the_time_column_of_data_in_underscore_key_folders(tmp_path, capsys):
    """The column types that type a time literal came from pyarrow's own discovery, which skips
    "_tenant=acme/" folders (data to discover()): with all the files in such folders there were no
    types, and --where "ts < '2026-03-04'" was refused as text compared with a timestamp."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    from _data import metrics_table

    t = metrics_table(apps=2)
    for app in ("app0", "app1"):
        (tmp_path / "data" / f"_tenant={app}").mkdir(parents=True)
        pq.write_table(t.filter(pc.equal(t["app"], app)).drop_columns(["app"]),
                       tmp_path / "data" / f"_tenant={app}" / "part-0.parquet")
    assert main(["train", str(tmp_path / "data"), "--by", "_tenant,site", "--time", "ts", "--target", "value",
                 "--store", str(tmp_path / "s"), "--scheduler", "inline", "--quiet", "-p", "season_length=12",
                 "--where", "ts < '2026-03-04'"]) == 0, capsys.readouterr().err


def test_score_into_a_folder_given_with_a_slash_as_the_guide_shows(by_app, tmp_path, capsys, monkeypatch):
    """`score ... --out scores/` printed 'top groups in scores//_anomalies.json', and a second run
    into it said 'pass overwrite=True', a Python argument, to a shell user."""
    monkeypatch.chdir(tmp_path)
    base = ["--scheduler", "inline", "--quiet"]
    assert main(["train", by_app, "--by", "app,site", "--time", "ts", "--target", "value", "--store", "models/",
                 "-p", "season_length=12", "-p", "threshold=0.5", *base]) == 0
    assert main(["score", by_app, "--store", "models/", "--out", "scores/", *base]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^[\d,]+ anomalous points; top groups in scores/_anomalies\.json$", out, re.MULTILINE), out
    # none: no file of top groups to point at (it holds [])
    assert main(["train", by_app, "--by", "app,site", "--time", "ts", "--target", "value", "--store", "calm/",
                 "-p", "season_length=12", "-p", "threshold=50", *base]) == 0
    assert main(["score", by_app, "--store", "calm/", "--out", "calm-scores/", *base]) == 0
    assert capsys.readouterr().out.endswith("\n0 anomalous points\n")
    assert main(["score", by_app, "--store", "models/", "--out", "scores/", *base]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: The output folder 'scores/' is not empty") and "--overwrite" in err, err


def test_errors_the_cli_shows_name_its_options(by_app, tmp_path, capsys):
    """A shell user was told to 'pass time=...', to 'Train first: modelfactory.train(..., store=...)'
    and to give a key like {'app': '...', 'site': '...'}: Python they cannot type here."""
    store = str(tmp_path / "s")
    assert main(["train", by_app, "--by", "app,site", "--target", "value", "--store", store,
                 "--scheduler", "inline", "-q"]) == 2
    assert "(--time)" in capsys.readouterr().err
    assert main(["models", "show", "--store", store]) == 2  # nothing at that path
    assert "Pass the --store of python -m modelfactory train." in capsys.readouterr().err
    (tmp_path / "s").mkdir()  # a store yet to train
    assert main(["models", "show", "--store", store]) == 2
    assert "python -m modelfactory train ... --store" in capsys.readouterr().err
    assert main(["train", by_app, "--by", "app,site", "--time", "ts", "--target", "value", "--store", store,
                 "--scheduler", "inline", "-q", "-p", "season_length=12"]) == 0
    capsys.readouterr()
    assert main(["models", "show", "--store", store, "--key", "app=app0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "(--key app=...,site=...)" in err and err.count("\n") == 1, err


def test_a_run_that_fits_no_model_says_why_in_its_error_line(by_app, tmp_path, capsys):
    """Every group skipped said 'every group failed or was skipped (see above)', and above was
    only the counts: the reason (season longer than every series) took `models show --run`."""
    assert main(["train", by_app, "--by", "app,site", "--time", "ts", "--target", "value", "--store",
                 str(tmp_path / "s"), "--scheduler", "inline", "--quiet", "-p", "season_length=500"]) == 2
    (line,) = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
    assert "every group failed or was skipped (most often, 12 skipped: seasonal needs at least 1000 " in line, line


def test_score_that_scores_no_group_fails_like_train_that_fits_none(by_app, tmp_path, capsys):
    """Scoring with models none of the data's groups has (or that all fail to load) printed
    'ok 0, failed 0, skipped 12' and exited 0: a scheduled job never noticed it scored nothing."""
    store, base = str(tmp_path / "s"), ["--scheduler", "inline", "--quiet"]
    assert main(["train", by_app, "--by", "app,site", "--time", "ts", "--target", "value", "--store", store,
                 "-p", "season_length=12", "--where", "app = app0", *base]) == 0
    capsys.readouterr()
    assert main(["score", by_app, "--store", store, "--out", str(tmp_path / "o"), "--where", "app != app0",
                 *base]) == 2
    out, err = capsys.readouterr()
    assert "ok 0, failed 0, skipped " in out
    (line,) = [x for x in err.splitlines() if x.startswith("error:")]
    assert line.startswith("error: run ") and "scored no group: every group failed or was skipped (most often, " in line
    # some groups scored: a success, the others skipped with their reason
    assert main(["score", by_app, "--store", store, "--out", str(tmp_path / "o2"), *base]) == 0


def test_score_says_once_that_keys_are_written_otherwise_than_in_training(tmp_path, capsys):
    """Sites trained as '07' and scored as 7 were all skipped as 'no model for this group', without
    a word about why.  The CLI says it once: in the error line when nothing scored, else in one
    warning line."""
    from modelfactory.demo import make_table

    t = make_table(3, days=3, apps=1, spikes=0).to_pandas()
    t["site"] = t["site"].map({"site-00000": "07", "site-00001": "08", "site-00002": "09"})
    t.to_parquet(tmp_path / "old.parquet")
    t.assign(site=t["site"].astype("int64")).to_parquet(tmp_path / "all.parquet")
    t.assign(site=t["site"].replace({"07": "7"})).to_parquet(tmp_path / "some.parquet")
    # The Arrow type pandas writes strings in: string under pandas 2, large_string under pandas 3.
    text = pq.read_schema(tmp_path / "old.parquet").field("site").type
    store, base = str(tmp_path / "s"), ["--scheduler", "inline", "--quiet"]
    assert main(["train", str(tmp_path / "old.parquet"), "--by", "site", "--time", "ts", "--target", "value",
                 "--store", store, *base]) == 0
    capsys.readouterr()
    assert main(["score", str(tmp_path / "all.parquet"), "--store", store, "--out", str(tmp_path / "o1"), *base]) == 2
    err = capsys.readouterr().err
    assert err.count("written in another type or format") == 1, err
    (line,) = err.splitlines()
    assert line.startswith("error: run ") and "(most often, 3 skipped: no model for this group in run " in line
    assert f"'site' is 7 (int64) in the data but '07' ({text}) in the run" in line
    assert main(["score", str(tmp_path / "some.parquet"), "--store", store, "--out", str(tmp_path / "o2"), *base]) == 0
    err = capsys.readouterr().err
    (line,) = err.splitlines()
    assert line == (f"warning: 1 group found no model in run {modelfactory.ModelStore(store).latest()}, but its key "
                    f"matches keys of the run written in another type or format (e.g. 'site' is '7' ({text}) in "
                    f"the data but '07' ({text}) in the run: scoring matches keys exactly, so write 'site' in the "
                    "data as training had it (cast or reformat it), or train again on data like this)")


def test_the_key_mismatch_names_only_the_keys_that_differ():
    """With by=(user, service), users trained as '000' and scored as 0, the message also named
    'service' ('web' (large_string) in the data but 'web' (string) in the run), which matched:
    string, large_string and dictionary strings are one kind to exact matching, as are int widths."""
    from modelfactory.scoring import loose_key_reason

    example = ({"user": 0, "service": "web"}, {"user": "000", "service": "web"},
               {"user": pa.string(), "service": pa.string()})
    reason, warning = loose_key_reason("r1", ("user", "service"), example,
                                       {"user": pa.int64(), "service": pa.large_string()}, 1)
    assert "'user' is 0 (int64) in the data but '000' (string) in the run: scoring" in warning
    assert "'service'" not in warning and "'service'" not in reason
    example = ({"user": 7, "service": "web"}, {"user": 7, "service": "web"},
               {"user": pa.int32(), "service": pa.dictionary(pa.int32(), pa.string())})
    assert "'user'" in loose_key_reason("r1", ("user", "service"), example,
                                        {"user": pa.string(), "service": pa.string()}, 1)[1]
    assert "'service' is" not in loose_key_reason("r1", ("user", "service"), example,
                                                  {"user": pa.string(), "service": pa.string()}, 1)[1]


def test_the_summary_names_failed_groups_as_key_takes_them(tmp_path, capsys):
    """A failed group was shown as a tuple, ('a', 's2'), which no option takes; it is shown as
    --key takes it (app=a,site=s2).  Also '1 units' read as a slip."""
    import numpy as np
    import pandas as pd

    ts = pd.date_range("2026-01-05", periods=48, freq="h", tz="UTC")
    rows = [pd.DataFrame({"site": site, "ts": t, "value": np.arange(48.0) % 12})
            for site, t in (("s1", ts), ("s2", ts.insert(5, ts[5])[:48]))]  # s2 repeats a time: it fails
    (tmp_path / "d" / "app=a").mkdir(parents=True)
    pd.concat(rows).to_parquet(tmp_path / "d" / "app=a" / "part-0.parquet")
    assert main(["train", str(tmp_path / "d"), "--by", "app,site", "--time", "ts", "--target", "value",
                 "--store", str(tmp_path / "s"), "--scheduler", "inline", "--quiet", "-p", "season_length=12"]) == 0
    out = capsys.readouterr().out
    assert "ok 1, failed 1, skipped 0" in out and "1 unit (files)" in out
    (line,) = [x for x in out.splitlines() if x.startswith("  failed ")]
    assert line.startswith("  failed app=a,site=s2: "), line


@pytest.mark.timeout(180)
@pytest.mark.parametrize("sig, code, said, cluster", [
    ("SIGINT", 130, "error: interrupted; ", "inline"),
    # how timeout, cron and Kubernetes stop a job: it ended with no word, the run to resume unnamed
    ("SIGTERM", 143, "error: terminated (SIGTERM); ", "inline"),
    ("SIGTERM", 143, "error: terminated (SIGTERM); ", "local")])
def test_ctrl_c_or_sigterm_during_train_names_the_run_to_resume(tmp_path, sig, code, said, cluster):
    # Ctrl-C said "error: interrupted; nothing was committed for the unfinished run": which run,
    # and that it can be resumed, took `models list`.
    import signal
    import time

    from _data import metrics_table, write

    import modelfactory

    data = write(metrics_table(series=60, hours=168, apps=20), tmp_path / "d", ["app"])
    store = tmp_path / "store"
    proc = subprocess.Popen([sys.executable, "-m", "modelfactory", "train", data, "--by", "app,site", "--time", "ts",
                             "--target", "value", "--model", "ets", "--store", str(store), "--scheduler", cluster,
                             *(["--workers", "1"] if cluster == "local" else []), "--unit-rows", "500", "-q"],
                            stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while len(list(store.glob("runs/*/parts/*.parquet"))) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it could be interrupted"
            time.sleep(0.02)
        proc.send_signal(getattr(signal, sig))  # to the client alone: its local cluster's workers are its to stop
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    (pending,) = modelfactory.ModelStore(str(store)).pending()
    assert proc.returncode == code, err
    assert err.count("error:") == 1 and "Traceback" not in err
    assert err.startswith(said) and f"--resume {pending['run_id']}" in err
    deadline = time.monotonic() + 30
    while True:  # nothing of the job is left running: its workers went with it
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        assert time.monotonic() < deadline, subprocess.run(["ps", "-o", "pid,args", "-g", str(proc.pid)], check=False,
                                                           capture_output=True, text=True).stdout
        time.sleep(0.2)


def _ctrl_c_in_a_terminal(argv: list[str], when, again: float | None = None) -> tuple[int, str, list]:
    """Run the CLI in a process group of its own, as a terminal runs a command, and send SIGINT
    to the whole group once ``when(process)`` holds: what Ctrl-C in a terminal does (and again
    ``again`` seconds later).  Its exit status, its stderr and what is left of the group two
    seconds after it exits."""
    import signal
    import time

    import psutil

    # SIGINT is not ignored here (conftest), so the CLI gets Python's own handler, as in a terminal
    proc = subprocess.Popen([sys.executable, "-m", "modelfactory", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not when(proc):
            assert proc.poll() is None and time.monotonic() < deadline, "the job ended before it could be interrupted"
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGINT)
        if again is not None:
            time.sleep(again)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        time.sleep(2)
        left = [p for p in psutil.pids() if _group_of(p) == proc.pid and _alive(p)]
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, err, left


def _group_of(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.timeout(180)
@pytest.mark.parametrize("moment", ["while units run", "while the workers start", "twice, then while it closes"])
def test_ctrl_c_in_a_terminal_prints_one_error_line_and_no_worker_tracebacks(tmp_path, moment):
    """A terminal's Ctrl-C reaches every process of the command's group, the cluster's worker
    processes too: each printed a traceback (KeyboardInterrupt in Dask's nanny code; "Fatal Python
    error: init_import_site" while still starting, and Dask's exit hook an AssertionError for the
    half-started cluster) over the one error line.  The workers now leave Ctrl-C to the job, which
    closes its cluster; nothing of it is left running.  Pressed again while the cluster closed,
    Ctrl-C broke the close off: Dask's exit hook closed it ten seconds later with INFO lines, and
    the error line had lost which run to resume; the close now holds it."""
    import psutil
    from _data import metrics_table, write

    data = write(metrics_table(series=40, hours=168, apps=20), tmp_path / "d", ["app"])
    store = tmp_path / "store"
    if moment != "while the workers start":
        def when(proc):
            return len(list(store.glob("runs/*/parts/*.parquet"))) >= 1
    else:
        def when(proc):  # a worker process exists, the cluster is not up yet
            try:
                return bool(psutil.Process(proc.pid).children(recursive=True))
            except psutil.NoSuchProcess:
                return False
    rc, err, left = _ctrl_c_in_a_terminal(["train", data, "--by", "app,site", "--time", "ts", "--target", "value",
                                           "--model", "ets", "--store", str(store), "--scheduler", "local",
                                           "--workers", "2", "--unit-rows", "500", "-q"], when,
                                          again=0.2 if moment.startswith("twice") else None)
    assert rc == 130, err
    assert "Traceback" not in err and "Fatal Python error" not in err and "Exception ignored" not in err, err
    lines = [x for x in err.splitlines() if x.strip() and not x.startswith("Dask dashboard")]
    assert len(lines) == 1, err
    (line,) = lines
    assert line.startswith("error: interrupted"), err
    if moment != "while the workers start":
        assert "--resume" in line, err
    assert left == [], left


def test_models_show_of_a_key_written_otherwise_than_in_training_gives_the_hint_score_gives(tmp_path, capsys):
    """`models show --key site=7` against a run keyed '07' said only 'No group', where score says
    the key matches one of the run's written in another type or format.  It says so too, with the
    --key that names the group; a key that matches none loosely gets no hint."""
    from modelfactory.demo import make_table

    t = make_table(3, days=3, apps=1, spikes=0).to_pandas()
    t["site"] = t["site"].map({"site-00000": "07", "site-00001": "08", "site-00002": "09"})
    t.to_parquet(tmp_path / "d.parquet")
    text = pq.read_schema(tmp_path / "d.parquet").field("site").type  # string at pandas 2, large_string at 3
    store = str(tmp_path / "s")
    assert main(["train", str(tmp_path / "d.parquet"), "--by", "site", "--time", "ts", "--target", "value",
                 "--store", store, "--scheduler", "inline", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["models", "show", "--store", store, "--key", "site=7"]) == 2
    captured = capsys.readouterr()
    (line,) = captured.err.splitlines()
    assert captured.out == "" and line.startswith("error: No group site=7 in run ")
    assert line.endswith("Its key matches one of the run's written in another type or format (e.g. 'site' is '7' in "
                         f"--key but '07' ({text}) in the run): keys match exactly, so give the key as the run "
                         "has it: --key site=07."), line
    assert main(["models", "show", "--store", store, "--key", "site=5"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("error: No group site=5 in run ") and "another type or format" not in line
    assert main(["models", "show", "--store", store, "--key", " site = 07 ", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["model"] and shown["key"] == "site=07"  # which group: spaces around names and values dropped


@pytest.mark.parametrize("options", ['{auto_mkdir = "yes"}', "{client_kwargs = 5}"])
def test_storage_options_the_storage_library_refuses_are_one_error_line(tmp_path, capsys, monkeypatch, options):
    # "error: internal error: TypeError: AioSession.__init__() got an unexpected keyword argument
    # 'auto_mkdir'", exit status 1, from train, models, report and plot (score said it well)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    (tmp_path / "job.toml").write_text(f"storage_options = {options}\n")
    assert main(["models", "list", "--store", "s3://mf-nowhere/x", "--config", str(tmp_path / "job.toml")]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("error: the storage library refused its settings: ") and "[storage_options]" in line, line


def test_main_in_a_process_with_its_own_logging_leaves_that_logging_as_it_was(tmp_path, capsys):
    """main() run in-process (a notebook, a scheduler's task) gave the caller's own log handlers its
    'warning: ...' format, for good."""
    import io
    import logging

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("APP %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        assert main(["models", "list", "--store", str(tmp_path / "none")]) == 2
        logging.getLogger("someapp").warning("after")
    finally:
        root.removeHandler(handler)
    assert stream.getvalue().splitlines()[-1] == "APP WARNING someapp after"
    assert handler.formatter._fmt == "APP %(levelname)s %(name)s %(message)s"
