"""Speed of recipes relative to fp32, measured in ONE run so that a shared, noisy machine cancels out.

    python benchmarks/speed.py --model base --recipes fp32 fast-cpu --dataset librispeech:test-other \
        --data-root ../shared/data --batch-sizes 1 8 --repeats 3 --threads 2 --json speed.json

What it measures, per recipe and batch size, on the same preloaded audio:
- RTF: transcription time (feature extraction + generate + decode, as `Quantized.transcribe_timed` times it)
  over audio duration. The recipes are interleaved batch by batch (A B A B ...), so drift hits all alike;
  each repeat gives one RTF per recipe, and its ratio to the first recipe (the baseline) is taken within that
  repeat. min / median / max over the repeats.
- WER of the first repeat's hypotheses, and how many hypotheses differ between batch sizes.
- evaluator overhead: wall time of `Quantized.evaluate` (audio decoding, warm-up batch, scoring included) over
  a bare loop of `transcriber.transcribe` on preloaded audio, the two interleaved, median ratio.
- peak memory: the peak RSS of a fresh process that only opens the recipe's session (load, quantize,
  compile) and transcribes one batch of the largest size; each recipe in its own process.
- quantize and compile seconds, from the session's info.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from whisper_ptq.backends import get_recipe
from whisper_ptq.data import SAMPLE_RATE, Dataset, open_dataset
from whisper_ptq.evaluation import Quantized
from whisper_ptq.results.environment import cpu_model, peak_rss_bytes
from whisper_ptq.results.metrics import corpus_rates, score_utterance
from whisper_ptq.settings import Settings


@dataclass
class Timings:
    """Seconds per (recipe, batch size), one entry per repeat; hypotheses of the first repeat."""

    seconds: dict[tuple[str, int], list[float]] = field(default_factory=dict)
    texts: dict[tuple[str, int], list[str]] = field(default_factory=dict)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="base")
    p.add_argument("--recipes", nargs="+", default=["fp32", "fast-cpu"], help="the first one is the baseline")
    p.add_argument("--dataset", default="librispeech:test-other")
    p.add_argument("--data-root", type=Path, default=None)
    p.add_argument("--limit", type=int, default=None, help="first N utterances (all by default)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--overhead-repeats", type=int, default=2, help="evaluate/bare pairs per recipe (0: skip)")
    p.add_argument("--overhead-batch-size", type=int, default=None, help="default: the largest batch size")
    p.add_argument("--no-memory", action="store_true", help="skip the per-recipe peak-memory processes")
    p.add_argument("--json", type=Path, default=None, help="also write every number here")
    return p.parse_args()


def batches(items: list[Any], size: int) -> list[list[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def open_sessions(args: argparse.Namespace, settings: Settings) -> dict[str, Quantized]:
    sessions = {}
    for name in args.recipes:
        start = time.perf_counter()
        sessions[name] = Quantized.build(args.model, get_recipe(name), settings)
        print(f"opened {name} in {time.perf_counter() - start:.1f} s", flush=True)
    return sessions


def warm_up(sessions: dict[str, Quantized], audios: list[np.ndarray], sizes: list[int]) -> None:
    for session in sessions.values():
        for size in sizes:
            session.transcribe_timed(audios[:size])


def time_interleaved(
    sessions: dict[str, Quantized], audios: list[np.ndarray], sizes: list[int], repeats: int
) -> Timings:
    """Every batch is transcribed by every recipe in turn before the next batch starts."""
    timings = Timings()
    for repeat in range(repeats):
        for size in sizes:
            totals = dict.fromkeys(sessions, 0.0)
            for batch in batches(audios, size):
                for name, session in sessions.items():
                    texts, seconds = session.transcribe_timed(batch)
                    totals[name] += seconds
                    if repeat == 0:
                        timings.texts.setdefault((name, size), []).extend(t.text.strip() for t in texts)
            for name, seconds in totals.items():
                timings.seconds.setdefault((name, size), []).append(seconds)
        print(f"repeat {repeat + 1}/{repeats} done", flush=True)
    return timings


def spread(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def speed_rows(timings: Timings, names: list[str], sizes: list[int], audio_s: float, refs: list[str]) -> list[dict]:
    baseline = names[0]
    rows = []
    for name in names:
        for size in sizes:
            seconds = timings.seconds[(name, size)]
            ratios = [b / s for b, s in zip(timings.seconds[(baseline, size)], seconds, strict=True)]
            wer, _ = corpus_rates(score_utterance(r, h) for r, h in zip(refs, timings.texts[(name, size)], strict=True))
            rows.append(
                {
                    "recipe": name,
                    "batch_size": size,
                    "rtf": spread([s / audio_s for s in seconds]),
                    "speedup_vs_" + baseline: spread(ratios),
                    "wer": wer,
                }
            )
    return rows


def batch_consistency(timings: Timings, names: list[str], sizes: list[int]) -> dict[str, int]:
    """Per recipe: hypotheses that differ between the first batch size and any other."""
    return {
        name: sum(
            any(timings.texts[(name, s)][i] != first for s in sizes[1:])
            for i, first in enumerate(timings.texts[(name, sizes[0])])
        )
        for name in names
    }


def evaluator_overhead(session: Quantized, dataset: Dataset, audios: list[np.ndarray], size: int, repeats: int) -> dict:
    """Wall time of `Quantized.evaluate` over that of a bare transcribe loop on preloaded audio, interleaved."""
    transcriber = session.built.transcriber
    ratios, evaluate_s, bare_s = [], [], []
    for _ in range(repeats):
        start = time.perf_counter()
        session.evaluate(dataset, batch_size=size, progress=False)
        evaluate_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        for batch in batches(audios, size):
            transcriber.transcribe(batch)
        bare_s.append(time.perf_counter() - start)
        ratios.append(evaluate_s[-1] / bare_s[-1])
    return {"batch_size": size, "evaluate_s": evaluate_s, "bare_s": bare_s, "ratio": spread(ratios)}


def _peak_memory_child(queue: Any, model: str, recipe: str, settings: Settings, audios: list[np.ndarray]) -> None:
    session = Quantized.build(model, get_recipe(recipe), settings)
    session.transcribe_timed(audios)
    queue.put(peak_rss_bytes())


def peak_memory(model: str, recipe: str, settings: Settings, audios: list[np.ndarray]) -> int:
    """Peak RSS of a fresh process that opens the session and transcribes `audios` as one batch."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=_peak_memory_child, args=(queue, model, recipe, settings, audios))
    child.start()
    peak = queue.get()
    child.join()
    return peak


