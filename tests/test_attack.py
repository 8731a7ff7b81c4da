"""The store and the inputs under attack (issue 15): nothing lost, nothing stale, nothing let in.

Real files, real SQLite, real processes. Most sweeps here run `fp16`, which cannot run on CPU: every task is
skipped, so they start no worker and take a second; the few that transcribe are marked slow. The tests that
need a full or read-only filesystem mount a small tmpfs (root only) and are skipped elsewhere.
"""

from __future__ import annotations

import json
import os
import shutil
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
from whisper_ptq.executors.local import worker_environment
from whisper_ptq.export import FORMAT
from whisper_ptq.recipes import Recipe
from whisper_ptq.results.outputs import SUMMARY_FILE, UTTERANCES_FILE, write_outputs
from whisper_ptq.results.rows import UtteranceResult, summarize
from whisper_ptq.results.store import RESULTS_FILE, SCHEMA_VERSION, Store
from whisper_ptq.studies.bench import SweepOptions, run_sweep
from whisper_ptq.studies.experiment import UNMEASURED, load_experiment

# As the installed `whisper-ptq` script runs it: without the working directory on sys.path.
CLI = [sys.executable, "-P", "-m", "whisper_ptq.cli"]
EXPERIMENT = """
name = "attack"
models = [{models}]
recipes = [{recipes}]
datasets = [{datasets}]
limit = {limit}
threads = 1
"""
FP32 = Recipe(name="fp32", library="reference", scheme="reference", weights="fp32", granularity="per-tensor")
# The schema of results databases written by whisper-ptq before version 2, as it was.
SCHEMA_V1 = """
CREATE TABLE experiment (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    name TEXT NOT NULL,
    config TEXT NOT NULL,
    config_hash TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE TABLE environments (
    id INTEGER PRIMARY KEY,
    recorded_at TEXT NOT NULL,
    info TEXT NOT NULL
);
CREATE TABLE tasks (
    id INTEGER PRIMARY KEY,
    position INTEGER NOT NULL,
    model TEXT NOT NULL,
    recipe TEXT NOT NULL,
    recipe_spec TEXT NOT NULL,
    dataset TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'running', 'done', 'failed', 'skipped')),
    error TEXT,
    info TEXT NOT NULL DEFAULT '{}',
    environment_id INTEGER REFERENCES environments (id),
    started_at TEXT,
    finished_at TEXT,
    UNIQUE (model, recipe, dataset)
);
CREATE TABLE utterances (
    task_id INTEGER NOT NULL REFERENCES tasks (id),
    utterance_id TEXT NOT NULL,
    reference TEXT NOT NULL,
    hypothesis TEXT NOT NULL,
    ref_words INTEGER NOT NULL,
    word_errors INTEGER NOT NULL,
    ref_chars INTEGER NOT NULL,
    char_errors INTEGER NOT NULL,
    audio_seconds REAL NOT NULL,
    seconds REAL NOT NULL,
    environment_id INTEGER REFERENCES environments (id),
    UNIQUE (task_id, utterance_id)
);
PRAGMA user_version = 1;
"""


def experiment(
    tmp: Path,
    recipes: str = '"fp16"',
    datasets: str = '"librispeech:test-clean"',
    models: str = '"tiny.en"',
    limit: int = 3,
    extra: str = "",
) -> Path:
    path = tmp / "exp.toml"
    path.write_text(EXPERIMENT.format(models=models, recipes=recipes, datasets=datasets, limit=limit) + extra)
    return path


def run(capsys, *args: str) -> tuple[int, str]:
    """The command line in this process: exit code and stderr."""
    code = main([*args, "--no-progress"] if args[0] in ("bench", "eval") else list(args))
    return code, capsys.readouterr().err


def one_line_error(err: str) -> str:
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def clean_recordings(shared_data: Path) -> list[Path]:
    """The first three test-clean recordings and their transcripts."""
    chapter = shared_data / "librispeech" / "test-clean" / "1089" / "134686"
    return sorted(chapter.glob("*.flac"))[:3]


def manifest(path: Path, entries: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(e) + "\n" for e in entries))
    return path


def scored(utt_id: str, reference: str, hypothesis: str, source: str = "") -> UtteranceResult:
    return UtteranceResult.scored(utt_id, reference, hypothesis, 2.0, 0.5, source)


# ------------------------------------------------------------------------------------------ tmpfs mounts


