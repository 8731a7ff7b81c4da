"""End-to-end `whisper-ptq eval` on the packaged tiny.en and the shared sample, and its refusals."""

from __future__ import annotations

import json
import shutil

import pytest

from whisper_ptq.cli import main


def run_cli(capsys, *args: str) -> tuple[int, str]:
    """Run the CLI in-process; return (exit code, stderr), whether it returned or exited."""
    try:
        code = main(list(args))
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def fp32_run(tmp_path_factory, shared_data):
    out = tmp_path_factory.mktemp("eval-fp32")
    args = ["eval", "--model", "tiny.en", "--dataset", "librispeech:test-clean", "--limit", "4"]
    assert main([*args, "--data-root", str(shared_data), "--out", str(out), "--no-progress"]) == 0
    return out


def test_eval_writes_summary_and_utterances(fp32_run):
    summary = json.loads((fp32_run / "summary.json").read_text())
    for key in ("model", "recipe", "dataset", "n_utterances", "audio_seconds", "wer", "cer", "rtf", "threads"):
        assert key in summary
    assert summary["n_utterances"] == 4 and summary["batch_size"] == 1
    assert {"python", "torch", "transformers"} <= set(summary["versions"])
    assert 0 < summary["wer"] < 20, "tiny.en on clean read speech should be well under 20% WER"
    assert summary["size_reduction"] == 0.0 and summary["size_bytes"] > 100e6
    rows = [json.loads(line) for line in (fp32_run / "utterances.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == sorted(r["id"] for r in rows) and len(rows) == 4
    # The summary's WER is the corpus rate over exactly these rows.
    assert summary["wer"] == pytest.approx(
        100 * sum(r["word_errors"] for r in rows) / sum(r["ref_words"] for r in rows)
    )
    assert summary["audio_seconds"] == pytest.approx(sum(r["audio_seconds"] for r in rows))


def test_batched_hypotheses_equal_batch_size_one(fp32_run, shared_data, tmp_path):
    args = ["eval", "--model", "tiny.en", "--dataset", "librispeech:test-clean", "--limit", "4", "--batch-size", "4"]
    assert main([*args, "--data-root", str(shared_data), "--out", str(tmp_path), "--no-progress"]) == 0
    batched = [json.loads(line)["hypothesis"] for line in (tmp_path / "utterances.jsonl").read_text().splitlines()]
    single = [json.loads(line)["hypothesis"] for line in (fp32_run / "utterances.jsonl").read_text().splitlines()]
    assert batched == single


def test_bf16_runs_close_to_fp32(fp32_run, shared_data, tmp_path):
    args = ["eval", "--model", "tiny.en", "--recipe", "bf16", "--dataset", "librispeech:test-clean", "--limit", "4"]
    assert main([*args, "--data-root", str(shared_data), "--out", str(tmp_path), "--no-progress"]) == 0
    bf16 = json.loads((tmp_path / "summary.json").read_text())
    fp32 = json.loads((fp32_run / "summary.json").read_text())
    assert abs(bf16["wer"] - fp32["wer"]) < 5.0
    assert bf16["size_reduction"] == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize(
    ("args", "culprit"),
    [
        (["--model", "no-such-model"], "no-such-model"),
        (["--dataset", "nosuchkind:x"], "nosuchkind"),
        (["--dataset", "librispeech:no-such-split"], "no-such-split"),
        (["--recipe", "hqq:nbits=5"], "nbits"),
        (["--recipe", "no-such-recipe"], "no-such-recipe"),
        (["--limit", "0"], "--limit"),
        (["--limit", "-3"], "--limit"),
        (["--batch-size", "0"], "--batch-size"),
        (["--beam-size", "0"], "--beam-size"),
        (["--language", "xx"], "--language"),
        (["--language", "de"], "English-only"),
        (["--task", "translate"], "English-only"),
        (["--task", "summarize"], "--task"),
        (["--recipe", "fast-cpu-fp32", "--beam-size", "5"], "greedily only"),
        (["--dataset", "librispeech:test-clean+concat:seconds=0"], "concat"),
        (["--dataset", "librispeech:test-clean+concat:within=book"], "concat"),
    ],
)
def test_bad_input_is_one_line_exit_2(args, culprit, shared_data, tmp_path, capsys):
    out = tmp_path / "out"
    code, err = run_cli(capsys, "eval", "--model", "tiny.en", "--data-root", str(shared_data), "--out", str(out), *args)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:") and culprit in lines[0], err
    assert not out.exists(), "a refused run must not leave an output directory"


def test_an_out_holding_another_eval_is_refused_unless_forced(fp32_run, shared_data, tmp_path, capsys):
    """The same eval into its own --out runs again; another recipe is refused before any work, and leaves the
    earlier results as they were; --force replaces them."""
    out = tmp_path / "out"
    shutil.copytree(fp32_run, out)
    before = (out / "summary.json").read_text()
    base = ["eval", "--model", "tiny.en", "--dataset", "librispeech:test-clean", "--limit", "1"]
    base += ["--data-root", str(shared_data), "--out", str(out), "--no-progress"]
    code, err = run_cli(capsys, *base, "--recipe", "ct2-int8")
    assert code == 2 and err.count("\n") == 1
    assert f"{out} holds the eval of tiny.en fp32 on librispeech:test-clean; to replace it" in err
    assert (out / "summary.json").read_text() == before
    assert run_cli(capsys, *base)[0] == 0  # the same model, recipe and dataset: re-run in place
    assert json.loads((out / "summary.json").read_text())["n_utterances"] == 1
    assert run_cli(capsys, *base, "--recipe", "ct2-int8", "--force")[0] == 0
    assert json.loads((out / "summary.json").read_text())["recipe"] == "ct2-int8"


def test_eval_line_and_summary_report_long_form(shared_data, tmp_path, capsys):
    """A 40 s recording and its clips through CTranslate2 int8: decoded whole, counted, S/D/I and runaways."""
    spec = "librispeech:test-clean+concat:seconds=45,within=dataset"
    args = ["eval", "--model", "tiny.en", "--recipe", "ct2-int8", "--dataset", spec, "--limit", "1", "--threads", "2"]
    assert main([*args, "--data-root", str(shared_data), "--out", str(tmp_path), "--no-progress"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["long_utterances"] == 1 and summary["decoded_seconds"] == pytest.approx(summary["audio_seconds"])
    assert summary["audio_seconds"] > 40 and summary["wer"] < 15 and summary["runaways"] == 0
    assert summary["substitutions"] + summary["deletions"] + summary["insertions"] > 0
    assert summary["decoding"] == {
        "language": "en",
        "task": "transcribe",
        "beam_size": 1,
        "temperature_fallback": False,
        "condition_on_previous_text": False,
    }
    assert "1 over 30 s" in line and f"({summary['decoded_seconds']:.1f} s decoded)" in line and "runaways 0" in line
    [row] = [json.loads(x) for x in (tmp_path / "utterances.jsonl").read_text().splitlines()]
    assert row["hit_token_limit"] is False and row["language"] == "en"
    assert abs(len(row["hypothesis"].split()) - row["ref_words"]) <= 0.1 * row["ref_words"]


def test_missing_data_root_names_the_expected_place(tmp_path, capsys):
    code, err = run_cli(capsys, "eval", "--model", "tiny.en", "--data-root", str(tmp_path / "nowhere"))
    assert code == 2 and "nowhere" in err and "data fetch" in err


def test_output_dir_that_is_a_file_is_refused(shared_data, tmp_path, capsys):
    target = tmp_path / "taken"
    target.write_text("not a directory")
    code, err = run_cli(capsys, "eval", "--model", "tiny.en", "--data-root", str(shared_data), "--out", str(target))
    assert code == 2 and "taken" in err and "file" in err
    assert target.read_text() == "not a directory"


def test_directory_that_is_no_model_is_refused(shared_data, tmp_path, capsys):
    (tmp_path / "junk.txt").write_text("x")
    code, err = run_cli(
        capsys, "eval", "--model", str(tmp_path), "--data-root", str(shared_data), "--out", str(tmp_path / "o")
    )
    assert code == 2 and str(tmp_path) in err


def test_trans_line_without_text_is_refused(shared_data, tmp_path, capsys):
    split = tmp_path / "librispeech" / "test-clean" / "1089" / "134686"
    split.mkdir(parents=True)
    shutil.copy(shared_data / "librispeech/test-clean/1089/134686/1089-134686-0000.flac", split)
    (split / "1089-134686.trans.txt").write_text("1089-134686-0000\n")
    code, err = run_cli(
        capsys, "eval", "--model", "tiny.en", "--dataset", "librispeech:test-clean", "--data-root", str(tmp_path)
    )
    assert code == 2 and "1089-134686.trans.txt" in err
