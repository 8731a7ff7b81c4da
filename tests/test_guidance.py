"""A user's own experiment end to end (the issue's: tiny.en; fp32, quanto-int8, ct2-int8; a 10-clip LJ Speech
manifest and test-clean; 5 utterances each), the experiment keys the report reads, and timing passes added to
a finished sweep."""

from __future__ import annotations

import json
import re
import sqlite3
from pathlib import Path

import pytest

from whisper_ptq.cli import main
from whisper_ptq.errors import UserError
from whisper_ptq.results.store import RESULTS_FILE, Store
from whisper_ptq.studies.experiment import UNMEASURED, Experiment, load_experiment, parse_experiment

USER_EXPERIMENT = """
name = "mine"
models = ["tiny.en"]
recipes = ["fp32", "quanto-int8", "ct2-int8"]
datasets = [{{spec = "manifest:{manifest}", label = "lj"}}, "librispeech:test-clean"]
limit = 5
threads = 2
"""


def lj_manifest(shared_data: Path, path: Path, clips: int = 10) -> Path:
    """The first LJ Speech clips as a user's own JSON-lines manifest (absolute audio paths)."""
    lines = (shared_data / "ljspeech" / "metadata.csv").read_text(encoding="utf-8").splitlines()[:clips]
    entries = [line.split("|") for line in lines]
    wavs = shared_data / "ljspeech" / "wavs"
    path.write_text("".join(json.dumps({"audio": str(wavs / f"{e[0]}.wav"), "text": e[1]}) + "\n" for e in entries))
    return path


@pytest.fixture(scope="module")
def user_study(tmp_path_factory: pytest.TempPathFactory, shared_data: Path, model_cache: Path) -> Path:
    root = tmp_path_factory.mktemp("user-study")
    manifest = lj_manifest(shared_data, root / "lj10.jsonl")
    experiment = root / "mine.toml"
    experiment.write_text(USER_EXPERIMENT.format(manifest=manifest))
    out = root / "out"
    assert main(bench_args(experiment, out, shared_data, model_cache)) == 0
    return out


def bench_args(experiment: Path, out: Path, shared_data: Path, model_cache: Path) -> list[str]:
    paths = ["--out", str(out), "--data-root", str(shared_data), "--cache-dir", str(model_cache)]
    return ["bench", str(experiment), *paths, "--no-progress"]


@pytest.mark.slow
def test_user_experiment_guidance_labels_and_figures(user_study: Path) -> None:
    summary = json.loads((user_study / "results.json").read_text())
    markdown = (user_study / "report.md").read_text()
    (g,) = summary["guidance"]
    manifest = next(d for d in summary["datasets"]["table"] if d.startswith("manifest:"))
    assert summary["datasets"]["labels"][manifest] == "lj"
    assert g["reference_dataset"] == manifest  # no test-other: the first dataset listed
    states = {c["recipe"]: c for c in g["tolerance_checks"]}
    ct2 = states["ct2-int8"]
    assert ct2["n_utterances"] == 5
    if ct2["state"] != "exceeds":
        # Its size is what it is: the smallest of the three whenever the sample does not rule it out.
        assert g["smallest"]["recipe"] == "ct2-int8"
    if ct2["state"] == "undecided":
        assert ct2["utterances_needed"] > 5
        assert "cannot tell whether ct2-int8 is within the tolerance" in markdown or ct2["recipe"] not in (
            g["smallest"]["recipe"],
            g["fastest"]["recipe"],
        )
    header = "| Recipe | WER lj | WER clean | CER lj | CER clean | RTF | RTFx | Size (MB) | vs fp32 | vs fp16 |"
    assert header in markdown
    table = markdown.split("## Results")[1].split("## Paired")[0]
    assert manifest.split(":", 1)[1] not in table  # the label, never the path
    assert "ct2-int8: weights as CTranslate2 stored them: linear int8" in table
    assert "quanto-int8: left unquantized: conv stem float32" in table
    assert summary["figures"] == ["fig_wer_datasets.png", "fig_tradeoffs.png"]  # no test-other: no Figure 1
    assert "The paper" not in markdown and "Most robust" not in markdown
    for log in (user_study / "logs").iterdir():
        assert "deprecat" not in log.read_text().lower(), log


def test_datasets_take_labels_and_reference_by_label() -> None:
    text = 'recipes = ["fp32"]\ndatasets = ["librispeech:test-clean", {spec = "ljspeech", label = "lj"}]\n'
    experiment = parse_experiment(text + 'reference_dataset = "lj"\ntolerance = 2.5\n', "exp.toml", "exp")
    assert experiment.datasets == ("librispeech:test-clean", "ljspeech")
    assert dict(experiment.labels) == {"ljspeech": "lj"} and experiment.tolerance == 2.5
    assert Experiment.from_config(experiment.config()) == experiment


def test_a_label_finds_its_dataset_stored_under_the_canonical_spec() -> None:
    """Tasks are stored under the spec with every modifier parameter filled in; the label typed beside the short
    form still names it in every table."""
    from whisper_ptq.report.analysis import Layout, System

    stored = "librispeech:test-clean+concat:seconds=70,within=chapter,pause=0.5"
    system = System("base", "fp32", {}, {}, {stored: None})  # type: ignore[dict-item]
    layout = Layout.of([system], {"librispeech:test-clean+concat:seconds=70": "joined"})
    assert layout.label(stored) == "joined"


