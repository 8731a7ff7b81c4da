"""Speed of recipes relative to fp32, measured in ONE run so that a shared, noisy machine cancels out.

    python benchmarks/speed.py --model base --recipes fp32 fast-cpu ct2-int8 ov-int8 ort-int8 whispercpp-q8_0 \
        --dataset librispeech:test-other --data-root ../shared/data --batch-sizes 1 8 --repeats 3 --json speed.json
    python benchmarks/speed.py --cpu-class avx2 ...   # an AVX2 CPU's kernels on a bigger one (ISA caps)

What it measures, per recipe and batch size, on the same preloaded audio:
- RTF and RTFx: transcription time (feature extraction + decoding, as `Quantized.transcribe_timed` times it)
  over audio duration, and its inverse. Each recipe transcribes all the audio in a pass; passes alternate
  between recipes, in reversed order every other repeat (see `time_interleaved`), and each repeat's ratio to the
  first recipe (the baseline) is taken within that repeat. min / median / max over the repeats. Each recipe's
  session lives in its own worker process (see `RecipeWorker`): runtimes in one process slow each other.
- at batch 1, the same per utterance-length bucket (Whisper pads every window to 30 s: short clips pay the whole
  encoder), and how many times faster `--subject` (fast-cpu) is than every other recipe.
- WER of the first repeat's hypotheses, and how many hypotheses differ between batch sizes.
- evaluator overhead: wall time of `Quantized.evaluate` (audio decoding, warm-up batch, scoring included) over
  a bare loop of `transcriber.transcribe` on preloaded audio, the two interleaved, median ratio.
- peak memory: the peak RSS of a fresh process that only opens the recipe's session (load, quantize,
  compile) and transcribes one batch of the largest size; each recipe in its own process.
- quantize seconds (a runtime's graph compile included), from the session's info; the CPU, its class, flags
  and any ISA caps.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from whisper_ptq.results.environment import FORCE_CLASS_ENV, cpu_class, cpu_flags, force_cpu_class_of, isa_caps

force_cpu_class_of(sys.argv)  # before torch loads: the libraries read their ISA caps once

import numpy as np  # noqa: E402

from whisper_ptq.backends import get_recipe  # noqa: E402
from whisper_ptq.data import SAMPLE_RATE, Dataset, open_dataset  # noqa: E402
from whisper_ptq.errors import UserError  # noqa: E402
from whisper_ptq.evaluation import Quantized  # noqa: E402
from whisper_ptq.results.environment import cpu_model, peak_rss_bytes  # noqa: E402
from whisper_ptq.results.metrics import corpus_rates, score_utterance  # noqa: E402
from whisper_ptq.settings import Settings  # noqa: E402

DEFAULT_RECIPES = ["fp32", "fast-cpu", "ct2-int8", "ov-int8", "ort-int8", "whispercpp-q8_0"]
BUCKETS = (0.0, 5.0, 10.0, 20.0, 30.0)  # utterance length bounds (s): Whisper pads every window to 30 s


@dataclass
class Timings:
    """Seconds per (recipe, batch size), one entry per repeat; hypotheses of the first repeat."""

    seconds: dict[tuple[str, int], list[float]] = field(default_factory=dict)
    per_batch: dict[tuple[str, int], list[list[float]]] = field(default_factory=dict)  # per repeat, per batch
    texts: dict[tuple[str, int], list[str]] = field(default_factory=dict)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="base")
    p.add_argument(
        "--recipes", nargs="+", default=DEFAULT_RECIPES, help="the first one is the baseline (default: %(default)s)"
    )
    p.add_argument("--subject", default="fast-cpu", help="the recipe whose speed-ups over every other are listed")
    p.add_argument(
        "--cpu-class",
        choices=sorted(FORCE_CLASS_ENV),
        default=None,
        help="run the kernels of a lower CPU class (ISA caps for oneDNN, ATen, fbgemm, MKL, CTranslate2)",
    )
    p.add_argument("--dataset", default="librispeech:test-other")
    p.add_argument("--data-root", type=Path, default=None)
    p.add_argument("--limit", type=int, default=None, help="first N utterances (all by default)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--settle", type=float, default=0.25, help="untimed pause before each timed call (s)")
    p.add_argument("--overhead-repeats", type=int, default=2, help="evaluate/bare pairs per recipe (0: skip)")
    p.add_argument("--overhead-batch-size", type=int, default=None, help="default: the largest batch size")
    p.add_argument("--no-memory", action="store_true", help="skip the per-recipe peak-memory processes")
    p.add_argument("--json", type=Path, default=None, help="also write every number here")
    return p.parse_args()


def batches(items: list[Any], size: int) -> list[list[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


@dataclass
class Opened:
    """What a worker process holds: one recipe's session and the preloaded audio it transcribes."""

    session: Quantized
    dataset: Dataset | None
    audios: list[np.ndarray]


