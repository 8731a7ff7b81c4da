"""The bench report: report.md, a self-contained report.html, table.csv, results.json and fig_*.png, written
from the results contract (one dict per (model, recipe, dataset) task, see `results.store.Store.results`)."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from whisper_ptq.files import atomic_write_files
from whisper_ptq.report.analysis import (
    DEFAULT_TOLERANCE,
    Comparison,
    Layout,
    Measure,
    System,
    all_comparisons,
    build_systems,
    guidance,
    parse_dataset,
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
    figure_increase,
    figure_snr,
    figure_tradeoffs,
    panel_title,
    snr_panels,
    snr_spec,
)
from whisper_ptq.report.tables import Table, csv_text, format_p, format_p_value


def guidance_sentences(g: dict[str, Any], layout: Layout) -> list[str]:
    if "note" in g:
        return [g["note"]]
    ref, tol = parse_dataset(g["reference_dataset"]).label, g["tolerance"]
    fp32 = g["fp32"]
    lines = [
        f"Tolerance: WER on {ref} at most fp32 + {tol:g} points ({fp32['wer']:.2f} + {tol:g} = "
        f"{fp32['wer'] + tol:.2f}); within it: {', '.join(g['within_tolerance']) or 'no quantized recipe'}."
    ]
    if g["fastest"]:
        f = g["fastest"]
        lines.append(
            f"Fastest quantized recipe within tolerance: **{f['recipe']}**, RTF {f['rtf']:.3f} vs fp32 "
            f"{fp32['rtf']:.3f} ({f['speedup']:.2f}x), WER {ref} {f['wer']:.2f} ({f['wer_vs_fp32']:+.2f} vs fp32)."
            + (" It is slower than fp32: none within tolerance speeds inference up here." if f["speedup"] < 1 else "")
        )
    if g["smallest"]:
        s = g["smallest"]
        lines.append(
            f"Smallest within tolerance: **{s['recipe']}**, size reduction {s['size_reduction']:.0%}, "
            f"WER {ref} {s['wer']:.2f} ({s['wer_vs_fp32']:+.2f} vs fp32)."
        )
    if g["most_robust"]:
        r = g["most_robust"]
        how = (
            f"WER increase {ref} - {parse_dataset(layout.easy).label} {r['wer_increase']:+.2f} points "
            f"(fp32 {fp32['wer_increase']:+.2f})"
            if layout.easy
            else f"WER {ref} {r['wer_vs_fp32']:+.2f} vs fp32"
        )
        lines.append(f"Most robust on {ref}: **{r['recipe']}**, {how}, WER {ref} {r['wer']:.2f}.")
    for a in g["avoid"]:
        lines.append(f"Avoid **{a['recipe']}**: {'; '.join(a['reasons'])}.")
    if not g["avoid"]:
        lines.append("No recipe is significantly worse than fp32 or dominated on all three axes.")
    return lines


def format_wer(measure: Measure | None) -> str:
    if measure is None or not measure.wer_ci:
        return "-"
    ci = measure.wer_ci
    return f"{measure.wer:.2f} [{ci.low:.1f}, {ci.high:.1f}]"


def _num(value: float, spec: str) -> str:
    return "-" if value is None or math.isnan(value) else format(value, spec)


def main_table(systems: Sequence[System], layout: Layout) -> Table:
    labels = [parse_dataset(d).label for d in layout.clean]
    headers = ["Recipe", *(f"WER {x}" for x in labels), *(f"CER {x}" for x in labels)]
    headers += ["RTF", "Size red.", "Size / fp16", "Bits/weight (linear)", "Status"]
    rows = []
    for s in systems:
        measures = [s.measures.get(d) for d in layout.clean]
        bits = s.info.get("linear_bits_per_weight")
        rows.append(
            [
                s.label,
                *(format_wer(m) for m in measures),
                *(_num(m.cer if m else math.nan, ".2f") for m in measures),
                _num(s.rtf(layout.clean), ".3f"),
                _num(100 * s.size_reduction, ".0f") + ("%" if not math.isnan(s.size_reduction) else ""),
                _num(s.size_vs_fp16, ".2f"),
                _num(bits if bits is not None else math.nan, ".3g"),
                s.status,
            ]
        )
    counts = {parse_dataset(d).label: _utterance_count(systems, d) for d in layout.clean}
    notes = [
        "WER and CER in %, corpus-level (total errors / total reference words or characters), Whisper English "
        "normalizer; WER in brackets: 95% bootstrap CI, resampling utterances (10,000 resamples).",
        f"Utterances per dataset: {', '.join(f'{k} {v}' for k, v in counts.items())}.",
        f"RTF: compute seconds / audio seconds pooled over {', '.join(labels)} (the mean of the per-dataset RTFs "
        "weighted by audio duration); model loading and audio decoding excluded.",
        "Size red.: 1 - saved size / fp32 saved size. Size / fp16: saved size over the fp16 model's, the form "
        "OpenAI ships Whisper in. Bits/weight: mean stored bits per weight of the linear layers.",
    ]
    notes += [f"{s.label} ({s.status}): {s.error}" for s in systems if s.error]
    return Table(headers, rows, notes)


def _utterance_count(systems: Sequence[System], dataset: str) -> int:
    return max((len(s.measures[dataset].rows) for s in systems if dataset in s.measures), default=0)


def significance_table(comps: Sequence[Comparison]) -> Table:
    headers = ["Recipe", "Dataset", "WER diff. vs fp32", "95% CI", "p", "n", "Verdict"]
    rows = [
        [
            c.system.label,
            parse_dataset(c.dataset).label,
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
        "bootstrap over utterances."
    ]
    return Table(headers, rows, notes)


def claims_paragraph(comps: Sequence[Comparison]) -> str:
    """Whether any measured improvement over fp32 is real: the paper's "Quanto int8 beats fp32" kind of claim."""
    lower = [c for c in comps if c.test.difference < 0]
    intro = (
        "The paper reports Quanto int8 beating fp32 on test-other. A claim that a recipe beats fp32 needs a WER "
        "that is lower and significantly so in a paired test."
    )
    if not lower:
        return f"{intro} No recipe measured a lower WER than fp32 on any dataset here."
    parts = [
        f"{c.system.label} on {parse_dataset(c.dataset).label} ({c.test.difference:+.2f} points, "
        f"{format_p(c.test.p_value)}: {'significant' if c.significant else 'not significant'})"
        for c in lower
    ]
    real = [c for c in lower if c.significant]
    verdict = (
        "The data supports an improvement only for: "
        + ", ".join(f"{c.system.label} on {parse_dataset(c.dataset).label}" for c in real)
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
        blocks += [Para(f"WER (%) on {panel_title(base, noise)} ({noise}):"), Table(headers, rows, notes)]
    return blocks


def setup_bullets(systems: Sequence[System]) -> list[str]:
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
    return items


def build_blocks(ctx: ReportData) -> list[Block]:
    blocks: list[Block] = [Heading(ctx.title, 1), Bullets(setup_bullets(ctx.systems))]
    blocks += [Heading("Results (Table 1 layout)"), main_table(ctx.systems, ctx.layout)]
    blocks += [Heading("Paired significance vs fp32")]
    if ctx.table_comparisons:
        blocks += [significance_table(ctx.table_comparisons), Para(claims_paragraph(ctx.table_comparisons))]
    else:
        blocks.append(Para("No paired test: it needs a completed fp32 baseline and a completed recipe per dataset."))
    blocks += [Heading("Deployment guidance")]
    for g in ctx.guidance:
        if len(ctx.guidance) > 1:
            blocks.append(Para(f"Model {g['model']}:"))
        blocks.append(Bullets(guidance_sentences(g, ctx.layout)))
    blocks.append(Para(_guidance_rules(ctx.layout)))
    blocks += [Heading("Figures")] + [FigureBlock(p) for p in ctx.plots]
    snr = snr_tables(ctx.systems, ctx.layout, ctx.comparisons)
    if snr:
        blocks += [Heading("WER vs SNR"), *snr]
    return blocks


def _guidance_rules(layout: Layout) -> str:
    hard = parse_dataset(layout.hard).label
    robust = (
        f"smallest WER increase {hard} - {parse_dataset(layout.easy).label}"
        if layout.easy
        else f"smallest WER increase vs fp32 on {hard}"
    )
    return (
        f"Rules: the reference dataset is {hard}; fastest = lowest RTF and smallest = highest size reduction among "
        f"completed recipes within the tolerance; most robust = {robust}; avoid = significantly worse than fp32 "
        "(paired test, 5%) on any dataset of the table, or Pareto-dominated on WER, size and RTF together."
    )


def table_csv(systems: Sequence[System], layout: Layout) -> str:
    """Raw (unformatted) numbers, one row per (model, recipe), for spreadsheets and scripts."""
    labels = [parse_dataset(d).label for d in layout.clean]
    headers = ["model", "recipe", "status", "error"]
    headers += [h for x in labels for h in (f"wer_{x}", f"wer_{x}_low", f"wer_{x}_high", f"cer_{x}", f"n_{x}")]
    headers += ["rtf", "size_reduction", "size_vs_fp16", "linear_bits_per_weight"]
    rows = []
    for s in systems:
        cells: list[Any] = [s.model, s.recipe, s.status, s.error or ""]
        for d in layout.clean:
            m = s.measures.get(d)
            ci = m.wer_ci if m else None
            cells += [m.wer, ci.low, ci.high, m.cer, len(m.rows)] if m and ci else ["", "", "", "", 0]
        cells += [s.rtf(layout.clean), s.size_reduction, s.size_vs_fp16, s.info.get("linear_bits_per_weight", "")]
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
        ci = m.wer_ci
        datasets[spec] = {
            "status": m.status,
            "error": m.error,
            **m.stats,
            "wer_ci": [ci.low, ci.high] if ci else None,
        }
    return {
        "model": s.model,
        "recipe": s.recipe,
        "label": s.label,
        "baseline": s.baseline,
        "status": s.status,
        "error": s.error,
        "rtf": s.rtf(layout.clean),
        "size_reduction": s.size_reduction,
        "linear_bits_per_weight": s.info.get("linear_bits_per_weight"),
        "size_bytes": s.info.get("size_bytes"),
        "fp32_size_bytes": s.info.get("fp32_size_bytes"),
        "fp16_size_bytes": s.info.get("fp16_size_bytes"),
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

    @property
    def table_comparisons(self) -> list[Comparison]:
        return [c for c in self.comparisons if c.dataset in self.layout.clean]

    @property
    def title(self) -> str:
        name = self.experiment.get("name")
        return (
            f"Whisper post-training quantization report: {name}"
            if name
            else "Whisper post-training quantization report"
        )

    def to_dict(self) -> dict[str, Any]:
        return _json_safe(
            {
                "experiment": self.experiment,
                "datasets": {"table": self.layout.clean, "reference": self.layout.hard, "easy": self.layout.easy},
                "rtf_pooled_over": self.layout.clean,
                "table": [system_dict(s, self.layout) for s in self.systems],
                "tests": [c.to_dict() for c in self.comparisons],
                "guidance": self.guidance,
                "figures": [p.name for p in self.plots],
            }
        )


def analyse(results: Iterable[dict[str, Any]], experiment: dict[str, Any] | None = None) -> ReportData:
    experiment = dict(experiment or {})
    systems = build_systems(results)
    if not systems:
        raise ValueError("no results to report")
    layout = Layout.of(systems)
    tolerance = float(experiment.get("tolerance", DEFAULT_TOLERANCE))
    comps = all_comparisons(systems, [*layout.clean, *(i.spec for i in layout.noisy)])
    # "Avoid" judges the table's datasets; the noisy variants have their own section.
    advice = guidance(systems, layout, [c for c in comps if c.dataset in layout.clean], tolerance)
    colors = colors_of(systems)
    plots = [figure(systems, layout, colors) for figure in (figure_increase, figure_tradeoffs, figure_snr)]
    return ReportData(systems, layout, experiment, comps, advice, [p for p in plots if p])


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
    files["results.json"] = (json.dumps(summary, indent=2, default=str) + "\n").encode()
    files["report.md"] = render_markdown(blocks).encode()
    files["report.html"] = render_html(blocks, data.title).encode()
    out = Path(out_dir)
    atomic_write_files(out, files)
    for stale in out.glob("fig_*.png"):  # figures of an earlier report that this one no longer has
        if stale.name not in files:
            stale.unlink()
    return summary