class SmallFilesystem:
    """A tmpfs of its own, to fill up or make read-only."""

    def __init__(self, path: Path):
        self.path = path

    def remount(self, options: str) -> None:
        subprocess.run(["mount", "-o", f"remount,{options}", str(self.path)], check=True)


@pytest.fixture
def small_fs(tmp_path: Path):
    path = tmp_path / "fs"
    path.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(path)]).returncode:
        pytest.skip("needs root and mount(8) for a filesystem to fill or make read-only")
    yield SmallFilesystem(path)
    subprocess.run(["umount", "-l", str(path)], check=True)


# ---------------------------------------------------------------------------- 1. stale rows, run identity


@pytest.mark.slow
def test_an_edited_reference_and_swapped_audio_are_computed_again(tmp_path, shared_data, model_cache, capsys):
    first, second, _ = clean_recordings(shared_data)
    texts = dict(line.split(" ", 1) for line in (first.parent / "1089-134686.trans.txt").read_text().splitlines())
    path = manifest(
        tmp_path / "m.jsonl",
        [{"id": "a", "audio": str(first), "text": texts[first.stem]}, {"id": "b", "audio": str(second), "text": "x"}],
    )
    exp = load_experiment(str(experiment(tmp_path, '"fp32"', f'"manifest:{path}"')))
    options = SweepOptions(tmp_path / "out", data_root=shared_data, cache_dir=model_cache, progress=False)
    before = {r["id"]: r for r in run_sweep(exp, options).results[0]["utterances"]}
    capsys.readouterr()

    # The same ids: a's reference edited, b's audio now a's recording.
    manifest(path, [{"id": "a", "audio": str(first), "text": "edited"}, {"id": "b", "audio": str(first), "text": "x"}])
    [result] = run_sweep(exp, options).results
    err = capsys.readouterr().err
    assert "2 stored rows were computed from other audio or text than the dataset holds now (a, b)" in err
    after = {r["id"]: r for r in result["utterances"]}
    assert after["a"]["reference"] == "edited" and after["a"]["hypothesis"] == before["a"]["hypothesis"]
    assert after["b"]["hypothesis"] == before["a"]["hypothesis"] != before["b"]["hypothesis"]
    assert result["summary"]["n_utterances"] == 2 and result["status"] == "done"


def _data_root_copy(shared_data: Path, tmp: Path) -> Path:
    """Another data root holding the same split name with other recordings (test-clean's last three)."""
    source = shared_data / "librispeech" / "test-clean"
    flacs = sorted(source.glob("*/*/*.flac"))[-3:]
    chapter = tmp / "other-root" / "librispeech" / "test-clean" / "x" / "y"
    chapter.mkdir(parents=True)
    lines = {}
    for trans in source.glob("*/*/*.trans.txt"):
        lines.update(dict(line.split(" ", 1) for line in trans.read_text().splitlines()))
    for i, flac in enumerate(flacs):
        shutil.copyfile(flac, chapter / f"x-y-{i:04d}.flac")
    (chapter / "x-y.trans.txt").write_text("".join(f"x-y-{i:04d} {lines[f.stem]}\n" for i, f in enumerate(flacs)))
    return tmp / "other-root"


def test_the_same_experiment_on_another_data_root_is_refused(tmp_path, shared_data, capsys):
    out, exp = tmp_path / "out", experiment(tmp_path)
    assert run(capsys, "bench", str(exp), "--out", str(out), "--data-root", str(shared_data))[0] == 0
    other = _data_root_copy(shared_data, tmp_path)
    code, err = run(capsys, "bench", str(exp), "--out", str(out), "--data-root", str(other))
    assert code == 2
    before, now = (root.resolve() / "librispeech" / "test-clean" for root in (shared_data, other))
    assert f'computed with other data: "{before}" then, "{now}" now; to discard them' in one_line_error(err)
    with sqlite3.connect(out / RESULTS_FILE) as db:
        assert db.execute("SELECT count(*) FROM tasks").fetchone() == (1,)


def test_a_relative_manifest_read_from_another_folder_is_refused(tmp_path, shared_data, capsys, monkeypatch):
    first, second, _ = clean_recordings(shared_data)
    for folder, audio in (("one", first), ("two", second)):
        manifest(tmp_path / folder / "m.jsonl", [{"id": "u", "audio": str(audio), "text": "words"}])
    out, exp = tmp_path / "out", experiment(tmp_path, datasets='"manifest:m.jsonl"')
    monkeypatch.chdir(tmp_path / "one")
    assert run(capsys, "bench", str(exp), "--out", str(out))[0] == 0
    monkeypatch.chdir(tmp_path / "two")
    code, err = run(capsys, "bench", str(exp), "--out", str(out))
    one, two = (tmp_path / folder for folder in ("one", "two"))
    assert code == 2 and f'"{one.resolve()}" then, "{two.resolve()}" now' in one_line_error(err)


