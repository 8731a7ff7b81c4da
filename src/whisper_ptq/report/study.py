"""The bench report: report.md, a self-contained report.html, table.csv, results.json and fig_*.png, written
from the results contract (one dict per (model, recipe, dataset) task, see `results.store.Store.results`)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from whisper_ptq.files import atomic_write_files
from whisper_ptq.models.names import HEAD
from whisper_ptq.report.analysis import (
    DEFAULT_TOLERANCE,
    EXCEEDS,
    UNDECIDED,
    WITHIN,
    Comparison,
    Layout,
    Measure,
    System,
    all_comparisons,
    build_systems,
    busy_timing,
    guidance,
)
from whisper_ptq.report.document import (
    Block,
    Bullets,
    FigureBlock,
    Heading,
    Para,
    Plot,
    render_html,
    render_markdown,
)
from whisper_ptq.report.figures import (
    colors_of,
    figure_datasets,
    figure_increase,
    figure_snr,
    figure_tradeoffs,
    panel_title,
    snr_panels,
    snr_spec,
)
from whisper_ptq.report.longform import failure_table, long_short_table
from whisper_ptq.report.tables import Table, csv_text, format_p, format_p_value
from whisper_ptq.results.outputs import strict_json

CATEGORY_WORDS = {"fastest": "fastest", "smallest": "smallest", "most_robust": "most robust"}


def guidance_sentences(g: dict[str, Any], layout: Layout) -> list[str]:
    if "note" in g:
        return [g["note"]]
    ref, tol, fp32 = layout.label(g["reference_dataset"]), g["tolerance"], g["fp32"]
    lines = [_tolerance_sentence(g, ref)]
    winners: dict[str, list[str]] = {}  # recipe -> the categories it wins: one sentence per recipe
    for category in CATEGORY_WORDS:
        if g.get(category):
            winners.setdefault(g[category]["recipe"], []).append(category)
    for recipe, categories in winners.items():
        numbers = g[categories[0]]
        parts = [_CATEGORY_PARTS[c](g[c], fp32, layout) for c in categories]
        check = numbers.get("tolerance_check") or {}
        wer = f"WER {ref} {numbers['wer']:.2f} ({numbers['wer_vs_fp32']:+.2f} vs fp32"
        wer += f", 95% CI [{check['ci_low']:+.2f}, {check['ci_high']:+.2f}])" if check else ")"
        undecided = check.get("state") == UNDECIDED and any(c != "most_robust" for c in categories)
        line = f"{_title(categories, layout, undecided)}: **{recipe}**, {', '.join([*parts, wer])}."
        if "fastest" in categories:
            line += _speed_caveats(g["fastest"])
        if undecided:
            line += " " + _undecided(recipe, check, tol)
        lines.append(line)
    for a in g["avoid"]:
        lines.append(f"Avoid **{a['recipe']}**: {'; '.join(a['reasons'])}.")
    if not g["avoid"]:
        lines.append("No recipe is significantly worse than fp32 or dominated on all three axes.")
    return lines


def _tolerance_sentence(g: dict[str, Any], ref: str) -> str:
    tol, fp32 = g["tolerance"], g["fp32"]
    checks = g["tolerance_checks"]

    def listed(state: str, needed: bool = False) -> str:
        items = []
        for c in (c for c in checks if c["state"] == state):
            extra = f"; {c['utterances_needed']:,} utterances would tell" if needed and c["utterances_needed"] else ""
            items.append(
                f"{c['recipe']} ({c['wer_difference']:+.2f}, CI [{c['ci_low']:+.2f}, {c['ci_high']:+.2f}]{extra})"
            )
        return ", ".join(items) or "none"

    line = (
        f"Tolerance: WER on {ref} at most fp32 + {_points(tol)} ({fp32['wer']:.2f} + {tol:g} = "
        f"{fp32['wer'] + tol:.2f}), judged by the upper end of the paired 95% CI of the difference from fp32 "
        f"(n = {max((c['n_utterances'] for c in checks), default=0)}). Within it: {listed(WITHIN)}."
    )
    if any(c["state"] == UNDECIDED for c in checks):
        line += (
            f" Undecided, the CI containing +{tol:g} (this sample cannot tell whether they are within; "
            f"ranked with those within, as the data does not show them worse by more): {listed(UNDECIDED, True)}."
        )
    if any(c["state"] == EXCEEDS for c in checks):
        line += f" Beyond it (the whole CI above +{tol:g}): {listed(EXCEEDS)}."
    return line


def _title(categories: list[str], layout: Layout, undecided: bool) -> str:
    ranked = [CATEGORY_WORDS[c] for c in categories if c != "most_robust"]
    robust = f"most robust on {layout.label(layout.pair[1])}" if "most_robust" in categories and layout.pair else ""
    if not ranked:
        return robust.capitalize()
    words = ranked[0] if len(ranked) == 1 else f"{ranked[0]} and {ranked[1]}"
    title = f"{words.capitalize()} quantized recipe within tolerance"
    title += " as far as this sample can tell" if undecided else ""
    return f"{title}, and the {robust}" if robust else title


def _fastest_part(f: dict[str, Any], fp32: dict[str, Any], layout: Layout) -> str:
    return f"RTF {_rtf_text(f)} vs fp32 {_rtf_text(fp32)} ({f['speedup']:.2f}x)"


def _smallest_part(s: dict[str, Any], fp32: dict[str, Any], layout: Layout) -> str:
    return (
        f"{s['size_bytes'] / 1e6:.1f} MB ({_percent(-s['size_reduction'])} vs fp32, {_percent(s['size_vs_fp16'])} "
        f"vs fp16)"
    )


def _robust_part(r: dict[str, Any], fp32: dict[str, Any], layout: Layout) -> str:
    easy, hard = (layout.label(d) for d in layout.pair)
    text = f"WER increase {hard} - {easy} {r['wer_increase']:+.2f} points (fp32 {fp32['wer_increase']:+.2f}"
    versus = r.get("increase_vs_fp32")
    if versus:
        low, high = versus["ci_low"], versus["ci_high"]
        noise = ": not distinguishable from fp32's on these samples" if low <= 0 <= high else ""
        text += f"; the difference {versus['difference']:+.2f}, 95% CI [{low:+.2f}, {high:+.2f}]{noise}"
    return text + ")"


_CATEGORY_PARTS = {"fastest": _fastest_part, "smallest": _smallest_part, "most_robust": _robust_part}


def _speed_caveats(f: dict[str, Any]) -> str:
    text = " It is slower than fp32: none within tolerance speeds inference up here." if f["speedup"] < 1 else ""
    runner = f.get("runner_up")
    if runner and f["passes"] > 1 and runner["passes"] > 1 and f["rtf_high"] >= runner["rtf_low"]:
        text += f" Its RTF range overlaps that of {runner['recipe']} ({_rtf_text(runner)}): not clearly faster than it."
    return text


def _undecided(recipe: str, check: dict[str, Any], tol: float) -> str:
    needed = check["utterances_needed"]
    how = f"; about {needed:,} utterances would tell (80% power at 5%, the spread observed here)" if needed else ""
    return (
        f"The sample ({check['n_utterances']} utterances) cannot tell whether {recipe} is within the tolerance: its "
        f"95% CI [{check['ci_low']:+.2f}, {check['ci_high']:+.2f}] contains +{tol:g}{how}."
    )


def _rtf_text(numbers: dict[str, Any]) -> str:
    rtf = f"{numbers['rtf']:.3f}"
    return f"{rtf} ({numbers['rtf_low']:.3f}-{numbers['rtf_high']:.3f})" if numbers.get("passes", 0) > 1 else rtf


def _points(value: float) -> str:
    return f"{value:g} WER point{'' if value == 1 else 's'}"


def _percent(fraction: float) -> str:
    return "-" if fraction is None or math.isnan(fraction) else f"{100 * fraction:+.0f}%"


def format_rate(measure: Measure | None, value: str) -> str:
    """`wer` or `cer` of a measure with its 95% bootstrap CI: `4.65 [1.2, 8.9]`."""
    ci = getattr(measure, f"{value}_ci", None) if measure else None
    if ci is None:
        return "-"
    return f"{getattr(measure, value):.2f} [{ci.low:.1f}, {ci.high:.1f}]"


def format_rtfx(rtfx: float) -> str:
    return "-" if math.isnan(rtfx) else f"{rtfx:.0f}" if rtfx >= 100 else f"{rtfx:.1f}"


def _num(value: float, spec: str) -> str:
    return "-" if value is None or math.isnan(value) else format(value, spec)


def timed_batch_sizes(systems: Sequence[System], layout: Layout) -> list[int]:
    """Every batch size some system was timed at, the one its rows were transcribed at first."""
    first = [s.info["batch_size"] for s in systems if s.info.get("batch_size")]
    timed = [b for s in systems for b in s.speeds(layout.clean)]
    return list(dict.fromkeys([*first, *timed]))


def speed_cells(system: System, layout: Layout, sizes: Sequence[int]) -> list[str]:
    speeds = system.speeds(layout.clean)
    cells = []
    for size in sizes:
        speed = speeds.get(size)
        if speed is None:
            cells += ["-", "-"]
            continue
        spread = f" ({speed.low:.3f}-{speed.high:.3f})" if speed.passes > 1 else ""
        cells += [f"{speed.median:.3f}{spread}", format_rtfx(speed.rtfx)]
    return cells


def main_table(systems: Sequence[System], layout: Layout) -> Table:
    labels = [layout.label(d) for d in layout.clean]
    sizes = timed_batch_sizes(systems, layout)
    suffix = (lambda b: f" b{b}") if len(sizes) > 1 else (lambda b: "")
    headers = ["Recipe", *(f"WER {x}" for x in labels), *(f"CER {x}" for x in labels)]
    headers += [h for b in sizes for h in (f"RTF{suffix(b)}", f"RTFx{suffix(b)}")]
    headers += ["Size (MB)", "vs fp32", "vs fp16", "Bits/weight (linear)", "Status"]
    rows = []
    for s in systems:
        measures = [s.measures.get(d) for d in layout.clean]
        bits = s.info.get("linear_bits_per_weight")
        rows.append(
            [
                s.label,
                *(format_rate(m, "wer") for m in measures),
                *(format_rate(m, "cer") for m in measures),
                *speed_cells(s, layout, sizes),
                _num(s.size_bytes / 1e6, ".1f"),
                _percent(s.relative_size("fp32")),
                _percent(s.relative_size("fp16")),
                _num(bits if bits is not None else math.nan, ".3g"),
                s.status,
            ]
        )
    counts = {layout.label(d): _utterance_count(systems, d) for d in layout.clean}
    notes = [
        "WER and CER in %, corpus-level (total errors / total reference words or characters), Whisper's normalizer "
        "of the language (English, else its basic one); in brackets: 95% bootstrap CI, resampling utterances "
        "(10,000 resamples).",
        f"Utterances per dataset: {', '.join(f'{k} {v}' for k, v in counts.items())}.",
        _rtf_note(systems, layout, sizes, labels),
        "Size: bytes the library's own save path writes; vs fp32 / vs fp16: that size relative to the unquantized "
        f"model saved by transformers' save_pretrained in fp32{_baseline_sizes(systems)} and in fp16 (the precision "
        "OpenAI ships). "
        "Bits/weight: mean stored bits per weight of the linear layers.",
    ]
    notes += [note for s in systems if not s.baseline for note in [_precision_note(s)] if note]
    notes += [f"{s.label} ({s.status}): {s.error}" for s in systems if s.error]
    notes += [f"{s.label}: timing passes failed: {s.timing_error}" for s in systems if s.timing_error]
    for s in systems:
        differing = sum(speed.differing for speed in s.speeds(layout.clean).values())
        if differing:
            notes.append(f"{s.label}: {differing} hypotheses of its timing passes differ from the stored ones.")
    return Table(headers, rows, notes)


def _rtf_note(systems: Sequence[System], layout: Layout, sizes: Sequence[int], labels: list[str]) -> str:
    passes = sorted({speed.passes for s in systems for speed in s.speeds(layout.clean).values()})
    how_many = "-".join(str(p) for p in (passes[:1] + passes[-1:] if len(passes) > 1 else passes)) or "no"
    note = (
        f"RTF: compute seconds / decoded audio seconds pooled over {', '.join(labels)}, after an untimed warm-up "
        "batch; "
        "model loading and audio decoding excluded. RTFx = 1 / RTF, audio seconds transcribed per second (the Open "
        f"ASR Leaderboard's figure). Timed passes per recipe and batch size: {how_many}, the accuracy pass first, "
        "then timing passes over the same audio, interleaving the recipes pass by pass (every recipe's pass r "
        "before any pass r+1), each in a fresh worker; with several passes the RTF is their median, (min-max) "
        "beside it."
    )
    if passes == [1]:
        note += (
            " One pass each (the experiment's repeats = 1): no spread measured; a single pass on a shared "
            "machine can be off by tens of percent."
        )
    if len(sizes) > 1:
        note += (
            " "
            + "; ".join(f"b{b}: {b} utterance{'s' if b > 1 else ''} per call" for b in sizes)
            + (" (batch 1 is per-utterance latency, larger batches throughput).")
        )
    return note


def _baseline_sizes(systems: Sequence[System]) -> str:
    info = next((s.info for s in systems if s.info.get("fp32_size_bytes")), {})
    if not info:
        return ""
    fp16 = f", fp16 {info['fp16_size_bytes'] / 1e6:.1f} MB" if info.get("fp16_size_bytes") else ""
    return f" (fp32 {info['fp32_size_bytes'] / 1e6:.1f} MB{fp16})"


def _precision_note(s: System) -> str | None:
    """What of the model the recipe left in floating point (`unquantized`), or what the library says it kept."""
    info = s.info
    if info.get("unquantized") is not None:
        parts = info["unquantized"]
        return f"{s.label}: left unquantized: {'; '.join(parts)}." if parts else f"{s.label}: every weight quantized."
    if info.get("stored_dtypes"):
        stored = "; ".join(f"{k.replace('_', ' ')} {'/'.join(v)}" for k, v in info["stored_dtypes"].items() if v)
        return f"{s.label}: weights as CTranslate2 stored them: {stored}."
    pieces = []
    kept = info.get("kept_full_precision") or info.get("kept")
    if kept:
        dtype = info.get("kept_and_stem_dtype")
        pieces.append(f"kept unquantized{f' ({dtype}, with the conv stem)' if dtype else ''}: {', '.join(kept)}")
    head = info.get("lm_head") or info.get(HEAD)
    if head:
        pieces.append(f"LM head: {head}")
    return f"{s.label}: {'; '.join(pieces)}." if pieces else None


def _utterance_count(systems: Sequence[System], dataset: str) -> int:
    return max((len(s.measures[dataset].rows) for s in systems if dataset in s.measures), default=0)


def significance_table(comps: Sequence[Comparison], layout: Layout) -> Table:
    headers = ["Recipe", "Dataset", "WER diff. vs fp32", "95% CI", "p", "n", "Verdict"]
    rows = [
        [
            c.system.label,
            layout.label(c.dataset),
            f"{c.test.difference:+.2f}",
            f"[{c.test.low:+.2f}, {c.test.high:+.2f}]",
            format_p_value(c.test.p_value),
            str(c.test.n),
            c.verdict,
        ]
        for c in comps
    ]
    notes = [
        "WER difference in points (recipe minus fp32), utterances joined by id. p: two-sided paired permutation "
        "test (sign flips of per-utterance error differences, exact when few utterances differ). CI: paired "
        "bootstrap over utterances. Utterances that would tell: the standard sample-size formula for a paired "
        "difference (80% power at 5%), from the spread of per-utterance differences observed here."
    ]
    return Table(headers, rows, notes)


def claims_paragraph(comps: Sequence[Comparison], layout: Layout, paper: bool) -> str:
    """Whether any measured improvement over fp32 is real (the paper's "Quanto int8 beats fp32" kind of claim,
    named only in the paper presets)."""
    lower = [c for c in comps if c.test.difference < 0]
    intro = "A claim that a recipe beats fp32 needs a WER that is lower and significantly so in a paired test."
    if paper:
        intro = f"The paper reports Quanto int8 beating fp32 on test-other. {intro}"
    if not lower:
        return f"{intro} No recipe measured a lower WER than fp32 on any dataset here."
    parts = [
        f"{c.system.label} on {layout.label(c.dataset)} ({c.test.difference:+.2f} points, "
        f"{format_p(c.test.p_value)}: {'significant' if c.significant else 'not significant'})"
        for c in lower
    ]
    real = [c for c in lower if c.significant]
    verdict = (
        "The data supports an improvement only for: "
        + ", ".join(f"{c.system.label} on {layout.label(c.dataset)}" for c in real)
        if real
        else "None is significant at 5%: this data does not support a claim that any recipe beats fp32"
    )
    return f"{intro} Lower WER than fp32 was measured for: {'; '.join(parts)}. {verdict}."


def snr_tables(systems: Sequence[System], layout: Layout, comps: Sequence[Comparison]) -> list[Block]:
    significant = {(c.system.label, c.dataset) for c in comps if c.significant}
    blocks: list[Block] = []
    for (base, noise), snrs in snr_panels(layout).items():
        specs = [snr_spec(layout, base, noise, snr) for snr in [*snrs, None]]
        headers = ["Recipe", *(f"{snr:g} dB" for snr in snrs), "clean"]
        rows = [
            [s.label, *(_num(s.wer(d), ".2f") + ("*" if (s.label, d) in significant else "") for d in specs)]
            for s in systems
        ]
        notes = ["*: significantly different from fp32 at 5% (paired test, as above); the test is in results.json."]
        blocks += [Para(f"WER (%) on {panel_title(layout, base, noise)} ({noise}):"), Table(headers, rows, notes)]
    return blocks


def setup_bullets(ctx: ReportData) -> list[str]:
    systems, layout = ctx.systems, ctx.layout
    info = next((s.info for s in systems if s.info), {})
    items = [f"Models: {', '.join(dict.fromkeys(s.model for s in systems))}"]
    for key, name in (("device", "Device"), ("cpu", "CPU"), ("threads", "Threads"), ("batch_size", "Batch size")):
        if info.get(key) is not None:
            items.append(f"{name}: {info[key]}")
    versions = {k: v for k, v in (info.get("versions") or {}).items() if v}
    if versions:
        items.append("Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    calib = next((s.info.get("calibration_dataset") for s in systems if s.info.get("calibration_dataset")), None)
    if calib:
        items.append(f"Calibration set (static recipes): {calib}")
    items.append("Datasets: " + ", ".join(f"{layout.label(d)} = {d}" for d in layout.clean))
    items.append(
        f"Guidance: reference dataset {layout.label(layout.reference)} ({layout.reference_reason}); tolerance "
        f"{_points(ctx.tolerance)} (the experiment's `tolerance`, default {_points(DEFAULT_TOLERANCE)})"
    )
    return items


def build_blocks(ctx: ReportData) -> list[Block]:
    blocks: list[Block] = [Heading(ctx.title, 1), Bullets(setup_bullets(ctx))]
    blocks += [Heading("Results (Table 1 layout)"), main_table(ctx.systems, ctx.layout)]
    blocks += [Heading("Failure modes and long form")]
    blocks += [t for t in (failure_table(ctx.systems, ctx.layout), long_short_table(ctx.systems, ctx.layout)) if t]
    blocks += [Para(f"**Warning**: {w}.") for w in ctx.warnings]
    blocks += [Heading("Paired significance vs fp32")]
    if ctx.table_comparisons:
        blocks += [
            significance_table(ctx.table_comparisons, ctx.layout),
            Para(claims_paragraph(ctx.table_comparisons, ctx.layout, ctx.paper)),
        ]
    else:
        blocks.append(Para("No paired test: it needs a completed fp32 baseline and a completed recipe per dataset."))
    blocks += [Heading("Deployment guidance")]
    for g in ctx.guidance:
        if len(ctx.guidance) > 1:
            blocks.append(Para(f"Model {g['model']}:"))
        blocks.append(Bullets(guidance_sentences(g, ctx.layout)))
    blocks.append(Para(_guidance_rules(ctx)))
    blocks += [Heading("Figures")] + [FigureBlock(p) for p in ctx.plots]
    snr = snr_tables(ctx.systems, ctx.layout, ctx.comparisons)
    if snr:
        blocks += [Heading("WER vs SNR"), *snr]
    return blocks


def _guidance_rules(ctx: ReportData) -> str:
    layout = ctx.layout
    ref, tol = layout.label(layout.reference), ctx.tolerance
    robust = (
        f"most robust = smallest WER increase {layout.label(layout.pair[1])} - {layout.label(layout.pair[0])} (the "
        "paper's Figure 1), among every completed recipe; "
        if layout.pair
        else "no robustness ranking: it needs LibriSpeech test-clean and test-other in the experiment; "
    )
    return (
        f"Rules: the reference dataset is {ref} ({layout.reference_reason}). Within tolerance = the upper end of the "
        f"paired 95% bootstrap CI of the WER difference from fp32 on {ref} is at most +{tol:g}; undecided = "
        f"the CI contains +{tol:g}; beyond = its lower end is above +{tol:g}. Fastest = lowest median RTF (at the "
        "batch size the rows were transcribed at) and smallest = smallest saved size, among the quantized recipes "
        f"within tolerance or undecided and not significantly worse than fp32 on {ref}; {robust}avoid = "
        "significantly worse than fp32 (paired test, 5%) on any dataset of "
        f"the table, or Pareto-dominated on WER ({ref}), size and RTF together as measured (another recipe no "
        "worse on any and better on one). Utterances that would tell: the standard sample-size "
        "formula for a paired difference (80% power at 5%) with the spread of per-utterance differences seen here."
    )


def table_csv(systems: Sequence[System], layout: Layout) -> str:
    """Raw (unformatted) numbers, one row per (model, recipe), for spreadsheets and scripts."""
    labels = [layout.label(d) for d in layout.clean]
    sizes = timed_batch_sizes(systems, layout)
    headers = ["model", "recipe", "status", "error"]
    for x in labels:
        headers += [f"wer_{x}", f"wer_{x}_low", f"wer_{x}_high", f"cer_{x}", f"cer_{x}_low", f"cer_{x}_high", f"n_{x}"]
    headers += ["rtf", "rtf_low", "rtf_high", "rtf_passes", "rtfx"]
    headers += [f"{k}_b{b}" for b in sizes for k in ("rtf", "rtf_low", "rtf_high", "rtf_passes")]
    headers += ["size_bytes", "fp32_size_bytes", "fp16_size_bytes", "size_reduction", "size_vs_fp16"]
    headers += ["linear_bits_per_weight"]
    rows = []
    for s in systems:
        cells: list[Any] = [s.model, s.recipe, s.status, s.error or ""]
        for d in layout.clean:
            m = s.measures.get(d)
            if m and m.wer_ci and m.cer_ci:
                cells += [m.wer, m.wer_ci.low, m.wer_ci.high, m.cer, m.cer_ci.low, m.cer_ci.high, len(m.rows)]
            else:
                cells += ["", "", "", "", "", "", 0]
        main, speeds = s.speed(layout.clean), s.speeds(layout.clean)
        cells += [main.median, main.low, main.high, main.passes, main.rtfx] if main else ["", "", "", 0, ""]
        for b in sizes:
            sp = speeds.get(b)
            cells += [sp.median, sp.low, sp.high, sp.passes] if sp else ["", "", "", 0]
        cells += [s.info.get("size_bytes", ""), s.info.get("fp32_size_bytes", ""), s.info.get("fp16_size_bytes", "")]
        cells += [s.size_reduction, s.relative_size("fp16"), s.info.get("linear_bits_per_weight", "")]
        rows.append(cells)
    return csv_text(headers, rows)


def _json_safe(value: Any) -> Any:
    """NaN and infinities are not JSON: write them as null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def system_dict(s: System, layout: Layout) -> dict[str, Any]:
    datasets = {}
    for spec, m in s.measures.items():
        datasets[spec] = {
            "label": layout.label(spec),
            "status": m.status,
            "error": m.error,
            **m.stats,
            "wer_ci": [m.wer_ci.low, m.wer_ci.high] if m.wer_ci else None,
            "cer_ci": [m.cer_ci.low, m.cer_ci.high] if m.cer_ci else None,
        }
    speeds = {
        str(b): {
            "rtf": sp.median,
            "rtf_min": sp.low,
            "rtf_max": sp.high,
            "rtfx": sp.rtfx,
            "rtfs": list(sp.rtfs),
            "rounds": list(sp.rounds),
            "busy_passes": sp.busy,
            "load_average_max": sp.load_average,
            "threads": sp.threads,
            "cpus": sp.cpus,
        }
        for b, sp in s.speeds(layout.clean).items()
    }
    return {
        "model": s.model,
        "recipe": s.recipe,
        "label": s.label,
        "baseline": s.baseline,
        "status": s.status,
        "error": s.error,
        "rtf": s.rtf(layout.clean),
        "speed_by_batch_size": speeds,
        "size_reduction": s.size_reduction,
        "linear_bits_per_weight": s.info.get("linear_bits_per_weight"),
        "size_bytes": s.info.get("size_bytes"),
        "fp32_size_bytes": s.info.get("fp32_size_bytes"),
        "fp16_size_bytes": s.info.get("fp16_size_bytes"),
        "unquantized": s.info.get("unquantized"),
        "recipe_spec": s.spec,
        "datasets": datasets,
    }