def _serve(conn: Any, model: str, recipe: str, settings: Settings, dataset: Dataset | None, audios: list) -> None:
    """A worker's loop: open the session, send its info, then run each (function, args) received on `opened`."""
    try:
        opened = Opened(Quantized.build(model, get_recipe(recipe), settings), dataset, audios)
        conn.send(("ok", opened.session.info))
        while (request := conn.recv()) is not None:
            function, args = request
            conn.send(("ok", function(opened, *args)))
    except Exception as error:  # the parent raises it, naming the recipe
        conn.send(("error", f"{type(error).__name__}: {error}"))


class RecipeWorker:
    """One recipe's session in a process of its own (spawned, so nothing of the parent's runtimes is in it).
    Why: a runtime leaves the process slower for the others. After one CTranslate2 transcription (it bundles a
    second GNU OpenMP runtime), every torch recipe in that process stayed 30-45% slower (fast:cpu=avx2 on 4
    utterances 1.97 -> 2.74-2.94 s, fp32 5.6 -> 6.7 s, on a Zen 4), which no deployment of either would see."""

    def __init__(self, model: str, recipe: str, settings: Settings, dataset: Dataset | None, audios: list) -> None:
        self.recipe = recipe
        context = multiprocessing.get_context("spawn")
        self.conn, child_conn = context.Pipe()
        self.process = context.Process(
            target=_serve, args=(child_conn, model, recipe, settings, dataset, audios), daemon=True
        )
        self.process.start()
        self.info: dict[str, Any] = self._receive()

    def call(self, function: Any, *args: Any) -> Any:
        """`function(opened, *args)` run in the worker (a module-level function: it is pickled by name)."""
        self.conn.send((function, args))
        return self._receive()

    def _receive(self) -> Any:
        try:
            status, value = self.conn.recv()
        except EOFError:
            self.process.join()
            raise RuntimeError(f"{self.recipe}: worker process died (exit code {self.process.exitcode})") from None
        if status == "error":
            raise RuntimeError(f"{self.recipe}: {value}")
        return value

    def close(self) -> None:
        if self.process.is_alive():
            self.conn.send(None)
        self.process.join()


def open_workers(
    args: argparse.Namespace, settings: Settings, dataset: Dataset, audios: list[np.ndarray]
) -> dict[str, RecipeWorker]:
    """One after another, so that each open (quantize, compile) has the cores to itself."""
    workers: dict[str, RecipeWorker] = {}
    try:
        for name in args.recipes:
            start = time.perf_counter()
            workers[name] = RecipeWorker(args.model, name, settings, dataset, audios)
            print(f"opened {name} in {time.perf_counter() - start:.1f} s", flush=True)
    except BaseException:
        close_workers(workers)
        raise
    return workers


def close_workers(workers: dict[str, RecipeWorker]) -> None:
    for worker in workers.values():
        worker.close()


def timed_pass(opened: Opened, size: int) -> tuple[float, list[float], list[str]]:
    """In a worker: one untimed warm-up batch (the previous recipe evicted this one's weights from the caches),
    then every batch timed; total seconds, seconds per batch, hypotheses."""
    opened.session.transcribe_timed(opened.audios[:size])
    total, per_batch, texts = 0.0, [], []
    for batch in batches(opened.audios, size):
        hypotheses, seconds = opened.session.transcribe_timed(batch)
        total += seconds
        per_batch.append(seconds)
        texts.extend(t.text.strip() for t in hypotheses)
    return total, per_batch, texts


def time_interleaved(workers: dict[str, RecipeWorker], sizes: list[int], repeats: int, settle: float) -> Timings:
    """Each recipe transcribes every batch in turn (a pass); the recipes' passes alternate, in reversed order
    every other repeat (A B C, C B A, ...) so that drift hits all alike. Before a pass, untimed: `settle`
    seconds of sleep (a runtime's worker threads spin after their work: Intel OpenMP's KMP_BLOCKTIME is 200 ms,
    CTranslate2 ships it, and they would take the cores of the next recipe) and the warm-up batch of
    `timed_pass`. Why passes and not batches: interleaving every batch measures each recipe with a cold cache,
    which no deployment sees, and penalizes a small model most (fast-cpu on an AMX Xeon: RTF 0.038 alone, 0.062
    batch-interleaved with transformers fp32)."""
    timings = Timings()
    for repeat in range(repeats):
        order = list(workers) if repeat % 2 == 0 else list(reversed(workers))
        for size in sizes:
            for name in order:
                time.sleep(settle)
                total, per_batch, texts = workers[name].call(timed_pass, size)
                timings.seconds.setdefault((name, size), []).append(total)
                timings.per_batch.setdefault((name, size), []).append(per_batch)
                if repeat == 0:
                    timings.texts[(name, size)] = texts
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
                    "rtfx": spread([audio_s / s for s in seconds]),
                    "speedup_vs_" + baseline: spread(ratios),
                    "wer": wer,
                }
            )
    return rows