def test_a_model_changed_under_the_same_path_is_refused(tmp_path, shared_data, model_cache, capsys):
    from whisper_ptq.models.ct2_format import converted_dir
    from whisper_ptq.models.sources import resolve_model

    converted = converted_dir(resolve_model("tiny.en", model_cache).path, model_cache)
    model = tmp_path / "tiny"
    model.mkdir()
    for file in converted.iterdir():  # the weights linked, the small files copied so that one can change
        if file.suffix == ".safetensors":
            (model / file.name).symlink_to(file)
        else:
            shutil.copyfile(file, model / file.name)
    out, exp = tmp_path / "out", experiment(tmp_path, models=f'"{model}"')
    assert run(capsys, "bench", str(exp), "--out", str(out), "--data-root", str(shared_data))[0] == 0
    config = json.loads((model / "generation_config.json").read_text())
    (model / "generation_config.json").write_text(json.dumps({**config, "max_length": 100}))
    code, err = run(capsys, "bench", str(exp), "--out", str(out), "--data-root", str(shared_data))
    assert code == 2 and f"holds results of {model} fp16 on librispeech:test-clean computed with other model" in err
    one_line_error(err)


@pytest.mark.parametrize("key", ["code", "versions"])
def test_rows_computed_by_other_code_or_libraries_are_refused(key, tmp_path, shared_data, capsys):
    """A database from before a fix (ort-int8-static once quantized its logits too: WER 130%) or an upgrade holds
    other transcripts: resuming into it is refused, --force computes them again."""
    from importlib import metadata

    out, exp = tmp_path / "out", experiment(tmp_path, '"fp32"')
    command = ("bench", str(exp), "--out", str(out), "--data-root", str(shared_data))
    assert run(capsys, *command)[0] == 0
    with sqlite3.connect(out / RESULTS_FILE) as db:
        [(identity,)] = db.execute("SELECT identity FROM tasks").fetchall()
        stored = json.loads(identity)
        assert len(stored["code"]) == 64 and stored["versions"]["torch"] == metadata.version("torch")
        stored[key] = "0" * 64 if key == "code" else {**stored["versions"], "torch": "2.0.0"}
        db.execute("UPDATE tasks SET identity = ?", (json.dumps(stored),))
    code, err = run(capsys, *command)
    expected = {
        "code": "computed by other whisper-ptq code (a fix or an upgrade since",
        "versions": f"computed with other libraries (torch 2.0.0 then, {metadata.version('torch')} now)",
    }[key]
    assert code == 2 and expected in one_line_error(err)
    assert run(capsys, *command, "--force")[0] == 0
    with sqlite3.connect(out / RESULTS_FILE) as db:
        assert db.execute("SELECT count(*) FROM utterances").fetchone() == (3,)


def test_a_row_a_worker_computed_from_other_data_is_not_stored(tmp_path, shared_data, model_cache):
    """What a Ray node with another copy of the data, or a file edited mid-run, sends back."""
    from whisper_ptq.executors.jobs import Job, Part, Rows
    from whisper_ptq.studies.bench import _Recorder, plan

    exp = load_experiment(str(experiment(tmp_path, '"fp32"', limit=2)))
    settings = exp.settings(shared_data, model_cache)
    [task] = plan(exp, settings)
    good, bad = (scored(i, task.expected[i][1], "words", task.expected[i][0]) for i in task.ids)
    bad = UtteranceResult(**{**bad.to_dict(), "source": "another copy"})
    with Store.for_experiment(tmp_path / RESULTS_FILE, exp.name, exp.config()) as store:
        task_ids = {task: store.ensure_task(0, task.model, task.recipe, task.dataset, task.identity)}
        job = Job(0, task.model, task.recipe, (Part(task.dataset, task.ids),), settings)
        recorder = _Recorder(store, store.record_environment({}), [job], [task], task_ids, progress=False)
        recorder(Rows(0, task.dataset, (good, bad)))
        assert store.done_ids(task_ids[task]) == {good.id}
        [result] = store.results()
    assert result["status"] == "failed"
    assert result["error"] == (
        f"utterance {bad.id} was read from other audio or text by the worker than by the driver (changed during "
        "the run, or another copy of the data); not stored"
    )


