"""`whisper-ptq bench`: experiment files, refusals before anything runs, crash isolation, kill and resume."""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from whisper_ptq.backends import get_recipe
from whisper_ptq.cli import main
from whisper_ptq.errors import UserError
from whisper_ptq.executors.jobs import Failed, Finished, Job, Opened, Part, Rows, decode_event, encode_event
from whisper_ptq.results.rows import UtteranceResult
from whisper_ptq.results.store import RESULTS_FILE, config_hash
from whisper_ptq.settings import DecodingOptions, Settings
from whisper_ptq.studies.bench import SweepOptions, run_sweep
from whisper_ptq.studies.experiment import Experiment, load_experiment, presets

PLUGINS = Path(__file__).parent / "plugins"
TINY = """
name = "tiny"
models = ["tiny.en"]
recipes = [{recipes}]
datasets = ["librispeech:test-clean"]
limit = 3
threads = 1
"""
# Two recipes the kill/resume test runs; the crash test runs them too, plus one that aborts mid-run.
RECIPES = '"fp32", "reference:dtype=bf16"'


def experiment_file(tmp_path: Path, recipes: str = RECIPES, extra: str = "") -> Path:
    path = tmp_path / "exp.toml"
    path.write_text(TINY.format(recipes=recipes) + extra)
    return path


def bench(capsys, *args: str) -> tuple[int, str]:
    code = main(["bench", *args, "--no-progress"])
    return code, capsys.readouterr().err


def stored_rows(out: Path) -> dict[tuple[str, str], list[tuple[str, str]]]:
    """(recipe, dataset) -> [(utterance id, hypothesis)], read straight from the database."""
    db = sqlite3.connect(out / RESULTS_FILE)
    query = (
        "SELECT recipe, dataset, utterance_id, hypothesis FROM utterances JOIN tasks ON tasks.id = task_id "
        "ORDER BY recipe, dataset, utterance_id"
    )
    rows: dict[tuple[str, str], list[tuple[str, str]]] = {}
    for recipe, dataset, utt, hypothesis in db.execute(query):
        rows.setdefault((recipe, dataset), []).append((utt, hypothesis))
    db.close()
    return rows


# ---------------------------------------------------------------------------------------- experiment files


def test_presets_parse():
    assert {"paper", "quick", "paper-gpu"} <= set(presets())
    paper = load_experiment("paper")
    assert paper.models == ("base",) and paper.recipes[0] == "fp32" and paper.threads == 2
    assert paper.datasets == ("librispeech:test-clean", "librispeech:test-other")
    quick = load_experiment("quick")
    assert quick.models == ("tiny.en",) and quick.limit == 3
    assert load_experiment("paper-gpu").device == "cuda"


def test_snrs_add_noisy_variants(tmp_path):
    experiment = load_experiment(str(experiment_file(tmp_path, extra='snrs = [10, 2.5]\nnoise = "babble"\n')))
    assert experiment.dataset_specs() == [
        "librispeech:test-clean",
        "librispeech:test-clean+noise:snr=10,kind=babble,seed=0",
        "librispeech:test-clean+noise:snr=2.5,kind=babble,seed=0",
    ]


@pytest.mark.parametrize(
    "text, message",
    [
        ('name = "x"\nrecipes = ["fp32"]\nlimit = = 3\n', r"exp\.toml: invalid TOML: .*at line 3, column"),
        (TINY.format(recipes=RECIPES) + "recipe = 1\n", r"exp\.toml:8: unknown key 'recipe'; did you mean 'recipes'"),
        (TINY.format(recipes=RECIPES) + "batch_size = true\n", r"exp\.toml:8: 'batch_size' must be a positive"),
        (TINY.format(recipes=RECIPES) + "[extra]\n", r"unknown key 'extra'"),
        ('models = ["tiny.en"]\nrecipes = ["fp32"]\n', r"missing key 'datasets'"),
        (TINY.format(recipes='"fp32", "fp33"'), r"exp\.toml: unknown recipe 'fp33'"),
        (TINY.format(recipes='"fp32", "reference:dtype=int2"'), r"exp\.toml: recipe parameter reference:dtype"),
        (
            TINY.format(recipes=RECIPES).replace("test-clean", "test-dirty"),
            r"exp\.toml: dataset 'librispeech:test-dirty' not found",
        ),
        (TINY.format(recipes=RECIPES).replace("tiny.en", "huge.en"), r"exp\.toml: unknown model 'huge.en'"),
        (TINY.format(recipes='"fp32", "fp32"'), r"recipe 'fp32' is listed twice"),
        (TINY.format(recipes=RECIPES) + 'language = "xx"\n', r"exp\.toml:8: language must be a Whisper language"),
        (TINY.format(recipes=RECIPES) + "beam_size = 0\n", r"exp\.toml:8: 'beam_size' must be a positive"),
    ],
)
def test_bad_experiment_is_refused_before_anything_runs(tmp_path, shared_data, capsys, text, message):
    path = tmp_path / "exp.toml"
    path.write_text(text)
    out = tmp_path / "out"
    code, err = bench(capsys, str(path), "--out", str(out), "--data-root", str(shared_data))
    assert code == 2 and err.startswith("error: ")
    assert err.count("\n") == 1
    assert re.search(message, err), err
    assert not out.exists()