def length_buckets(timings: Timings, names: list[str], audios: list[np.ndarray]) -> list[dict]:
    """Batch 1, per utterance-length bucket: each recipe's RTF (median over repeats) and its speed-up over the
    baseline (median of the per-repeat ratios). Short clips pay the full 30 s encoder."""
    durations = [len(a) / SAMPLE_RATE for a in audios]
    rows = []
    for low, high in zip(BUCKETS, BUCKETS[1:], strict=False):
        members = [i for i, d in enumerate(durations) if low <= d < high]
        if not members or (names[0], 1) not in timings.per_batch:
            continue
        audio_s = sum(durations[i] for i in members)
        seconds = {n: [sum(rep[i] for i in members) for rep in timings.per_batch[(n, 1)]] for n in names}
        rows.append(
            {
                "bucket_s": [low, high],
                "utterances": len(members),
                "rtf": {n: statistics.median(v) / audio_s for n, v in seconds.items()},
                "speedup": {
                    n: statistics.median(b / x for b, x in zip(seconds[names[0]], v, strict=True))
                    for n, v in seconds.items()
                },
            }
        )
    return rows


def subject_ratios(timings: Timings, subject: str, names: list[str], sizes: list[int]) -> dict[str, dict]:
    """Per batch size: how many times faster `subject` is than each other recipe (per-repeat ratios)."""
    return {
        str(size): {
            other: spread(
                [o / x for o, x in zip(timings.seconds[(other, size)], timings.seconds[(subject, size)], strict=True)]
            )
            for other in names
            if other != subject
        }
        for size in sizes
    }


def batch_consistency(timings: Timings, names: list[str], sizes: list[int]) -> dict[str, int]:
    """Per recipe: hypotheses that differ between the first batch size and any other."""
    return {
        name: sum(
            any(timings.texts[(name, s)][i] != first for s in sizes[1:])
            for i, first in enumerate(timings.texts[(name, sizes[0])])
        )
        for name in names
    }


def evaluator_overhead(opened: Opened, size: int, repeats: int) -> dict:
    """In a worker: wall time of `Quantized.evaluate` over that of a bare transcribe loop on preloaded audio,
    interleaved."""
    transcriber = opened.session.built.transcriber
    ratios, evaluate_s, bare_s = [], [], []
    for _ in range(repeats):
        start = time.perf_counter()
        opened.session.evaluate(opened.dataset, batch_size=size, progress=False)
        evaluate_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        for batch in batches(opened.audios, size):
            transcriber.transcribe(batch)
        bare_s.append(time.perf_counter() - start)
        ratios.append(evaluate_s[-1] / bare_s[-1])
    return {"batch_size": size, "evaluate_s": evaluate_s, "bare_s": bare_s, "ratio": spread(ratios)}


def one_batch_peak_rss(opened: Opened) -> int:
    """In a worker: transcribe all its audio as one batch; the process's peak RSS."""
    opened.session.transcribe_timed(opened.audios)
    return peak_rss_bytes()


def peak_memory(model: str, recipe: str, settings: Settings, audios: list[np.ndarray]) -> int:
    """Peak RSS of a fresh process that opens the session and transcribes `audios` as one batch."""
    worker = RecipeWorker(model, recipe, settings, None, audios)
    try:
        return worker.call(one_batch_peak_rss)
    finally:
        worker.close()