@pytest.mark.parametrize(
    "extra, message",
    [
        ('reference_dataset = "other"\n', r"exp\.toml:3: reference_dataset 'other' is not a listed dataset"),
        ("tolerance = -1\n", r"exp\.toml:3: 'tolerance' must be a number of WER points, at least 0"),
        ("repeats = 0\n", r"'repeats' must be a positive integer"),
        ('datasets = [{spec = "ljspeech", name = "x"}]\n', r"'datasets' must be a non-empty list of dataset specs or"),
    ],
)
def test_bad_report_keys_are_refused_with_their_line(extra: str, message: str) -> None:
    text = 'recipes = ["fp32"]\n' + (extra if extra.startswith("datasets") else 'datasets = ["ljspeech"]\n' + extra)
    with pytest.raises(UserError, match=message):
        parse_experiment(text, "exp.toml", "exp")


def test_the_readme_experiment_parses() -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    text = re.search(r"### Experiments.*?```toml\n(.*?)```", readme, re.DOTALL).group(1)
    experiment = parse_experiment(text, "README.md", "readme")
    assert experiment.reference_dataset == "calls" and experiment.timing_batch_sizes == (1,)


def test_two_datasets_may_not_share_a_label() -> None:
    text = 'recipes = ["fp32"]\ndatasets = ["manifest:a/calls.jsonl", "manifest:b/calls.jsonl"]\n'
    with pytest.raises(UserError, match=r"exp\.toml:2: datasets .* are both labelled 'calls'; give one a label"):
        parse_experiment(text, "exp.toml", "exp")


def test_a_config_stored_before_the_new_keys_loads_with_their_defaults() -> None:
    stored = load_experiment("quick").config()
    for key in UNMEASURED:
        del stored[key]
    old = Experiment.from_config(stored)
    assert (old.repeats, old.tolerance, old.labels, old.reference_dataset) == (1, 1.0, (), None)


def test_unmeasured_keys_resume_the_same_database(tmp_path: Path) -> None:
    path = tmp_path / RESULTS_FILE
    config = load_experiment("quick").config()
    Store.for_experiment(path, "quick", config, unmeasured=UNMEASURED).close()
    changed = {**config, "tolerance": 3.0, "repeats": 5, "labels": {"librispeech:test-clean": "c"}}
    with Store.for_experiment(path, "quick", changed, unmeasured=UNMEASURED) as store:
        assert store.experiment.config == changed  # resumed, and the report now reads the new values
    with Store.open(path) as store:
        assert store.experiment.config["tolerance"] == 3.0
    with pytest.raises(UserError, match="holds results of a different experiment"):
        Store.for_experiment(path, "quick", {**changed, "limit": 4}, unmeasured=UNMEASURED)


def test_timing_jobs_and_events_survive_their_json_form_and_are_never_cut(tmp_path: Path) -> None:
    from whisper_ptq.backends import get_recipe
    from whisper_ptq.executors.jobs import Job, Part, Timed, decode_event, encode_event
    from whisper_ptq.settings import Settings

    ids = tuple(f"u{i}" for i in range(60))
    job = Job(2, "tiny.en", get_recipe("fp32"), (Part("d", ids, (8, 1)),), Settings(data_root=tmp_path), 3)
    assert Job.from_dict(json.loads(json.dumps(job.to_dict()))) == job
    assert job.shards(25) == [job]  # a pass is timed over all of its utterances, on one worker
    assert job.label == "tiny.en fp32 timing 3"
    event = Timed(2, "d", {"batch_size": 8, "round": 3, "seconds": 1.5}, {"u0": "a b"})
    assert decode_event(encode_event(event)) == event


TIMED = """
name = "timed"
models = ["tiny.en"]
recipes = ["fp32", "reference:dtype=bf16"]
datasets = ["librispeech:test-clean"]
limit = 2
threads = 1
"""


@pytest.mark.slow
def test_raising_repeats_times_again_without_redoing_rows(tmp_path: Path, shared_data: Path, model_cache: Path) -> None:
    experiment, out = tmp_path / "timed.toml", tmp_path / "out"
    args = bench_args(experiment, out, shared_data, model_cache)
    experiment.write_text(TIMED)
    assert main(args) == 0
    query = "SELECT utterance_id, hypothesis, seconds FROM utterances ORDER BY task_id, utterance_id"
    rows = sqlite3.connect(out / RESULTS_FILE).execute(query).fetchall()
    experiment.write_text(TIMED + "repeats = 2\n")
    assert main(args) == 0
    assert sqlite3.connect(out / RESULTS_FILE).execute(query).fetchall() == rows  # rows kept, none redone
    assert sorted(p.name for p in (out / "logs").iterdir()) == [
        "000-tiny.en_fp32.stderr",
        "000-tiny.en_fp32_timing_1.stderr",
        "001-tiny.en_reference_dtype=bf16.stderr",
        "001-tiny.en_reference_dtype=bf16_timing_1.stderr",
    ]
    summary = json.loads((out / "results.json").read_text())
    assert summary["experiment"]["repeats"] == 2
    for system in summary["table"]:
        speed = system["speed_by_batch_size"]["1"]
        assert speed["rounds"] == [0, 1] and len(speed["rtfs"]) == 2 and speed["rtf_min"] <= speed["rtf_max"]
    with Store.open(out / RESULTS_FILE) as store:
        passes = [p for r in store.results() for p in r["summary"]["timing"]]
    assert [p["differing_hypotheses"] for p in passes] == [0, 0]  # greedy decoding: the same text again
    spread = r"\| fp32 \| [^|]+ \| [^|]+ \| \d\.\d{3} \(\d\.\d{3}-\d\.\d{3}\) \|"  # WER, CER, RTF (min-max)
    assert re.search(spread, (out / "report.md").read_text())