def test_decoding_options_are_part_of_the_identity(tmp_path):
    """Defaults stay out of the config (old databases keep their hash); a beam-5 sweep is another experiment."""
    greedy = load_experiment(str(experiment_file(tmp_path)))
    assert "beam_size" not in greedy.config() and "language" not in greedy.config()
    beam = load_experiment(str(experiment_file(tmp_path, extra="beam_size = 5\n")))
    assert beam.config()["beam_size"] == 5 and beam.settings(None, None).decoding.beam_size == 5
    assert config_hash(beam.config()) != config_hash(greedy.config())
    assert Experiment.from_config(beam.config()) == beam


def test_unknown_preset_is_refused(capsys):
    code, err = bench(capsys, "papr")
    assert code == 2 and "unknown experiment 'papr'" in err and "quick" in err


def test_jobs_and_events_survive_their_json_form(tmp_path):
    """What crosses a process (or, later, a machine) boundary comes back equal."""
    settings = Settings(data_root=tmp_path, decoding=DecodingOptions(language="de", beam_size=3))
    job = Job(3, "tiny.en", get_recipe("reference:dtype=bf16"), (Part("d", ("u1", "u2")),), settings)
    assert Job.from_dict(json.loads(json.dumps(job.to_dict()))) == job
    row = UtteranceResult("u1", "a b", "a", 2, 1, 3, 2, 1.5, 0.25)
    events = [Opened(3, {"size_bytes": 1, "calibration_dataset": None}), Rows(3, "d", (row,)), Finished(3, "d", {})]
    for event in [*events, Failed(3, "boom"), Failed(3, "boom", "d")]:
        assert decode_event(encode_event(event)) == event


# --------------------------------------------------------------------------------------- output directories


def test_other_experiment_in_out_dir_is_refused_unless_forced(tmp_path, shared_data, capsys):
    # fp16 cannot run on CPU: every task is skipped, so these sweeps start no worker and take a second.
    out = tmp_path / "out"
    first = load_experiment(str(experiment_file(tmp_path, recipes='"fp16"')))
    result = run_sweep(first, SweepOptions(out, data_root=shared_data, progress=False))
    assert result.jobs == 0 and [r["status"] for r in result.results] == ["skipped"]
    assert "fp16 runs on cuda" in result.results[0]["error"]

    other = experiment_file(tmp_path, recipes='"fp16"', extra="batch_size = 2\n")
    code, err = bench(capsys, str(other), "--out", str(out), "--data-root", str(shared_data))
    assert code == 2 and "holds results of a different experiment" in err and "--force" in err
    with pytest.raises(UserError, match="different experiment"):
        run_sweep(load_experiment(str(other)), SweepOptions(out, data_root=shared_data, progress=False))
    forced = run_sweep(load_experiment(str(other)), SweepOptions(out, data_root=shared_data, force=True))
    assert [r["status"] for r in forced.results] == ["skipped"]


def test_corrupt_database_is_refused_not_overwritten(tmp_path, shared_data, capsys):
    out = tmp_path / "out"
    out.mkdir()
    garbage = os.urandom(4096)
    (out / RESULTS_FILE).write_bytes(garbage)
    code, err = bench(capsys, str(experiment_file(tmp_path)), "--out", str(out), "--data-root", str(shared_data))
    assert code == 2 and "corrupt" in err and str(out / RESULTS_FILE) in err
    assert (out / RESULTS_FILE).read_bytes() == garbage


def test_resume_needs_results(tmp_path, capsys):
    code, err = bench(capsys, "quick", "--resume", "--out", str(tmp_path / "none"))
    assert code == 2 and "nothing to resume" in err