def print_report(report: dict[str, Any]) -> None:
    baseline = report["recipes"][0]
    key = "speedup_vs_" + baseline
    print(
        f"\n{report['model']} on {report['dataset']}: {report['utterances']} utterances, {report['audio_s']:.0f} s "
        f"of audio, {report['threads']} threads, {report['repeats']} repeats (passes interleaved)"
    )
    print(
        f"{'recipe':<22}{'batch':>6}{'RTF min':>10}{'median':>9}{'max':>9}   "
        f"{'x vs ' + baseline + ' min':>16}{'median':>8}{'max':>8}{'RTFx':>7}{'WER':>8}{'dWER':>7}"
    )
    base_wer = {r["batch_size"]: r["wer"] for r in report["speed"] if r["recipe"] == baseline}
    for r in report["speed"]:
        rtf, ratio = r["rtf"], r[key]
        print(
            f"{r['recipe']:<22}{r['batch_size']:>6}{rtf['min']:>10.4f}{rtf['median']:>9.4f}{rtf['max']:>9.4f}   "
            f"{ratio['min']:>16.2f}{ratio['median']:>8.2f}{ratio['max']:>8.2f}{r['rtfx']['median']:>7.1f}"
            f"{r['wer']:>8.2f}{r['wer'] - base_wer[r['batch_size']]:>+7.2f}"
        )
    print(f"CPU: {report['cpu']}; class {report['cpu_class']}; flags {' '.join(report['cpu_flags'])}")
    if report["isa_caps"]:
        print(f"ISA caps (forced): {report['isa_caps']}")
    for row in report["buckets"]:
        low, high = row["bucket_s"]
        cells = "  ".join(f"{n} {row['rtf'][n]:.4f} ({row['speedup'][n]:.2f}x)" for n in report["recipes"])
        print(f"batch 1, {low:g}-{high:g} s ({row['utterances']} utterances): RTF (x vs {baseline}) {cells}")
    for size, ratios in report["subject_ratios"].items():
        cells = ", ".join(f"{other} {r['median']:.2f} ({r['min']:.2f}-{r['max']:.2f})" for other, r in ratios.items())
        print(f"batch {size}: {report['subject']} is x times faster than: {cells}")
    print("\nhypotheses differing between batch sizes:", report["batch_differences"])
    for name, facts in report["sessions"].items():
        rss = facts["peak_rss_mb"]
        print(f"{name}: quantize {facts['quantize_seconds']:.1f} s" + ("" if rss is None else f", peak RSS {rss} MB"))
    for name, o in report["evaluator_overhead"].items():
        print(
            f"evaluator overhead {name} (batch {o['batch_size']}): evaluate/bare median {o['ratio']['median']:.3f} "
            f"(min {o['ratio']['min']:.3f}, max {o['ratio']['max']:.3f}); "
            f"evaluate {[round(s, 2) for s in o['evaluate_s']]} s, bare {[round(s, 2) for s in o['bare_s']]} s"
        )


def main() -> None:
    args = parse_args()
    try:  # a misspelt recipe fails here, before minutes of opening the others
        for name in args.recipes:
            get_recipe(name)
    except UserError as error:
        raise SystemExit(f"speed.py: {error}") from None
    settings = Settings(threads=args.threads, data_root=args.data_root, progress=False)
    dataset = open_dataset(args.dataset, args.data_root).limit(args.limit)
    audios = [dataset.load_audio(u) for u in dataset.utterances]
    refs = [u.text for u in dataset.utterances]
    audio_s = sum(len(a) for a in audios) / SAMPLE_RATE
    sizes = args.batch_sizes
    memory = (
        {} if args.no_memory else {n: peak_memory(args.model, n, settings, audios[: max(sizes)]) for n in args.recipes}
    )
    workers = open_workers(args, settings, dataset, audios)
    try:
        timings = time_interleaved(workers, sizes, args.repeats, args.settle)
        overhead_size = args.overhead_batch_size or max(sizes)
        overhead = (
            {n: w.call(evaluator_overhead, overhead_size, args.overhead_repeats) for n, w in workers.items()}
            if args.overhead_repeats
            else {}
        )
    finally:
        close_workers(workers)
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
        "buckets": length_buckets(timings, args.recipes, audios),
        "subject": args.subject,
        "subject_ratios": subject_ratios(timings, args.subject, args.recipes, sizes)
        if args.subject in args.recipes
        else {},
        "evaluator_overhead": overhead,
        "sessions": {
            name: {
                "quantize_seconds": w.info["quantize_seconds"],
                "peak_rss_mb": round(memory[name] / 2**20) if name in memory else None,
                "knobs": {
                    k: w.info.get(k)
                    for k in (
                        "engine",
                        "cpu_class",
                        "kernel_plan",
                        "lm_head",
                        "attention",
                        "decoder_threads",
                    )
                },
            }
            for name, w in workers.items()
        },
        "cpu": cpu_model(),
        "cpu_class": cpu_class(),
        "cpu_flags": cpu_flags(),
        "isa_caps": isa_caps(),
        "command": " ".join(sys.argv),
    }
    print_report(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