def test_stale_rows_are_dropped_and_old_rows_judged_by_their_reference(tmp_path):
    with Store.create(tmp_path / RESULTS_FILE, "t", {}) as store:
        task = store.ensure_task(0, "tiny.en", FP32, "d")
        store.add_rows(task, [scored("kept", "a b", "a b", "s1"), scored("edited", "a b", "a", "s2")])
        store.add_rows(task, [scored("gone", "a b", "a b", "s3"), scored("legacy", "old text", "old text")])
        expected = {"kept": ("s1", "a b"), "edited": ("s2-now", "a b"), "legacy": ("s4", "new text")}
        assert sorted(store.drop_stale(task, expected)) == ["edited", "gone", "legacy"]
        assert store.done_ids(task) == {"kept"}
        store.add_rows(task, [scored("legacy", "same text", "x")])
        assert store.drop_stale(task, {"kept": ("s1", "a b"), "legacy": ("s5", "same text")}) == []


# ----------------------------------------------------------------------------------- 2. the output dir lock


def test_a_second_writer_is_refused_with_the_holders_pid_until_it_dies(tmp_path, shared_data, capsys):
    out, exp = tmp_path / "out", experiment(tmp_path)
    hold = (
        "import sys, time; from pathlib import Path; from whisper_ptq.results.store import Store; "
        "from whisper_ptq.studies.experiment import UNMEASURED, load_experiment; e = load_experiment(sys.argv[1]); "
        "Path(sys.argv[2]).mkdir(); store = Store.for_experiment(Path(sys.argv[2]) / 'results.sqlite', e.name, "
        "e.config(), unmeasured=UNMEASURED); print('locked', flush=True); time.sleep(600)"
    )
    holder = subprocess.Popen([sys.executable, "-c", hold, str(exp), str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        code, err = run(capsys, "bench", str(exp), "--out", str(out), "--data-root", str(shared_data))
        assert code == 2
        assert one_line_error(err) == (
            f"error: {out} is in use by another whisper-ptq run (PID {holder.pid}); wait for it to end, or choose "
            "another --out\n"
        )
    finally:
        holder.send_signal(signal.SIGKILL)  # no chance to release anything: the system does
        holder.wait()
    code, err = run(capsys, "bench", str(exp), "--out", str(out), "--data-root", str(shared_data))
    assert code == 0, err


# ------------------------------------------------------------------------ 3. report writes nothing it refuses


def _foreign_sqlite(path: Path) -> None:
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE notes (text TEXT)")
    db.execute("INSERT INTO notes VALUES ('not ours')")
    db.commit()
    db.close()


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p.write_bytes(b""), r"is empty \(0 bytes\), not a whisper-ptq results database"),
        (_foreign_sqlite, r"is not a whisper-ptq results database \(schema version 0\)"),
        (lambda p: p.write_bytes(b"SQLite format 3\x00" + bytes(range(256)) * 16), r"is corrupt"),
    ],
    ids=["empty", "foreign", "garbage"],
)
def test_a_refused_file_is_left_byte_for_byte(tmp_path, shared_data, capsys, make, message):
    import re

    out = tmp_path / "out"
    out.mkdir()
    make(out / RESULTS_FILE)
    before = (out / RESULTS_FILE).read_bytes()
    for command in (["report", str(out)], ["bench", str(experiment(tmp_path)), "--out", str(out)]):
        code, err = run(capsys, *command, *(["--data-root", str(shared_data)] if command[0] == "bench" else []))
        assert code == 2 and re.search(message, one_line_error(err)), err
        assert (out / RESULTS_FILE).read_bytes() == before
        assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [RESULTS_FILE]


# ----------------------------------------------------------------------------------- 4. one source of truth