# ------------------------------------------------------------------------------------ isolation and resume


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, shared_data, model_cache):
    """One sweep run to the end: fp32, bf16, and a recipe whose worker aborts after its first batch."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    path = experiment_file(tmp, recipes=f'"crash:after=2", {RECIPES}')
    with pytest.MonkeyPatch.context() as env:
        # The driver validates the crash recipe; its worker process finds the plugin through the environment.
        env.syspath_prepend(str(PLUGINS))
        env.setenv("PYTHONPATH", os.pathsep.join([str(PLUGINS), os.environ.get("PYTHONPATH", "")]))
        env.setenv("WHISPER_PTQ_PLUGINS", "crash_backend")
        import crash_backend  # noqa: F401 - registers the crash backend in this process

        options = SweepOptions(tmp / "out", data_root=shared_data, cache_dir=model_cache, progress=False)
        result = run_sweep(load_experiment(str(path)), options)
    return tmp / "out", result


@pytest.mark.slow
def test_a_crashing_worker_fails_only_its_recipe(uninterrupted):
    out, result = uninterrupted
    by_recipe = {r["recipe"]: r for r in result.results}
    assert list(by_recipe) == ["fp32", "crash:after=2", "reference:dtype=bf16"], "fp32 baseline first"
    for name in ("fp32", "reference:dtype=bf16"):
        assert by_recipe[name]["status"] == "done" and by_recipe[name]["summary"]["n_utterances"] == 3
    crashed = by_recipe["crash:after=2"]
    assert crashed["status"] == "failed"
    assert "worker killed by SIGABRT" in crashed["error"] and "\n" not in crashed["error"]
    # The batch before the abort was stored, and it counts in the task's summary.
    assert len(crashed["utterances"]) == 1 and crashed["summary"]["n_utterances"] == 1


@pytest.mark.slow
def test_sigkill_then_resume_equals_an_uninterrupted_run(uninterrupted, tmp_path, shared_data, model_cache, capsys):
    out, log = tmp_path / "out", tmp_path / "bench.stderr"
    env = {**os.environ, "WHISPER_PTQ_DATA": str(shared_data), "WHISPER_PTQ_CACHE": str(model_cache)}
    cmd = [sys.executable, "-m", "whisper_ptq.cli", "bench", str(experiment_file(tmp_path)), "--out", str(out)]
    with log.open("w") as stderr:
        # Its own process group, so that the kill takes the driver and its worker at once, as a crash would.
        sweep = subprocess.Popen([*cmd, "--no-progress"], env=env, start_new_session=True, stderr=stderr)
        try:
            _wait_for_rows(out / RESULTS_FILE, sweep, log, at_least=1, below=6)
        finally:
            os.killpg(sweep.pid, signal.SIGKILL)
            sweep.wait()

    resume = ["bench", "--resume", "--out", str(out), "--data-root", str(shared_data), "--cache-dir", str(model_cache)]
    code = main([*resume, "--no-progress"])
    assert code == 0, capsys.readouterr().err
    reference = {key: rows for key, rows in stored_rows(uninterrupted[0]).items() if key[0] != "crash:after=2"}
    assert stored_rows(out) == reference
    db = sqlite3.connect(out / RESULTS_FILE)
    counts = db.execute("SELECT count(*), count(DISTINCT task_id || ' ' || utterance_id) FROM utterances").fetchone()
    statuses = {status for (status,) in db.execute("SELECT status FROM tasks")}
    db.close()
    assert counts == (6, 6) and statuses == {"done"}

    # A finished directory: a re-run starts no worker and changes nothing.
    options = SweepOptions(out, data_root=shared_data, cache_dir=model_cache, progress=False)
    again = run_sweep(load_experiment(str(tmp_path / "exp.toml")), options)
    assert again.jobs == 0 and stored_rows(out) == reference


def _row_count(db: Path) -> int:
    if not db.exists():
        return 0
    connection = sqlite3.connect(db)
    try:
        return connection.execute("SELECT count(*) FROM utterances").fetchone()[0]
    except sqlite3.Error:  # not renamed into place yet, or the schema not visible yet
        return 0
    finally:
        connection.close()


def _wait_for_rows(db: Path, sweep: subprocess.Popen, log: Path, at_least: int, below: int) -> None:
    """Poll the database (WAL: reading never blocks the sweep) until it holds some but not all rows."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if sweep.poll() is not None:
            pytest.fail(f"the sweep ended before it could be killed: {log.read_text()[-2000:]}")
        count = _row_count(db)
        if count >= below:
            pytest.fail("every row was stored before the kill; nothing left to resume")
        if count >= at_least:
            return
        time.sleep(0.02)
    pytest.fail("no row stored in time")
