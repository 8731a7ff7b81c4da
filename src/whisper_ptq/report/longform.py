"""Report tables on how recognition fails and on long recordings: word substitutions / deletions / insertions
and runaway utterances of each recipe on each dataset, and each joined dataset (`+concat`) beside the same
audio scored utterance by utterance, so that "does quantization hurt long-form more than short clips" is read
off one table. Every figure is `results.rows.summarize` of the rows concerned."""

from __future__ import annotations

import math
from collections.abc import Sequence

from whisper_ptq.data.specs import parse_dataset_spec
from whisper_ptq.report.analysis import Layout, System
from whisper_ptq.report.tables import Table
from whisper_ptq.results.rows import UtteranceResult, summarize


def failure_table(systems: Sequence[System], layout: Layout) -> Table | None:
    headers = ["Recipe", "Dataset", "WER", "Subst.", "Del.", "Ins.", "Runaways", "Utt. > 30 s", "Audio decoded (s)"]
    rows = []
    for system in systems:
        for dataset in layout.clean:
            measure = system.measures.get(dataset)
            if measure is None or not measure.rows:
                continue
            f = summarize(measure.rows)
            rows.append(
                [
                    system.label,
                    layout.label(dataset),
                    f"{f['wer']:.2f}",
                    *(str(f[k]) for k in ("substitutions", "deletions", "insertions", "runaways", "long_utterances")),
                    f"{f['decoded_seconds']:.1f} of {f['audio_seconds']:.1f}",
                ]
            )
    if not rows:
        return None
    notes = [
        "Word-level substitutions, deletions and insertions (jiwer, after normalization); WER = their sum over the "
        "reference words.",
        "Runaways: utterances where a decoding window stopped at the token limit instead of its end-of-text, or with "
        "more inserted words than the reference has (loops, hallucinations).",
        "Utt. > 30 s: utterances longer than Whisper's 30 s window, transcribed whole by OpenAI's sequential "
        "long-form decoding.",
    ]
    return Table(headers, rows, notes)


def long_short_table(systems: Sequence[System], layout: Layout) -> Table | None:
    """Each joined dataset whose unjoined version was evaluated too: WER of the recordings and of their clips."""
    pairs = [
        (spec, parsed.unjoined)
        for spec in layout.clean
        if (parsed := parse_dataset_spec(spec)).concat is not None and parsed.unjoined in layout.clean
    ]
    headers = ["Recipe", "Recordings", "n", "WER long", "WER same clips", "Long - clips", "Runaways long / clips"]
    rows = []
    for system in systems:
        for joined, clips in pairs:
            long_measure, short_measure = system.measures.get(joined), system.measures.get(clips)
            if not (long_measure and long_measure.rows and short_measure and short_measure.rows):
                continue
            recordings, members = covered(long_measure.rows, short_measure.rows)
            if not recordings:
                continue
            long, short = summarize(recordings), summarize(members)
            rows.append(
                [
                    system.label,
                    layout.label(joined),
                    f"{len(recordings)} ({len(members)} clips, {long['audio_seconds'] / len(recordings):.0f} s each)",
                    f"{long['wer']:.2f}",
                    f"{short['wer']:.2f}",
                    _signed(long["wer"] - short["wer"]),
                    f"{long['runaways']} / {short['runaways']}",
                ]
            )
    if not rows:
        return None
    notes = [
        "The same audio twice: joined into recordings (consecutive utterances, a short pause between them) and "
        "decoded in long form, and utterance by utterance; only recordings whose every clip was scored count.",
    ]
    return Table(headers, rows, notes)


def covered(
    recordings: Sequence[UtteranceResult], clips: Sequence[UtteranceResult]
) -> tuple[list[UtteranceResult], list[UtteranceResult]]:
    """The recordings whose clips are all among `clips`, and those clips. A joined recording's id is
    `<first clip id>..<last clip id>` of consecutive clips in id order (`data.modifiers.ConcatModifier`); a
    recording of one clip has the clip's id."""
    ordered = sorted(clips, key=lambda r: r.id)
    ids = [r.id for r in ordered]
    kept: list[UtteranceResult] = []
    members: list[UtteranceResult] = []
    for recording in recordings:
        first, _, last = recording.id.partition("..")
        if first not in ids or (last or first) not in ids:
            continue
        start, end = ids.index(first), ids.index(last or first)
        kept.append(recording)
        members.extend(ordered[start : end + 1])
    return kept, members


def _signed(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:+.2f}"
