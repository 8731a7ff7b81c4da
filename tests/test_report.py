"""The report on synthetic results with known error counts: table, CIs, significance, guidance, files."""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from whisper_ptq import report
from whisper_ptq.errors import UserError
from whisper_ptq.report import analysis
from whisper_ptq.results.metrics import score_utterance
from whisper_ptq.results.rows import UtteranceResult, summarize
from whisper_ptq.results.stats import bootstrap_rate_ci, paired_test
from whisper_ptq.results.timing import LOAD_KEY, TIMING_KEY

CLEAN, OTHER = "librispeech:test-clean", "librispeech:test-other"
N_UTT, N_WORDS = 20, 20
FP32_BYTES = 290e6
VOCAB = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa".split()


@dataclass(frozen=True)
class Synthetic:
    """A recipe's made-up behaviour: extra word errors per utterance over fp32, speed and size."""

    recipe: str
    extra: dict[str, dict[int, int]]  # dataset -> {utterance index: extra errors}; missing = 0
    rtf: float
    size_reduction: float
    bits: float
    noise_factor: float = 1.0  # how much more than fp32 the recipe suffers from added noise
    status: str = "done"
    error: str | None = None


RECIPES = [
    Synthetic("fp32", {}, 0.12, 0.0, 32.0),
    Synthetic("pytorch-int8", {}, 0.08, 0.57, 8.0),  # identical errors to fp32: a tie
    Synthetic(
        "hqq-int4", {OTHER: {0: 1, 1: 1, 2: 1}}, 0.15, 0.69, 4.25, noise_factor=1.4
    ),  # +0.75 points, within tolerance
    Synthetic("quanto-int8", {OTHER: {0: -1, 1: -1, 2: -1}}, 0.13, 0.57, 8.0),  # better, but p = 0.25
    Synthetic("quanto-int8-static", {d: dict.fromkeys(range(N_UTT), 2) for d in (CLEAN, OTHER)}, 0.17, 0.57, 8.0, 1.2),
    Synthetic("bnb-nf4", {}, 0.0, 0.0, 0.0, status="failed", error="bitsandbytes needs a CUDA device"),
]


def base_errors(dataset: str, i: int, noise_factor: float = 1.0) -> int:
    """fp32's errors on utterance i: about 5% WER on clean, 17.5% on other, and a noise penalty."""
    info = analysis.parse_dataset(dataset)
    errors = i % 3 if "test-clean" in info.base else 2 + i % 4
    return errors + (0 if info.snr is None else int(noise_factor * (i % 3 + 8) / (1 + info.snr / 5)))


def utterance(dataset: str, i: int, errors: int, rtf: float) -> dict[str, Any]:
    words = [VOCAB[(i + k) % len(VOCAB)] for k in range(N_WORDS)]
    reference = " ".join(words)
    hypothesis = " ".join(["zulu"] * errors + words[errors:])  # `errors` substitutions
    score = score_utterance(reference, hypothesis)
    audio = 4.0 + 0.25 * i
    return {
        "id": f"{i:04d}",
        "reference": reference,
        "hypothesis": hypothesis,
        "ref_words": score.ref_words,
        "word_errors": score.word_errors,
        "ref_chars": score.ref_chars,
        "char_errors": score.char_errors,
        "audio_seconds": audio,
        "seconds": rtf * audio,
    }


def task(s: Synthetic, dataset: str) -> dict[str, Any]:
    utterances = [] if s.status == "failed" else [
        utterance(dataset, i, base_errors(dataset, i, s.noise_factor) + s.extra.get(dataset, {}).get(i, 0), s.rtf)
        for i in range(N_UTT)
    ]  # fmt: skip
    summary = {
        "size_reduction": s.size_reduction,
        "size_bytes": FP32_BYTES * (1 - s.size_reduction),
        "fp32_size_bytes": FP32_BYTES,
        "fp16_size_bytes": FP32_BYTES / 2,
        "linear_bits_per_weight": s.bits,
        "device": "cpu",
        "threads": 2,
        "batch_size": 8,
    }
    return {
        "model": "base",
        "recipe": s.recipe,
        "dataset": dataset,
        "recipe_spec": {"library": "reference", "weights": "fp32"} if s.recipe == "fp32" else {"library": "x"},
        "status": s.status,
        "error": s.error,
        "summary": {} if s.status == "failed" else summary,
        "utterances": utterances,
    }


def make_results(datasets: tuple[str, ...] = (CLEAN, OTHER), recipes: list[Synthetic] = RECIPES) -> list[dict]:
    return [task(s, d) for s in recipes for d in datasets]


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("report")
    return out, report.write_report(out, make_results(), {"name": "synthetic"})


