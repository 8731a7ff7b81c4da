"""`whisper-ptq bench --executor ray`: the local executor's rows, a killed worker's shard retried, a shard that
keeps dying recorded as failed while the sweep completes. One Ray cluster on this machine for the module."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from whisper_ptq.backends import get_recipe
from whisper_ptq.cli import main
from whisper_ptq.errors import UserError
from whisper_ptq.executors import make_executor
from whisper_ptq.executors.jobs import Job, Part
from whisper_ptq.results.store import RESULTS_FILE
from whisper_ptq.settings import Settings
from whisper_ptq.studies.bench import SweepOptions, run_sweep
from whisper_ptq.studies.experiment import load_experiment

ray = pytest.importorskip("ray")

from whisper_ptq.executors.ray import placement  # noqa: E402 - needs Ray, which may be missing

PLUGINS = Path(__file__).parent / "plugins"
# Like the `quick` preset, smaller: two recipes that run everywhere, three utterances of each split.
EXPERIMENT = """
name = "tiny-ray"
models = ["tiny.en"]
recipes = [{recipes}]
datasets = [{datasets}]
limit = 3
threads = 1
"""
BOTH_SPLITS = '"librispeech:test-clean", "librispeech:test-other"'
ROW = "utterance_id, reference, hypothesis, ref_words, word_errors, ref_chars, char_errors, audio_seconds"


def experiment_file(tmp_path: Path, recipes: str, datasets: str = BOTH_SPLITS) -> Path:
    path = tmp_path / "exp.toml"
    path.write_text(EXPERIMENT.format(recipes=recipes, datasets=datasets))
    return path


def stored_rows(out: Path) -> dict[tuple[str, str], list[tuple]]:
    """(recipe, dataset) -> every stored row but its timing, read straight from the database."""
    db = sqlite3.connect(out / RESULTS_FILE)
    query = f"SELECT recipe, dataset, {ROW} FROM utterances JOIN tasks ON tasks.id = task_id ORDER BY 1, 2, 3"
    rows: dict[tuple[str, str], list[tuple]] = {}
    for recipe, dataset, *row in db.execute(query):
        rows.setdefault((recipe, dataset), []).append(tuple(row))
    db.close()
    return rows


def query(out: Path, sql: str) -> list[tuple]:
    db = sqlite3.connect(out / RESULTS_FILE)
    try:
        return db.execute(sql).fetchall()
    finally:
        db.close()


# ---------------------------------------------------------------------------------------------- no cluster


def test_shards_are_fixed_id_ranges_of_one_part():
    parts = (Part("a", ("1", "2", "3", "4", "5")), Part("b", ("6", "7")))
    job = Job(4, "tiny.en", get_recipe("fp32"), parts, Settings())
    shards = job.shards(2)
    assert [(s.parts[0].dataset, s.parts[0].todo) for s in shards] == [
        ("a", ("1", "2")),
        ("a", ("3", "4")),
        ("a", ("5",)),
        ("b", ("6", "7")),
    ]
    assert {(s.index, len(s.parts)) for s in shards} == {(4, 1)}, "events of a shard go to its job's tasks"


def test_tasks_declare_their_threads_and_gpu():
    cpu = Job(0, "tiny.en", get_recipe("fp32"), (), Settings())
    assert placement(cpu) == (cpu, {"num_cpus": 1, "num_gpus": 0})
    gpu, resources = placement(Job(0, "tiny.en", get_recipe("fp32"), (), Settings(device="cuda:1", threads=4)))
    assert resources == {"num_cpus": 4, "num_gpus": 1}
    assert gpu.settings.device == "cuda", "Ray shows a task only the GPU it assigned it"


def test_ray_address_needs_the_ray_executor(capsys):
    assert main(["bench", "quick", "--ray-address", "127.0.0.1:6379", "--no-progress"]) == 2
    assert "--ray-address needs --executor ray" in capsys.readouterr().err


def test_missing_ray_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    monkeypatch.delitem(sys.modules, "whisper_ptq.executors.ray")
    with pytest.raises(UserError, match=r"pip install whisper-ptq\[ray\]"):
        make_executor("ray", tmp_path)


# ---------------------------------------------------------------------------------------------- on a cluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> tuple[str, Path]:
    """A fresh Ray cluster on this machine ("local": never one that someone else started here), and the
    crash plugin's marker dir. Its raylet, and so every worker, inherits the environment set before it
    starts: the plugin folder on PYTHONPATH and the marker dir."""
    once_dir = tmp_path_factory.mktemp("crash-once")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("PYTHONPATH", os.pathsep.join([str(PLUGINS), os.environ.get("PYTHONPATH", "")]))
        env.setenv("CRASH_ONCE_DIR", str(once_dir))
        env.syspath_prepend(str(PLUGINS))
        import crash_backend  # noqa: F401 - registers the crash backend in this process, the driver

        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            yield ray.get_runtime_context().gcs_address, once_dir
        finally:
            ray.shutdown()


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, shared_data, model_cache) -> Path:
    """fp32 and bf16 on both splits with the local executor: the rows Ray must reproduce."""
    tmp = tmp_path_factory.mktemp("local")
    experiment = load_experiment(str(experiment_file(tmp, '"fp32", "reference:dtype=bf16"')))
    run_sweep(experiment, SweepOptions(tmp / "out", data_root=shared_data, cache_dir=model_cache, progress=False))
    return tmp / "out"


@pytest.mark.slow
def test_ray_rows_equal_the_local_executors(cluster, local_run, tmp_path, shared_data, model_cache):
    address, _ = cluster
    out = tmp_path / "out"
    # Another process, as from a shell: a second driver that joins the running cluster by its address.
    bench = [
        sys.executable,
        "-m",
        "whisper_ptq.cli",
        "bench",
        str(experiment_file(tmp_path, '"fp32", "reference:dtype=bf16"')),
    ]
    options = ["--out", str(out), "--data-root", str(shared_data), "--cache-dir", str(model_cache), "--no-progress"]
    done = subprocess.run(
        [*bench, *options, "--executor", "ray", "--ray-address", address], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]

    assert stored_rows(out) == stored_rows(local_run)
    assert query(out, "SELECT DISTINCT status FROM tasks") == [("done",)]
    # The environment is recorded as locally: the driver's (executor named), each task's worker's in its info.
    (driver,) = query(out, "SELECT info FROM environments")
    assert json.loads(driver[0])["executor"] == "ray"
    local_keys = {frozenset(json.loads(info)) for (info,) in query(local_run, "SELECT info FROM tasks")}
    ray_keys = {frozenset(json.loads(info)) for (info,) in query(out, "SELECT info FROM tasks")}
    assert ray_keys == local_keys and all("versions" in keys for keys in ray_keys)


@pytest.mark.slow
def test_a_killed_worker_is_retried_and_a_shard_that_keeps_dying_fails(
    cluster, local_run, tmp_path, shared_data, model_cache, monkeypatch
):
    _, once_dir = cluster
    # Set after the cluster started, so the workers see it only if the executor forwards WHISPER_PTQ_*.
    monkeypatch.setenv("WHISPER_PTQ_PLUGINS", "crash_backend")
    # Shards of 2 + 1 utterances, one retry each. Both recipes run the fp32 model and die in their first
    # shard after its first batch: the first by SIGKILL and only once, the second by abort every time.
    recipes = '"crash:after=2,once=true", "crash:after=2"'
    experiment = load_experiment(str(experiment_file(tmp_path, recipes, '"librispeech:test-clean"')))
    out = tmp_path / "out"
    options = SweepOptions(
        out,
        data_root=shared_data,
        cache_dir=model_cache,
        executor="ray",
        progress=False,
        executor_options={"shard_size": 2, "max_retries": 1},
    )
    killed, crashed = run_sweep(experiment, options).results  # the sweep completes
    fp32 = stored_rows(local_run)["fp32", "librispeech:test-clean"]
    stored = stored_rows(out)

    assert (once_dir / "killed").read_text().isdigit(), "a worker was killed mid-shard"
    assert killed["status"] == "done" and killed["error"] is None
    assert stored[killed["recipe"], "librispeech:test-clean"] == fp32, "complete, each row once"

    assert crashed["status"] == "failed"
    assert "WorkerCrashedError" in crashed["error"] and "(max_retries=1)" in crashed["error"]
    assert "\n" not in crashed["error"]
    assert stored[crashed["recipe"], "librispeech:test-clean"] == fp32[2:], "its other shard's rows are kept"
    assert query(out, "SELECT count(*), count(DISTINCT task_id || ' ' || utterance_id) FROM utterances") == [(4, 4)]