def _report_database(folder: Path) -> Path:
    """A small results database, as a bench writes it: fp32 with two scored rows."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {"name": "t", "recipes": ["fp32"], "datasets": ["librispeech:test-clean"]}
    with Store.create(folder / RESULTS_FILE, "t", config) as store:
        task = store.ensure_task(0, "tiny.en", FP32, "librispeech:test-clean")
        store.add_rows(task, [scored("u1", "the cat sat", "the cat sat down here"), scored("u2", "a dog", "a dog")])
        store.set_status(task, "done")
    return folder / RESULTS_FILE


def test_a_row_altered_on_disk_is_reported_corrupt_by_its_id(tmp_path, capsys):
    path = _report_database(tmp_path / "out")
    data = path.read_bytes()
    assert data.count(b"the cat sat down here") == 1
    path.write_bytes(data.replace(b"the cat sat down here", b"the cat sat nowhere!!"))  # same length
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)  # SQLite sees nothing wrong
    code, err = run(capsys, "report", str(tmp_path / "out"))
    assert code == 2
    assert "is corrupt: the stored row of utterance 'u1' (tiny.en fp32 on librispeech:test-clean) no longer " in err
    one_line_error(err)
    assert not (tmp_path / "out" / "report.md").exists()


def test_wer_and_its_interval_come_from_the_same_counts(tmp_path, capsys):
    path = _report_database(tmp_path / "out")
    with Store.open(path, writable=False) as store:
        [result] = store.results()
    rows = [UtteranceResult(**u) for u in result["utterances"]]
    errors, words = sum(r.word_errors for r in rows), sum(r.ref_words for r in rows)
    assert result["summary"]["wer"] == pytest.approx(100 * errors / words) == summarize(rows)["wer"]
    assert run(capsys, "report", str(tmp_path / "out"))[0] == 0


# --------------------------------------------------------------------------- 5. empty references, strict JSON


def test_an_empty_reference_is_refused_with_its_file_and_line(tmp_path, shared_data, capsys):
    first, second, _ = clean_recordings(shared_data)
    path = manifest(
        tmp_path / "m.jsonl",
        [{"id": "a", "audio": str(first), "text": "words"}, {"id": "b", "audio": str(second), "text": "  "}],
    )
    expected = f'error: {path}:2: utterance b has no transcript text ("text" is empty)\n'
    code, err = run(capsys, "eval", "--model", "tiny.en", "--dataset", f"manifest:{path}", "--out", str(tmp_path / "e"))
    assert (code, err) == (2, expected)
    code, err = run(capsys, "bench", str(experiment(tmp_path, datasets=f'"manifest:{path}"')), "--out", str(tmp_path))
    assert code == 2 and err == expected.replace("error: ", f"error: {tmp_path / 'exp.toml'}: ")


def test_outputs_are_strict_json(tmp_path):
    """A rate over nothing is null, not NaN (which no JSON parser but Python's accepts)."""
    row = scored("u", "uh", "")  # the normalizer drops the filler: no reference word
    write_outputs(tmp_path, {**summarize([row]), "nested": [{"x": float("inf")}]}, [row])

    def refuse(constant: str) -> None:
        raise ValueError(f"not JSON: {constant}")

    summary = json.loads((tmp_path / SUMMARY_FILE).read_text(), parse_constant=refuse)
    assert summary["wer"] is None and summary["nested"] == [{"x": None}] and summary["n_utterances"] == 1
    assert json.loads((tmp_path / UTTERANCES_FILE).read_text(), parse_constant=refuse)["id"] == "u"


# ---------------------------------------------------------------------------------- 6. recipe files checked


HQQ_INT7 = {
    "name": "mine",
    "library": "hqq",
    "scheme": "weight-only",
    "weights": "int7",
    "granularity": "per-group",
    "group_size": 64,
    "symmetric": False,
    "keep": ["proj_out"],
    "devices": ["cpu", "cuda"],
    "options": {"axis": 1, "compute_dtype": "fp32", "kernel": "PYTORCH"},
}
MIXED = {
    "name": "mix",
    "library": "mixed",
    "scheme": "weight-only",
    "weights": "mixed",
    "granularity": "mixed",
    "options": {"plan": json.dumps([{"group": "enc", "modules": ["encoder"], "recipe": {**HQQ_INT7, "library": "x"}}])},
}


@pytest.mark.parametrize(
    "recipe, message",
    [
        ({**HQQ_INT7, "library": "hqq4"}, "unknown library 'hqq4'; choose from reference, torch"),
        (HQQ_INT7, 'weights "int7" is not valid for hqq; valid: "int2", "int3", "int4", "int8"'),
        ({**HQQ_INT7, "weights": "int4", "group_size": 100}, "group_size 100 is not valid for hqq; valid: 32, 64, 128"),
        ({**HQQ_INT7, "weights": "int4", "modules": ["("]}, "modules entry '(' is not a regular expression"),
        (MIXED, "recipe.json: plan entry 'enc': unknown library 'x'; choose from"),
    ],
    ids=["library", "int7", "group-size", "modules", "mixed-entry"],
)
def test_a_recipe_file_goes_through_its_backends_check(tmp_path, shared_data, capsys, recipe, message):
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(recipe))
    args = ["--model", "tiny.en", "--recipe", str(path), "--dataset", "librispeech:test-clean", "--limit", "1"]
    code, err = run(capsys, "eval", *args, "--data-root", str(shared_data), "--out", str(tmp_path / "e"))
    assert code == 2 and message in one_line_error(err), err
    assert not (tmp_path / "e").exists()


