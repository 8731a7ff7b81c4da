"""`whisper-ptq compare`: two eval output folders, or two recipes of a bench folder, on made-up rows whose
error counts are known; and the refusals, one line each."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from whisper_ptq.cli import main
from whisper_ptq.results.metrics import normalize, score_utterance
from whisper_ptq.results.outputs import read_outputs, write_outputs
from whisper_ptq.results.rows import UtteranceResult
from whisper_ptq.results.stats import paired_rows_test
from whisper_ptq.results.store import RESULTS_FILE, Store

CLEAN = "librispeech:test-clean"
REFERENCES = [
    "Mister Quilter is the apostle of the middle classes.",
    "Nor is Mister Quilter's manner less interesting than his matter.",
    "He tells us that at this festive season of the year we are glad to welcome him.",
    "Linnell's pictures are a sort of Up Guards and At Em paintings.",
]


def rows(hypotheses: list[str]) -> list[UtteranceResult]:
    return [
        UtteranceResult.scored(f"utt-{i}", ref, hyp, 3.0 + i, 0.3)
        for i, (ref, hyp) in enumerate(zip(REFERENCES, hypotheses, strict=True))
    ]


A_HYPS = [REFERENCES[0], REFERENCES[1], REFERENCES[2], "Linnell's pictures are a sort of up guards and adam paintings."]
B_HYPS = [REFERENCES[0], "Nor is Mr. Quilter's manner less interesting than his manner.", REFERENCES[2], REFERENCES[3]]


def eval_dir(path: Path, recipe: str, hypotheses: list[str], dataset: str = CLEAN) -> Path:
    summary = {"model": "tiny.en", "recipe": recipe, "dataset": dataset}
    write_outputs(path, summary, rows(hypotheses))
    return path


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["compare", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_utterances_jsonl_holds_the_normalized_texts(tmp_path: Path) -> None:
    out = eval_dir(tmp_path / "a", "fp32", A_HYPS)
    first = json.loads((out / "utterances.jsonl").read_text().splitlines()[1])
    assert first["normalized_reference"] == "nor is mister quilter is manner less interesting than his matter"
    assert first["normalized_hypothesis"] == normalize(A_HYPS[1])
    assert read_outputs(out)[1] == rows(A_HYPS)  # and the rows read back as they were


def test_two_eval_folders(tmp_path: Path, capsys) -> None:
    a, b = eval_dir(tmp_path / "a", "fp32", A_HYPS), eval_dir(tmp_path / "b", "ct2-int8", B_HYPS)
    code, out, _ = run(capsys, str(a), str(b))
    assert code == 0
    test = paired_rows_test(rows(A_HYPS), rows(B_HYPS))
    words = sum(score_utterance(r, r).ref_words for r in REFERENCES)
    assert f"A: {a} (tiny.en fp32)" in out and f"B: {b} (tiny.en ct2-int8)" in out
    assert f"clean (librispeech:test-clean): 4 utterances in common, {words} reference words" in out
    assert f"B - A: {test.difference:+.2f} WER points, paired 95% CI [{test.low:+.2f}, {test.high:+.2f}]" in out
    assert "(paired permutation test; 2 of 4 utterances differ in errors): not significant at 5%" in out
    # Both differing utterances, B's extra errors first, with normalized texts.
    assert "utterances whose normalized hypotheses differ: 2" in out
    assert out.index("utt-1: word errors A 0, B 1") < out.index("utt-3: word errors A 2, B 0")
    assert f"reference: {normalize(REFERENCES[1])}" in out
    assert f"B:         {normalize(B_HYPS[1])}" in out
    assert "Mr." not in out  # normalized: "mister"


def test_two_recipes_of_a_bench_folder(tmp_path: Path, capsys) -> None:
    from whisper_ptq.backends import get_recipe

    with Store.create(tmp_path / RESULTS_FILE, "x", {"name": "x"}) as store:
        for position, (recipe, hyps) in enumerate((("fp32", A_HYPS), ("hqq:nbits=3,group_size=64", B_HYPS))):
            task = store.ensure_task(position, "tiny.en", get_recipe(recipe), CLEAN)
            store.add_rows(task, rows(hyps))
            store.set_status(task, "done")
    code, out, _ = run(capsys, f"{tmp_path}:fp32", f"{tmp_path}:hqq:nbits=3,group_size=64", "--dataset", "clean")
    assert code == 0 and "utterances whose normalized hypotheses differ: 2" in out
    code, _, err = run(capsys, f"{tmp_path}:fp32", f"{tmp_path}:hqq-int4")
    assert code == 2 and "holds no recipe 'hqq-int4'; it holds (MODEL/RECIPE): tiny.en/fp32" in err


@pytest.mark.parametrize(
    "make_b, message",
    [
        (lambda d: eval_dir(d / "b", "x", B_HYPS, "librispeech:test-other"), "share no dataset: A has librispeech"),
        (lambda d: d / "missing", "neither an eval output folder"),
    ],
)
def test_refusals_are_one_line(tmp_path: Path, capsys, make_b, message) -> None:
    a = eval_dir(tmp_path / "a", "fp32", A_HYPS)
    code, _, err = run(capsys, str(a), str(make_b(tmp_path)))
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and message in err, err


def test_different_references_are_refused(tmp_path: Path, capsys) -> None:
    a = eval_dir(tmp_path / "a", "fp32", A_HYPS)
    b = tmp_path / "b"
    changed = [UtteranceResult.scored("utt-0", "Another text entirely.", "Another text.", 2.0, 0.2)]
    write_outputs(b, {"model": "tiny.en", "recipe": "x", "dataset": CLEAN}, changed)
    code, _, err = run(capsys, str(a), str(b))
    assert code == 2 and "utterance 'utt-0' of librispeech:test-clean has different references" in err