@dataclass
class ReportData:
    systems: list[System]
    layout: Layout
    experiment: dict[str, Any]
    comparisons: list[Comparison]  # on every dataset, noisy ones included
    guidance: list[dict[str, Any]]
    plots: list[Plot]
    tolerance: float
    warnings: list[str]

    @property
    def table_comparisons(self) -> list[Comparison]:
        return [c for c in self.comparisons if c.dataset in self.layout.clean]

    @property
    def paper(self) -> bool:
        """Whether to set the seed paper's claims beside the measured ones (the paper presets ask for it)."""
        return bool(self.experiment.get("paper_comparison"))

    @property
    def title(self) -> str:
        name = self.experiment.get("name")
        return (
            f"Whisper post-training quantization report: {name}"
            if name
            else "Whisper post-training quantization report"
        )

    def to_dict(self) -> dict[str, Any]:
        layout = self.layout
        return _json_safe(
            {
                "experiment": self.experiment,
                "datasets": {
                    "table": layout.clean,
                    "labels": layout.labels,
                    "reference": layout.reference,
                    "reference_reason": layout.reference_reason,
                    "figure_1": list(layout.pair) if layout.pair else None,
                },
                "rtf_pooled_over": layout.clean,
                "table": [system_dict(s, layout) for s in self.systems],
                "tests": [c.to_dict() for c in self.comparisons],
                "guidance": self.guidance,
                "warnings": self.warnings,
                "figures": [p.name for p in self.plots],
            }
        )