def test_a_valid_recipe_file_is_accepted(tmp_path):
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps({**HQQ_INT7, "weights": "int3", "modules": ["encoder"]}))
    recipe = get_recipe(str(path))
    assert recipe == Recipe.from_dict({**HQQ_INT7, "weights": "int3", "modules": ["encoder"]})


def test_an_exports_recipe_is_checked_too(tmp_path, shared_data, capsys):
    export = tmp_path / "export"
    export.mkdir()
    (export / "whisper_ptq_export.json").write_text(
        json.dumps({"format": FORMAT, "recipe": HQQ_INT7, "source_model": "tiny.en"})
    )
    code, err = run(capsys, "eval", "--model", str(export), "--dataset", "librispeech:test-clean")
    assert code == 2 and 'export.json: weights "int7" is not valid for hqq' in one_line_error(err)


# ------------------------------------------------------------------------------------------ 7. write failures


def test_a_read_only_output_dir_is_one_line_and_resumes_afterwards(small_fs, shared_data, capsys):
    out, exp = small_fs.path / "out", experiment(small_fs.path)
    assert run(capsys, "bench", str(exp), "--out", str(out), "--data-root", str(shared_data))[0] == 0
    before = (out / RESULTS_FILE).read_bytes()
    small_fs.remount("ro")
    for command in (
        ["bench", str(exp), "--out", str(out)],
        ["bench", "--resume", "--out", str(out)],
    ):
        code, err = run(capsys, *command, "--data-root", str(shared_data))
        assert (code, err) == (2, f"error: cannot write to {out}: Read-only file system\n")
    code, err = run(capsys, "report", str(out))
    assert code == 2 and err.startswith(f"error: cannot write {out}/") and err.endswith(": Read-only file system\n")
    small_fs.remount("rw")
    assert (out / RESULTS_FILE).read_bytes() == before
    assert run(capsys, "bench", "--resume", "--out", str(out), "--data-root", str(shared_data))[0] == 0


def test_a_full_disk_loses_no_stored_row_and_resumes_once_freed(small_fs):
    small_fs.remount("size=160k")
    path = small_fs.path / RESULTS_FILE
    batches = [[scored(f"u{b}-{i}", "word " * 50, "word " * 49 + f"batch {b}") for i in range(8)] for b in range(200)]
    with Store.create(path, "t", {}) as store:
        task = store.ensure_task(0, "tiny.en", FP32, "d")
        with pytest.raises(UserError) as refused:
            for stored, batch in enumerate(batches):  # noqa: B007 - after the loop: the batches that fit
                store.add_rows(task, batch)
        message = str(refused.value)
        assert message.startswith(f"cannot write {path}: database or disk is full; what it holds is intact")
        assert "\n" not in message and 0 < stored < len(batches)
    with Store.open(path) as store:  # the batches before the failure, whole
        assert store.done_ids(task) == {r.id for batch in batches[:stored] for r in batch}
    small_fs.remount("size=8m")
    with Store.open(path) as store:
        for batch in batches[stored:]:
            store.add_rows(task, batch)
        assert len(store.rows(task)) == 8 * len(batches)


# ---------------------------------------------------------------------- 8., 9. models and code that run


def _malicious_model(folder: Path, marker: Path) -> Path:
    """A transformers Whisper folder whose pytorch_model.bin unpickles to a shell command."""
    import torch
    from transformers import WhisperConfig

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    tiny = {"d_model": 64, "encoder_layers": 1, "decoder_layers": 1}
    WhisperConfig(**tiny, encoder_attention_heads=4, decoder_attention_heads=4).save_pretrained(folder)
    torch.save({"model.encoder.conv1.weight": Payload()}, folder / "pytorch_model.bin")
    return folder