def print_report(report: dict[str, Any]) -> None:
    baseline = report["recipes"][0]
    key = "speedup_vs_" + baseline
    print(
        f"\n{report['model']} on {report['dataset']}: {report['utterances']} utterances, {report['audio_s']:.0f} s "
        f"of audio, {report['threads']} threads, {report['repeats']} repeats (interleaved by batch)"
    )
    print(
        f"{'recipe':<22}{'batch':>6}{'RTF min':>10}{'median':>9}{'max':>9}   "
        f"{'x vs ' + baseline + ' min':>16}{'median':>8}{'max':>8}{'WER':>8}{'dWER':>7}"
    )
    base_wer = {r["batch_size"]: r["wer"] for r in report["speed"] if r["recipe"] == baseline}
    for r in report["speed"]:
        rtf, ratio = r["rtf"], r[key]
        print(
            f"{r['recipe']:<22}{r['batch_size']:>6}{rtf['min']:>10.4f}{rtf['median']:>9.4f}{rtf['max']:>9.4f}   "
            f"{ratio['min']:>16.2f}{ratio['median']:>8.2f}{ratio['max']:>8.2f}"
            f"{r['wer']:>8.2f}{r['wer'] - base_wer[r['batch_size']]:>+7.2f}"
        )
    print("\nhypotheses differing between batch sizes:", report["batch_differences"])
    for name, facts in report["sessions"].items():
        print(
            f"{name}: quantize {facts['quantize_seconds']:.1f} s, compile {facts['compile_seconds']}, "
            f"peak RSS {facts['peak_rss_mb']}"
        )
    for name, o in report["evaluator_overhead"].items():
        print(
            f"evaluator overhead {name} (batch {o['batch_size']}): evaluate/bare median {o['ratio']['median']:.3f} "
            f"(min {o['ratio']['min']:.3f}, max {o['ratio']['max']:.3f}); "
            f"evaluate {[round(s, 2) for s in o['evaluate_s']]} s, bare {[round(s, 2) for s in o['bare_s']]} s"
        )


def main() -> None:
    args = parse_args()
    settings = Settings(threads=args.threads, data_root=args.data_root, progress=False)
    dataset = open_dataset(args.dataset, args.data_root).limit(args.limit)
    audios = [dataset.load_audio(u) for u in dataset.utterances]
    refs = [u.text for u in dataset.utterances]
    audio_s = sum(len(a) for a in audios) / SAMPLE_RATE
    sizes = args.batch_sizes
    memory = (
        {} if args.no_memory else {n: peak_memory(args.model, n, settings, audios[: max(sizes)]) for n in args.recipes}
    )
    sessions = open_sessions(args, settings)
    warm_up(sessions, audios, sizes)
    timings = time_interleaved(sessions, audios, sizes, args.repeats)
    overhead_size = args.overhead_batch_size or max(sizes)
    report = {
        "model": args.model,
        "dataset": args.dataset,
        "utterances": len(audios),
        "audio_s": audio_s,
        "threads": args.threads,
        "repeats": args.repeats,
        "recipes": args.recipes,
        "speed": speed_rows(timings, args.recipes, sizes, audio_s, refs),
        "batch_differences": batch_consistency(timings, args.recipes, sizes),
        "evaluator_overhead": {
            name: evaluator_overhead(session, dataset, audios, overhead_size, args.overhead_repeats)
            for name, session in sessions.items()
        }
        if args.overhead_repeats
        else {},
        "sessions": {
            name: {
                "quantize_seconds": s.info["quantize_seconds"],
                "compile_seconds": s.info.get("compile_seconds"),
                "peak_rss_mb": round(memory[name] / 2**20) if name in memory else None,
                "knobs": {k: s.info.get(k) for k in ("engine", "lm_head", "attention", "decoder_threads", "compiled")},
            }
            for name, s in sessions.items()
        },
        "cpu": cpu_model(),
    }
    print_report(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