def by_recipe(summary: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {row["recipe"]: row for row in summary["table"]}


def test_writes_every_file(written: tuple[Path, dict[str, Any]]) -> None:
    out, _ = written
    names = {p.name for p in out.iterdir()}
    assert {
        "report.md",
        "report.html",
        "table.csv",
        "results.json",
        "fig_wer_increase.png",
        "fig_tradeoffs.png",
    } <= names
    assert not [n for n in names if n.endswith(".tmp")]
    assert "fig_wer_snr.png" not in names  # no noisy datasets in these results


def test_table_rows_columns_and_cis_match_stats(written: tuple[Path, dict[str, Any]]) -> None:
    out, summary = written
    rows = list(csv.DictReader((out / "table.csv").open()))
    assert [r["recipe"] for r in rows] == [s.recipe for s in RECIPES]  # fp32 first, experiment order
    assert {"wer_clean", "wer_other", "cer_clean", "cer_other", "rtf", "size_reduction"} <= set(rows[0])
    for s in RECIPES[:-1]:
        row = next(r for r in rows if r["recipe"] == s.recipe)
        for dataset, label in ((CLEAN, "clean"), (OTHER, "other")):
            errors = [base_errors(dataset, i) + s.extra.get(dataset, {}).get(i, 0) for i in range(N_UTT)]
            ci = bootstrap_rate_ci(errors, [N_WORDS] * N_UTT)
            assert float(row[f"wer_{label}"]) == pytest.approx(100 * sum(errors) / (N_UTT * N_WORDS))
            assert (float(row[f"wer_{label}_low"]), float(row[f"wer_{label}_high"])) == pytest.approx((ci.low, ci.high))
        assert float(row["rtf"]) == pytest.approx(s.rtf)
    markdown = (out / "report.md").read_text()
    fp32 = by_recipe(summary)["fp32"]["datasets"][OTHER]
    assert f"{fp32['wer']:.2f} [{fp32['wer_ci'][0]:.1f}, {fp32['wer_ci'][1]:.1f}]" in markdown
    assert "| Recipe | WER clean | WER other | CER clean | CER other | RTF |" in markdown


def test_stored_summary_gives_the_same_table(written: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    results = make_results()
    for t in results:  # as Store.results() hands them over: summarize(rows) merged into the summary
        rows = [UtteranceResult(**u) for u in t["utterances"]]
        t["summary"] |= summarize(rows) if rows else {}
    assert report.write_report(tmp_path, results)["table"] == written[1]["table"]


def test_failed_row_shows_status_and_error(written: tuple[Path, dict[str, Any]]) -> None:
    out, summary = written
    assert by_recipe(summary)["bnb-nf4"]["status"] == "failed"
    markdown = (out / "report.md").read_text()
    assert "| bnb-nf4 | - | - |" in markdown
    assert "bnb-nf4 (failed): bitsandbytes needs a CUDA device" in markdown


def test_paired_tests_match_stats_and_verdicts(written: tuple[Path, dict[str, Any]]) -> None:
    _, summary = written
    tests = {(t["recipe"], t["dataset"]): t for t in summary["tests"]}
    base = [base_errors(OTHER, i) for i in range(N_UTT)]
    worse = tests[("quanto-int8-static", OTHER)]
    expected = paired_test(base, [e + 2 for e in base], [N_WORDS] * N_UTT)
    assert worse["p_value"] == pytest.approx(expected.p_value) and worse["p_value"] < 0.05
    assert worse["wer_difference"] == pytest.approx(10.0)
    assert worse["verdict"].startswith("significantly worse than fp32 at 5%")
    tie = tests[("pytorch-int8", OTHER)]
    assert (tie["p_value"], tie["wer_difference"]) == (1.0, 0.0)
    assert tie["verdict"].startswith("not significantly different from fp32 at 5% (p = 1.00)")
    better = tests[("quanto-int8", OTHER)]
    assert better["p_value"] == pytest.approx(0.25) and better["wer_difference"] == pytest.approx(-0.75)
    assert "cannot support a claim that quanto-int8 beats fp32" in better["verdict"]
    assert not any(t["recipe"] == "bnb-nf4" for t in summary["tests"])


def test_guidance_picks_expected_recipes(written: tuple[Path, dict[str, Any]]) -> None:
    out, summary = written
    (g,) = summary["guidance"]
    assert g["reference_dataset"] == OTHER and g["tolerance"] == 1.0
    states = {c["recipe"]: c["state"] for c in g["tolerance_checks"]}
    # hqq-int4: +0.75, paired CI [0, +1.5] contains the tolerance; the static recipe's whole CI is at +10.
    assert states == {"pytorch-int8": "within", "hqq-int4": "undecided", "quanto-int8": "within", **{
        "quanto-int8-static": "exceeds"}}  # fmt: skip
    assert g["within_tolerance"] == ["pytorch-int8", "hqq-int4", "quanto-int8"]
    assert g["fastest"]["recipe"] == "pytorch-int8" and g["fastest"]["speedup"] == pytest.approx(0.12 / 0.08)
    assert g["smallest"]["recipe"] == "hqq-int4" and g["smallest"]["size_reduction"] == 0.69
    assert g["most_robust"]["recipe"] == "quanto-int8"
    assert [a["recipe"] for a in g["avoid"]] == ["quanto-int8-static"]
    markdown = (out / "report.md").read_text()
    assert "Fastest quantized recipe within tolerance: **pytorch-int8**, RTF 0.080 vs fp32 0.120 (1.50x)" in markdown
    hqq = next(c for c in g["tolerance_checks"] if c["recipe"] == "hqq-int4")
    assert hqq["utterances_needed"] > N_UTT
    assert (
        f"The sample (20 utterances) cannot tell whether hqq-int4 is within the tolerance: its 95% CI [+0.00, +1.50] "
        f"contains +1; about {hqq['utterances_needed']:,} utterances would tell" in markdown
    )
    assert "The paper reports" not in markdown  # no paper_comparison in this experiment


def test_tolerance_comes_from_experiment(tmp_path: Path) -> None:
    summary = report.write_report(tmp_path, make_results(), {"tolerance": 12})
    (g,) = summary["guidance"]
    assert g["tolerance"] == 12
    assert {c["recipe"]: c["state"] for c in g["tolerance_checks"]}["quanto-int8-static"] == "within"
    assert g["within_tolerance"] == ["pytorch-int8", "hqq-int4", "quanto-int8", "quanto-int8-static"]
    assert "tolerance 12 WER points" in (tmp_path / "report.md").read_text()


def test_one_recipe_winning_several_categories_is_named_once(tmp_path: Path) -> None:
    recipes = [RECIPES[0], Synthetic("lean", {}, 0.06, 0.75, 4.0), Synthetic("heavy", {}, 0.10, 0.5, 8.0)]
    summary = report.write_report(tmp_path, make_results(recipes=recipes))
    (g,) = summary["guidance"]
    assert g["fastest"]["recipe"] == g["smallest"]["recipe"] == g["most_robust"]["recipe"] == "lean"
    guidance_text = (tmp_path / "report.md").read_text().split("## Deployment guidance")[1].split("Rules:")[0]
    assert guidance_text.count("**lean**") == 1
    assert "Fastest and smallest quantized recipe within tolerance, and the most robust on other: **lean**" in (
        guidance_text
    )


def test_paper_claim_only_in_paper_presets(tmp_path: Path) -> None:
    report.write_report(tmp_path, make_results(), {"paper_comparison": True})
    assert "The paper reports Quanto int8 beating fp32 on test-other." in (tmp_path / "report.md").read_text()


def test_missing_fp32_is_reported_not_fatal(tmp_path: Path) -> None:
    summary = report.write_report(tmp_path, make_results(recipes=RECIPES[1:]))
    assert summary["tests"] == []
    assert "needs a completed fp32 baseline" in summary["guidance"][0]["note"]
    assert "needs a completed fp32 baseline" in (tmp_path / "report.md").read_text()


def test_html_is_self_contained(written: tuple[Path, dict[str, Any]]) -> None:
    out, _ = written
    page = (out / "report.html").read_text()
    assert 'src="http' not in page and "<link" not in page and "<script" not in page
    assert page.count('src="data:image/png;base64,') == 3


def test_results_json_has_no_utterances(written: tuple[Path, dict[str, Any]]) -> None:
    out, summary = written
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk == summary
    assert '"utterances"' not in json.dumps(on_disk) and '"hypothesis"' not in json.dumps(on_disk)
    assert set(on_disk) >= {"table", "tests", "guidance", "figures"}


def test_snr_figure_and_table_with_noisy_datasets(tmp_path: Path) -> None:
    noisy = tuple(f"{OTHER}+noise:snr={snr},kind=white,seed=0" for snr in (0, 10, 20))
    summary = report.write_report(tmp_path, make_results((CLEAN, OTHER, *noisy), RECIPES[:3]))
    assert "fig_wer_snr.png" in summary["figures"] and (tmp_path / "fig_wer_snr.png").exists()
    markdown = (tmp_path / "report.md").read_text()
    assert "| Recipe | 0 dB | 10 dB | 20 dB | clean |" in markdown
    assert "WER other @ 0 dB" not in markdown  # noisy variants are not Table 1 columns
    fp32 = by_recipe(summary)["fp32"]["datasets"]
    assert fp32[noisy[0]]["wer"] > fp32[noisy[2]]["wer"] > fp32[OTHER]["wer"]


def test_single_dataset_report_drops_figure_1_and_stale_files(tmp_path: Path) -> None:
    report.write_report(tmp_path, make_results())
    summary = report.write_report(tmp_path, make_results((OTHER,)))
    assert not (tmp_path / "fig_wer_increase.png").exists()  # the earlier report's Figure 1 is gone
    assert summary["figures"] == ["fig_wer_datasets.png", "fig_tradeoffs.png"]
    (g,) = summary["guidance"]
    assert g["most_robust"] is None  # robustness is the increase from test-clean to test-other: it needs both
    markdown = (tmp_path / "report.md").read_text()
    assert "| Recipe | WER other | CER other | RTF | RTFx |" in markdown and "Most robust" not in markdown


def test_users_datasets_have_their_labels_everywhere(tmp_path: Path) -> None:
    """A manifest of the user's own beside test-clean: every dataset in the table and figures under its
    label, the reference dataset as chosen, and no Figure 1 (it compares test-other with test-clean)."""
    mine = "manifest:/data/recordings/lj10.jsonl"
    experiment = {"labels": {mine: "lj"}, "reference_dataset": "lj", "name": "mine"}
    summary = report.write_report(tmp_path, make_results((mine, CLEAN), RECIPES[:4]), experiment)
    assert summary["datasets"]["labels"] == {mine: "lj", CLEAN: "clean"}
    assert summary["guidance"][0]["reference_dataset"] == mine
    assert summary["figures"] == ["fig_wer_datasets.png", "fig_tradeoffs.png"]
    markdown = (tmp_path / "report.md").read_text()
    assert "| Recipe | WER lj | WER clean | CER lj | CER clean |" in markdown
    assert "/data/recordings" not in markdown.split("## Results")[1]  # the path is only in the setup list
    assert "reference dataset lj (set by the experiment's `reference_dataset`)" in markdown
    assert "Tolerance: WER on lj at most fp32" in markdown
    assert "Most robust" not in markdown and "The paper" not in markdown
    default = report.write_report(tmp_path, make_results((mine, CLEAN), RECIPES[:2]))
    assert default["datasets"]["labels"][mine] == "lj10"  # the file name without its folder
    assert default["guidance"][0]["reference_dataset"] == mine  # no test-other: the first dataset listed


def test_timing_passes_give_rtf_spread_batch_columns_and_a_busy_warning(tmp_path: Path) -> None:
    results = make_results(recipes=RECIPES[:3])
    for t in results:
        audio = sum(u["audio_seconds"] for u in t["utterances"])
        rtf = t["utterances"][0]["seconds"] / t["utterances"][0]["audio_seconds"]
        passes = [(8, 1, 1.5, 0.5), (8, 2, 0.5, 0.5), (1, 1, 2.0, 0.5), (1, 2, 2.4, 3.5)]  # size, round, x, load
        t["summary"][TIMING_KEY] = [
            {"batch_size": b, "round": r, "seconds": rtf * x * audio, "audio_seconds": audio, LOAD_KEY: load,
             "threads": 2, "cpus": 2} for b, r, x, load in passes
        ]  # fmt: skip
    summary = report.write_report(tmp_path, results)
    speed = by_recipe(summary)["hqq-int4"]["speed_by_batch_size"]
    assert speed["8"]["rtfs"] == pytest.approx([0.15, 0.15 * 1.5, 0.15 * 0.5])  # the accuracy pass first
    assert speed["8"]["rtf"] == pytest.approx(0.15) and speed["8"]["rtfx"] == pytest.approx(1 / 0.15)
    assert speed["1"]["rtf"] == pytest.approx(0.15 * 2.2) and speed["1"]["busy_passes"] == 1
    markdown = (tmp_path / "report.md").read_text()
    assert "| RTF b8 | RTFx b8 | RTF b1 | RTFx b1 |" in markdown
    assert "| 0.150 (0.075-0.225) | 6.7 | 0.330 (0.300-0.360) | 3.0 |" in markdown
    (warning,) = summary["warnings"]
    assert "load average reached 3.5 with 2 threads in use on 2 CPUs, in 3 of 15 timed passes" in warning
    assert f"**Warning**: {warning}." in markdown


def test_crash_while_writing_leaves_previous_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    report.write_report(tmp_path, make_results(recipes=RECIPES[:3]))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    real_replace, calls = os.replace, []

    def crash_on_second(src: str | Path, dst: str | Path) -> None:
        calls.append((Path(src).name, Path(dst).name))
        if len(calls) == 2:
            raise OSError("disk full")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_second)
    with pytest.raises(UserError, match=r"cannot write .*: disk full$"):  # one line naming the file
        report.write_report(tmp_path, make_results())
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert set(after) == set(before)  # no temp file left behind
    assert all(src == f".{dst}.tmp" for src, dst in calls)  # every file arrives by rename of a temp file
    changed = [name for name in before if after[name] != before[name]]
    assert changed == [calls[0][1]]  # only the file renamed before the crash is new, and it is complete


def test_pareto_mask() -> None:
    points = np.array([[1.0, 1.0], [2.0, 2.0], [0.5, 3.0], [1.0, 1.0]])
    assert analysis.pareto_mask(points).tolist() == [True, False, True, True]


def test_failure_modes_and_long_recordings_beside_their_clips(tmp_path: Path) -> None:
    """A joined dataset's recordings (ids `<first>..<last>` of consecutive clips) against those clips."""
    joined = f"{OTHER}+concat:seconds=120,within=chapter,pause=0.5"
    results = make_results((OTHER,), RECIPES[:2])
    for recipe, extra in (("fp32", 0), ("pytorch-int8", 3)):
        clips = next(r for r in results if r["recipe"] == recipe)["utterances"]
        recordings = []
        for start in range(0, N_UTT, 10):
            members = clips[start : start + 10]
            reference = " ".join(u["reference"] for u in members)
            hypothesis = " ".join([*(u["hypothesis"] for u in members), *["zulu"] * extra])
            score = score_utterance(reference, hypothesis)
            recordings.append(
                {
                    "id": f"{members[0]['id']}..{members[-1]['id']}",
                    "reference": reference,
                    "hypothesis": hypothesis,
                    "ref_words": score.ref_words,
                    "word_errors": score.word_errors,
                    "ref_chars": score.ref_chars,
                    "char_errors": score.char_errors,
                    "audio_seconds": sum(u["audio_seconds"] for u in members) + 4.5,
                    "seconds": 1.0,
                    "insertions": score.insertions,
                }
            )
        template = next(r for r in results if r["recipe"] == recipe)
        results.append({**template, "dataset": joined, "utterances": recordings})
    report.write_report(tmp_path, results)
    markdown = (tmp_path / "report.md").read_text()
    assert "| Recipe | Dataset | WER | Subst. | Del. | Ins. | Runaways | Utt. > 30 s | Audio decoded (s) |" in markdown
    fp32 = summarize([UtteranceResult(**u) for u in results[0]["utterances"]])
    assert f"| 2 (20 clips, 68 s each) | {fp32['wer']:.2f} | {fp32['wer']:.2f} | +0.00 | 0 / 0 |" in markdown
    assert "| +1.50 | 0 / 0 |" in markdown  # 3 extra insertions per 200-word recording for the second recipe


def test_a_winner_is_quantized_and_not_significantly_worse_than_fp32(tmp_path: Path) -> None:
    """Under a loose tolerance a recipe significantly worse than fp32 may still be within it: it is listed to
    avoid and never also named fastest; an unquantized conversion (a runtime at fp32) is fast but no winner."""
    recipes = [
        Synthetic("fp32", {}, 0.12, 0.0, 32.0),
        Synthetic("runtime-fp32", {}, 0.05, 0.0, 32.0),  # the fastest, unquantized
        Synthetic("worse-int8", {OTHER: dict.fromkeys(range(N_UTT), 1)}, 0.06, 0.57, 8.0),  # +1 error each
        Synthetic("good-int8", {}, 0.09, 0.57, 8.0),
    ]
    results = make_results(recipes=recipes)
    for t in results:
        if t["recipe"] == "runtime-fp32":
            t["recipe_spec"] = {"library": "onnxruntime", "weights": "fp32"}
    (g,) = report.write_report(tmp_path, results, {"tolerance": 50})["guidance"]
    assert {"runtime-fp32", "worse-int8", "good-int8"} <= set(g["within_tolerance"])
    assert g["fastest"]["recipe"] == "good-int8"
    assert "worse-int8" in [a["recipe"] for a in g["avoid"]]