def analyse(results: Iterable[dict[str, Any]], experiment: dict[str, Any] | None = None) -> ReportData:
    experiment = dict(experiment or {})
    systems = build_systems(results)
    if not systems:
        raise ValueError("no results to report")
    layout = Layout.of(systems, experiment.get("labels"), experiment.get("reference_dataset"))
    tolerance = float(experiment.get("tolerance", DEFAULT_TOLERANCE))
    comps = all_comparisons(systems, [*layout.clean, *(i.spec for i in layout.noisy)])
    # "Avoid" judges the table's datasets; the noisy variants have their own section.
    advice = guidance(systems, layout, [c for c in comps if c.dataset in layout.clean], tolerance)
    colors = colors_of(systems)
    figures = (figure_datasets, figure_increase, figure_tradeoffs, figure_snr)
    plots = [p for p in (figure(systems, layout, colors) for figure in figures) if p]
    warnings = [w for w in [busy_timing(systems, layout)] if w]
    return ReportData(systems, layout, experiment, comps, advice, plots, tolerance, warnings)


def write_report(
    out_dir: Path | str, results: Iterable[dict[str, Any]], experiment: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Write the report files into out_dir and return the results.json content.

    Everything is rendered in memory first, then each file is written to a temp name and renamed over the
    old one, so a crash at any point leaves either the previous complete file or the new one, never a half.
    """
    data = analyse(results, experiment)
    blocks = build_blocks(data)
    summary = data.to_dict()
    files: dict[str, bytes] = {p.name: p.png for p in data.plots}
    files["table.csv"] = table_csv(data.systems, data.layout).encode()
    files["results.json"] = (strict_json(summary, indent=2) + "\n").encode()
    files["report.md"] = render_markdown(blocks).encode()
    files["report.html"] = render_html(blocks, data.title).encode()
    out = Path(out_dir)
    atomic_write_files(out, files)
    for stale in out.glob("fig_*.png"):  # figures of an earlier report that this one no longer has
        if stale.name not in files:
            stale.unlink()
    return summary