def test_an_unloadable_model_is_one_line_and_runs_nothing(tmp_path, shared_data, capsys):
    marker = tmp_path / "ran"
    model = _malicious_model(tmp_path / "evil", marker)
    code, err = run(
        capsys, "eval", "--model", str(model), "--dataset", "librispeech:test-clean", "--limit", "1",
        "--data-root", str(shared_data), "--out", str(tmp_path / "e"),
    )  # fmt: skip
    assert code == 2
    assert one_line_error(err) == (
        f"error: cannot load Whisper model from {model}: its pickled weights hold more than tensors, refused unrun "
        "(Trying to load unsupported GLOBAL posix.system whose module posix is blocked); use safetensors weights "
        "from a source you trust\n"
    )
    assert not marker.exists()


@pytest.mark.slow
def test_workers_import_nothing_from_the_working_directory(tmp_path, shared_data, model_cache):
    marker = tmp_path / "imported"
    work = tmp_path / "work"
    work.mkdir()
    (work / "tqdm.py").write_text(f"open({str(marker)!r}, 'w').close()\nraise SystemExit('planted tqdm ran')\n")
    model = _malicious_model(tmp_path / "evil", tmp_path / "ran")
    exp = experiment(tmp_path, '"fp32"', models=f'"{model}"', limit=1)
    # Without an empty PYTHONPATH entry, which would put the working directory on the driver's own path.
    env = {**worker_environment(), "WHISPER_PTQ_DATA": str(shared_data), "WHISPER_PTQ_CACHE": str(model_cache)}
    bench = subprocess.run(
        [*CLI, "bench", str(exp), "--out", str(tmp_path / "out"), "--no-progress"],
        cwd=work, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert not marker.exists() and not (tmp_path / "ran").exists(), bench.stderr
    assert bench.returncode == 1  # the worker started, imported the real tqdm, and refused the model
    with Store.open(tmp_path / "out" / RESULTS_FILE, writable=False) as store:
        [result] = store.results()
    assert result["status"] == "failed" and "refused unrun" in result["error"]


def test_an_empty_pythonpath_entry_is_not_passed_to_workers(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(["/plugins", "", "/src", ""]))
    assert worker_environment()["PYTHONPATH"] == os.pathsep.join(["/plugins", "/src"])
    monkeypatch.setenv("PYTHONPATH", os.pathsep)
    assert "PYTHONPATH" not in worker_environment()


# ------------------------------------------------------------------------------------------- 10. messages


def test_resuming_a_changed_experiment_says_what_works(tmp_path, shared_data, capsys):
    out, exp = tmp_path / "out", experiment(tmp_path)
    data = ["--data-root", str(shared_data)]
    assert run(capsys, "bench", str(exp), "--out", str(out), *data)[0] == 0
    exp = experiment(tmp_path, limit=2)
    code, err = run(capsys, "bench", str(exp), "--out", str(out), "--resume", *data)
    assert code == 2
    assert one_line_error(err) == (
        f"error: {out} holds results of a different experiment ('attack': limit 3 then, 2 now); to discard them "
        "and start afresh, run the same command with --force (and without --resume), or choose another --out\n"
    )
    assert run(capsys, "bench", str(exp), "--out", str(out), "--force", *data)[0] == 0


def test_an_empty_manifest_says_it_is_empty(tmp_path, capsys):
    path = tmp_path / "m.jsonl"
    path.write_text("\n  \n")
    code, err = run(capsys, "eval", "--model", "tiny.en", "--dataset", f"manifest:{path}")
    assert (code, err) == (2, f"error: manifest {path} is empty: it lists no utterances\n")


# ---------------------------------------------------------------------------------------- schema version 1


def _v1_database(path: Path, config: dict, rows: list[UtteranceResult], recipe: Recipe = FP32) -> None:
    """A results database as whisper-ptq wrote it before schema version 2."""
    from whisper_ptq.results.store import config_hash

    db = sqlite3.connect(path)
    db.executescript(SCHEMA_V1)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute(
        "INSERT INTO experiment VALUES (1, ?, ?, ?, '2025-01-01T00:00:00+00:00')",
        (config["name"], json.dumps(config, sort_keys=True), config_hash(config)),
    )
    db.execute(
        "INSERT INTO tasks (position, model, recipe, recipe_spec, dataset, status) VALUES (0, 'tiny.en', ?, ?, "
        "'librispeech:test-clean', 'running')",
        (recipe.name, json.dumps(recipe.to_dict())),
    )
    db.executemany(
        "INSERT INTO utterances VALUES (1, ?, ?, ?, ?, ?, ?, ?, ?, ?, NULL)",
        [(r.id, r.reference, r.hypothesis, r.ref_words, r.word_errors, r.ref_chars, r.char_errors,
          r.audio_seconds, r.seconds) for r in rows],
    )  # fmt: skip
    db.commit()
    db.close()


def test_a_version_1_database_is_read_unchanged_and_its_rows_checked(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    config = {"name": "old", "recipes": ["fp32"], "datasets": ["librispeech:test-clean"]}
    rows = [scored("u1", "the cat sat", "the cat"), scored("u2", "a dog", "a dog")]
    _v1_database(out / RESULTS_FILE, config, rows)
    before = (out / RESULTS_FILE).read_bytes()
    assert run(capsys, "report", str(out))[0] == 0
    assert (out / RESULTS_FILE).read_bytes() == before  # migrated in memory only: `report` writes no database
    assert "| fp32 | 20.00 [" in (out / "report.md").read_text()  # 1 error in 5 words, from the stored counts

    (out / RESULTS_FILE).unlink()
    altered = [rows[0], UtteranceResult(**{**rows[1].to_dict(), "word_errors": 1})]
    _v1_database(out / RESULTS_FILE, config, altered)
    code, err = run(capsys, "report", str(out))
    assert code == 2 and "utterance 'u2' (tiny.en fp32 on librispeech:test-clean) no longer matches the error " in err


@pytest.mark.slow
def test_a_version_1_database_resumes(tmp_path, shared_data, model_cache, capsys):
    """Migrated in place: its rows are kept if their reference still holds, the rest computed, and nothing twice."""
    exp = experiment(tmp_path, '"fp32"', limit=2)
    # as a version-1 whisper-ptq wrote it: without the report and timing keys added since
    config = {k: v for k, v in load_experiment(str(exp)).config().items() if k not in UNMEASURED}
    first, second = (u for u in sorted(p.stem for p in clean_recordings(shared_data))[:2])
    texts = dict(
        line.split(" ", 1)
        for line in (shared_data / "librispeech/test-clean/1089/134686/1089-134686.trans.txt").read_text().splitlines()
    )
    legacy = [scored(first, texts[first], "a hypothesis from the old version"), scored(second, "old text", "old")]
    out = tmp_path / "out"
    out.mkdir()
    _v1_database(out / RESULTS_FILE, config, legacy, get_recipe("fp32"))
    code = main(["bench", "--resume", "--out", str(out), "--data-root", str(shared_data), "--cache-dir",
                 str(model_cache), "--no-progress"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 0, err
    assert f"1 stored rows were computed from other audio or text than the dataset holds now ({second})" in err
    with sqlite3.connect(out / RESULTS_FILE) as db:
        assert db.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
        rows = db.execute("SELECT utterance_id, reference, hypothesis, source FROM utterances ORDER BY 1").fetchall()
        assert db.execute("SELECT status FROM tasks").fetchall() == [("done",)]
    assert rows[0] == (first, texts[first], "a hypothesis from the old version", "")
    assert rows[1][:2] == (second, texts[second]) and rows[1][2] != "old" and rows[1][3]
    assert run(capsys, "report", str(out))[0] == 0


# ------------------------------------------------------------------------------------ the lock, end to end


@pytest.mark.slow
def test_a_bench_killed_while_a_second_is_refused_then_the_second_proceeds(tmp_path, shared_data, model_cache):
    exp = experiment(tmp_path, '"fp32", "reference:dtype=bf16"')
    out = tmp_path / "out"
    env = {**os.environ, "WHISPER_PTQ_DATA": str(shared_data), "WHISPER_PTQ_CACHE": str(model_cache)}
    command = [*CLI, "bench", str(exp), "--out", str(out), "--no-progress"]
    first = subprocess.Popen(command, env=env, start_new_session=True, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not _has_rows(out / RESULTS_FILE):
            assert first.poll() is None and time.monotonic() < deadline, "the first bench stored nothing"
            time.sleep(0.05)
        second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        assert second.returncode == 2
        assert f"is in use by another whisper-ptq run (PID {first.pid})" in second.stderr
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # driver and worker at once
        first.wait()
    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr
    with sqlite3.connect(out / RESULTS_FILE) as db:
        counts = db.execute("SELECT count(*), count(DISTINCT task_id || ' ' || utterance_id) FROM utterances")
        assert counts.fetchone() == (6, 6)
        assert {s for (s,) in db.execute("SELECT status FROM tasks")} == {"done"}


def _has_rows(path: Path) -> bool:
    if not path.exists():
        return False
    try:
        with sqlite3.connect(path) as db:
            return db.execute("SELECT count(*) FROM utterances").fetchone()[0] > 0
    except sqlite3.Error:
        return False
