"""Command line: parsing only; every command delegates to the module that owns the work.

Each command first checks what it can without the model stack (recipe, dataset, model spec, output folder),
then imports torch and friends only when a model is really needed: `list`, `report` and every input error
answer in well under two seconds (`benchmarks/cli_latency.py` measures it).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from whisper_ptq import __version__
from whisper_ptq.errors import UserError
from whisper_ptq.executors import EXECUTORS

if TYPE_CHECKING:
    from whisper_ptq.settings import Settings

Command = Callable[[argparse.Namespace], int]
EVAL_RUNS = Path("runs/eval")


# ------------------------------------------------------------------------------------------------ options


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _add_data_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-root", type=Path, help="data root holding the datasets (else $WHISPER_PTQ_DATA)")
    p.add_argument("--cache-dir", type=Path, help="model cache (else $WHISPER_PTQ_CACHE, else the user cache dir)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _add_run_options(p: argparse.ArgumentParser) -> None:
    from whisper_ptq.settings import DEFAULT_CALIBRATION

    p.add_argument("--batch-size", type=_positive_int, default=1, help="utterances transcribed per call")
    p.add_argument("--threads", type=_positive_int, help="intra-op CPU threads (default: the library's)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument(
        "--calibration", default=DEFAULT_CALIBRATION, help="calibration dataset of static recipes (audio only)"
    )
    p.add_argument("--calibration-limit", type=_positive_int, default=32, help="calibration utterances")
    _add_data_options(p)


def _add_decoding_options(p: argparse.ArgumentParser) -> None:
    from whisper_ptq.settings import TASKS

    g = p.add_argument_group("decoding (the same in every engine; recorded with the run)")
    g.add_argument(
        "--language",
        default="en",
        help="Whisper language code of the speech (en, de, fr, zh, ...), or auto: detected on each recording's "
        "first 30 s; other than en only for multilingual models. The text normalizer follows it",
    )
    g.add_argument("--task", choices=TASKS, default="transcribe", help="translate: into English (multilingual models)")
    g.add_argument(
        "--beam-size", type=_positive_int, default=1, help="beam search width (transformers and CTranslate2 recipes)"
    )
    g.add_argument(
        "--temperature-fallback",
        action="store_true",
        help="OpenAI's fallback: re-decode a window by seeded sampling at 0.2 ... 1.0 when its text is repetitive "
        "(zlib ratio > 2.4) or improbable (mean log-probability < -1)",
    )
    g.add_argument(
        "--condition-on-previous-text",
        action="store_true",
        help="long form: prompt each 30 s window with the text decoded before it",
    )


def _add_model_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default="base",
        help="packaged name (base, tiny.en), hub id (openai/whisper-small), or a local transformers, "
        "CTranslate2 or export folder",
    )


def _settings(args: argparse.Namespace) -> Settings:
    from whisper_ptq.settings import DecodingOptions, Settings

    decoding = DecodingOptions()
    if hasattr(args, "beam_size"):
        decoding = DecodingOptions(
            args.language, args.task, args.beam_size, args.temperature_fallback, args.condition_on_previous_text
        )
    return Settings(
        device=args.device,
        batch_size=args.batch_size,
        threads=args.threads,
        data_root=args.data_root,
        cache_dir=args.cache_dir,
        calibration=args.calibration,
        calibration_limit=args.calibration_limit,
        progress=not args.no_progress,
        decoding=decoding,
    )


EVAL_FORCE_HINT = "to replace it, run the same command with --force, or choose another --out"


def _check_out_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"output directory {out} exists and is a file")


def _check_no_other_eval(out: Path, model: str | None, recipe: str, dataset: str) -> None:
    """An --out holding an earlier eval of the same model, recipe and dataset is re-run (its files replaced when
    the new one is done); one holding another eval is refused before any work (`model` None: an export's, which
    is known once loaded, is not compared)."""
    from whisper_ptq.results.outputs import SUMMARY_FILE

    earlier = out / SUMMARY_FILE
    if not earlier.is_file():
        return
    try:
        stored = json.loads(earlier.read_text())
        then = (stored["model"], stored["recipe"], stored["dataset"])
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"{earlier} is not a whisper-ptq eval summary; {EVAL_FORCE_HINT}") from None
    if then[1:] != (recipe, dataset) or model not in (None, then[0]):
        raise UserError(f"{out} holds the eval of {then[0]} {then[1]} on {then[2]}; {EVAL_FORCE_HINT}")


def _fresh_dir(parent: Path, name: str) -> Path:
    """parent/name, or parent/name-2, -3...: the first that does not exist yet, so no run overwrites another."""
    stem = re.sub(r"[^A-Za-z0-9._=-]+", "_", name).strip("_") or "run"
    candidate, n = parent / stem, 1
    while candidate.exists():
        n += 1
        candidate = parent / f"{stem}-{n}"
    return candidate


# ----------------------------------------------------------------------------------------------- commands


def cmd_eval(args: argparse.Namespace) -> int:
    from whisper_ptq.backends import get_recipe
    from whisper_ptq.data import open_dataset
    from whisper_ptq.data.specs import dataset_label
    from whisper_ptq.export import export_recipe, is_export_dir
    from whisper_ptq.preflight import check_runnable, preflight

    settings = _settings(args)
    exported = is_export_dir(args.model)
    if exported and args.recipe is not None:
        raise UserError(f"--recipe is not allowed with an exported model: {args.model} carries its recipe")
    recipe = export_recipe(args.model) if exported else get_recipe(args.recipe or "fp32")
    dataset = open_dataset(args.dataset, settings.data_root).limit(args.limit)
    if exported:
        check_runnable(recipe, settings.device)
    else:
        preflight(args.model, recipe, settings, [dataset])
    model_name = Path(args.model).name if exported else args.model
    out = args.out or _fresh_dir(EVAL_RUNS, f"{model_name}-{recipe.name}-{dataset_label(dataset.spec)}")
    _check_out_dir(out)
    if not args.force:
        _check_no_other_eval(out, None if exported else args.model, recipe.name, dataset.spec)

    from whisper_ptq.evaluation import Quantized  # the model stack, now that everything else is known good
    from whisper_ptq.results.outputs import write_outputs

    if exported:
        quantized = Quantized.from_export(Path(args.model), settings)
    else:
        quantized = Quantized.build(args.model, recipe, settings, evaluated=[dataset])
    result = quantized.evaluate(dataset, progress=settings.progress)
    summary = result.summary()
    write_outputs(out, summary, result.rows)
    print(eval_line(summary, out))
    return 0


def eval_line(summary: dict[str, Any], out: Path) -> str:
    """The one-line summary of an eval: the headline metric first (CER for languages written without spaces)."""
    (wer_low, wer_high), (cer_low, cer_high) = summary["wer_ci95"], summary["cer_ci95"]
    rates = [
        f"WER {summary['wer']:.2f}% (95% CI {wer_low:.2f}-{wer_high:.2f})",
        f"CER {summary['cer']:.2f}% ({cer_low:.2f}-{cer_high:.2f})",
    ]
    if summary["headline"] == "cer":
        rates.reverse()
    long = f", {summary['long_utterances']} over 30 s" if summary["long_utterances"] else ""
    return (
        f"{summary['model']} {summary['recipe']} {summary['dataset']}: n={summary['n_utterances']}{long} "
        f"({summary['decoded_seconds']:.1f} s decoded) {' '.join(rates)} (S {summary['substitutions']} "
        f"D {summary['deletions']} I {summary['insertions']}, runaways {summary['runaways']}) "
        f"RTF {summary['rtf']:.3f} size {summary['size_bytes'] / 1e6:.1f} MB "
        f"({100 * summary['size_reduction']:.0f}% smaller) -> {out}"
    )


def cmd_compare(args: argparse.Namespace) -> int:
    from whisper_ptq.report.compare import compare_runs, format_comparison, open_run

    a, b = open_run(args.run_a), open_run(args.run_b)
    print(format_comparison(a, b, compare_runs(a, b, args.dataset)))
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from whisper_ptq.backends import backend_for, named_recipes

    rows = []
    for name, recipe in named_recipes().items():
        backend = backend_for(recipe)
        reason = backend.check(recipe, args.device)
        rows.append(
            {
                "name": name,
                "library": recipe.library,
                "scheme": recipe.scheme,
                "weights": recipe.weights,
                "activations": recipe.activations,
                "granularity": recipe.granularity,
                "group_size": recipe.group_size,
                "devices": list(recipe.devices),
                "description": recipe.description,
                "runnable": reason is None,
                "reason": reason,
                "slow_here": backend.slow_here(recipe, args.device),
            }
        )
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    runnable = sum(row["runnable"] for row in rows)
    table = Table(title=f"whisper-ptq recipes: {runnable} of {len(rows)} run on this machine's {args.device}")
    table.add_column("name", no_wrap=True)  # a recipe name is typed back: never split it
    table.add_column("library", no_wrap=True)
    table.add_column("scheme", no_wrap=True)
    table.add_column("description", overflow="fold", ratio=3)
    table.add_column(f"runs here ({args.device})", overflow="fold", ratio=2)
    for row in rows:
        verdict = "yes" if row["runnable"] else f"no: {row['reason']}"
        if row["runnable"] and row["slow_here"]:
            verdict = f"yes, but slow: {row['slow_here']}"
        table.add_row(row["name"], row["library"], row["scheme"], row["description"], verdict)
    Console(width=max(120, Console().width)).print(table)
    print("Parametric form: LIBRARY:key=value,... e.g. hqq:nbits=3,group_size=64 (a bad key lists the valid ones)")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from whisper_ptq.backends import get_recipe
    from whisper_ptq.data import open_dataset
    from whisper_ptq.export import check_export_target
    from whisper_ptq.preflight import preflight

    settings = _settings(args)
    recipe = get_recipe(args.recipe)
    check_export_target(args.out, args.force)
    if args.limit is not None and args.evaluate is None:
        raise UserError("--limit applies to --evaluate only")
    dataset = open_dataset(args.evaluate, settings.data_root).limit(args.limit) if args.evaluate else None
    preflight(args.model, recipe, settings, [dataset] if dataset else [])

    from whisper_ptq.evaluation import Quantized

    quantized = Quantized.build(args.model, recipe, settings, evaluated=[dataset] if dataset else [])
    quantized.save(args.out, force=args.force, evaluate_on=dataset)
    info = quantized.info
    print(
        f"exported {args.model} with {recipe.name} to {args.out}: {info['size_bytes'] / 1e6:.1f} MB "
        f"(fp16 {info['fp16_size_bytes'] / 1e6:.1f} MB, fp32 {info['fp32_size_bytes'] / 1e6:.1f} MB); "
        f"{args.out / 'README.md'} says how to load it"
    )
    return 0


def cmd_data_fetch(args: argparse.Namespace) -> int:
    from whisper_ptq.data import fetch_dataset

    for spec in args.datasets:
        print(f"{spec}: {fetch_dataset(spec, args.data_root)}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from whisper_ptq.studies.experiment import select_experiment

    if args.ray_address is not None and args.executor != "ray":
        raise UserError("--ray-address needs --executor ray")
    experiment, out = select_experiment(args.experiment, args.out, args.resume, args.limit)

    from whisper_ptq.report import write_report
    from whisper_ptq.studies.bench import SweepOptions, print_summary, run_sweep

    options = SweepOptions(
        out,
        args.data_root,
        args.cache_dir,
        args.executor,
        args.force,
        not args.no_progress,
        executor_options={"address": args.ray_address} if args.executor == "ray" else {},
    )
    sweep = run_sweep(experiment, options)
    if sweep.jobs == 0:
        print(f"nothing left to run: {out} already holds every result of {experiment.name!r}")
    config = experiment.config()
    print_summary(sweep.results, config["labels"])
    summary = write_report(out, sweep.results, config)
    for warning in summary["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"report: {out / 'report.md'}")
    return 1 if any(r["status"] == "failed" for r in sweep.results) else 0


def cmd_report(args: argparse.Namespace) -> int:
    from whisper_ptq.studies.experiment import stored_results

    config, results = stored_results(args.dir)
    from whisper_ptq.report import write_report  # matplotlib: only once there is something to draw

    write_report(args.dir, results, config)
    print(f"report: {args.dir / 'report.md'}")
    return 0


def cmd_sensitivity(args: argparse.Namespace) -> int:
    from whisper_ptq.backends import get_recipe
    from whisper_ptq.data import open_dataset
    from whisper_ptq.preflight import preflight
    from whisper_ptq.studies.sensitivity import Study, run_sensitivity

    settings = _settings(args)
    _check_out_dir(args.out)
    dataset = open_dataset(args.dataset, settings.data_root).limit(args.limit)
    study = Study(args.model, get_recipe(args.recipe), dataset, args.level)
    preflight(args.model, study.recipe, settings, [dataset])
    result = run_sensitivity(study, settings, args.out, args.force)
    print(result.files[0].read_text())
    print("written: " + ", ".join(str(f) for f in result.files))
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from whisper_ptq.data import open_dataset
    from whisper_ptq.models.sources import resolve_model
    from whisper_ptq.studies.search import SearchSpec, parse_formats, run_search, write_search_report

    settings = _settings(args)
    _check_out_dir(args.out)
    formats = parse_formats(args.formats)
    search_set = open_dataset(args.search_dataset, settings.data_root).limit(args.limit)
    tests = [open_dataset(spec, settings.data_root).limit(args.test_limit) for spec in args.test_datasets]
    spec = SearchSpec(args.model, args.budget, formats, search_set, tuple(tests), args.level)
    resolve_model(args.model, settings.cache_dir)
    result = run_search(spec, settings, args.out, args.force)
    report = write_search_report(result, args.out)
    print(report.read_text())
    print(f"recipe: {result.recipe_file} (use it as --recipe {result.recipe_file}); report: {report}")
    return 0 if result.within_budget else 1


# ------------------------------------------------------------------------------------------------ parser


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every option's default in its help (but not a meaningless None or False), epilogs as written."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False) or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line naming the culprit, exit code 2, like every other bad input."""

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"error: {self.prog}: {message}\n")


def _examples(*lines: str) -> str:
    return "examples:\n" + "\n".join(f"  {line}" for line in lines)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="whisper-ptq",
        description="Measure what post-training quantization costs a Whisper speech recognizer: WER and CER with "
        "confidence intervals and paired tests, speed and size, across quantization libraries and runtimes.",
        epilog=_examples(
            "whisper-ptq list",
            "whisper-ptq eval --model tiny.en --recipe ct2-int8 --dataset librispeech:test-clean --limit 5",
            "whisper-ptq bench quick --data-root ../shared/data",
            "whisper-ptq COMMAND --help",
        ),
    )
    parser.add_argument("--version", action="version", version=f"whisper-ptq {__version__}")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser, metavar="COMMAND")

    p = sub.add_parser(
        "eval",
        help="evaluate one model x recipe on one dataset",
        description="Quantize a model with a recipe (or load an export), transcribe a dataset, print WER/CER/RTF/"
        "size and write summary.json and utterances.jsonl.",
        epilog=_examples(
            "whisper-ptq eval --model base --recipe hqq-int4 --dataset librispeech:test-other",
            "whisper-ptq eval --model tiny.en --recipe hqq:nbits=3,group_size=64 --dataset manifest:mine.jsonl",
            "whisper-ptq eval --model exports/tiny-ct2 --dataset ljspeech --limit 20",
        ),
    )
    _add_model_option(p)
    p.add_argument("--recipe", help="named recipe (see `list`), LIB:key=value,... or a recipe file (default fp32)")
    p.add_argument(
        "--dataset",
        default="librispeech:test-other",
        help="librispeech:<split>, ljspeech or manifest:<file.jsonl>, optionally +noise:snr=<dB> and "
        "+concat:seconds=<s> (consecutive utterances joined into long recordings)",
    )
    p.add_argument("--limit", type=_positive_int, help="evaluate the first N utterances only")
    p.add_argument("--out", type=Path, help=f"output directory (default: a new folder under {EVAL_RUNS}/)")
    p.add_argument("--force", action="store_true", help="replace the results of another eval in --out")
    _add_run_options(p)
    _add_decoding_options(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "list",
        help="list named recipes and whether they run here",
        description="Every named recipe, its library and scheme, and whether it runs on this machine (and why not).",
        epilog=_examples("whisper-ptq list", "whisper-ptq list --json --device cuda"),
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--device", default="cpu", help="the device to check the recipes against")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser(
        "export",
        help="quantize a model and save it in its library's own format, with a model card",
        description="Quantize a model and save what its quantization library's users load with that library's "
        "own call (transformers' from_pretrained, faster-whisper, optimum-quanto...), with a README.md model card "
        "giving the load script, sizes, recipe and versions; `eval --model DIR` and `whisper_ptq.load` reload it.",
        epilog=_examples(
            "whisper-ptq export --model tiny.en --recipe ct2-int8 --out exports/tiny-ct2",
            "whisper-ptq export --model base --recipe bnb-nf4 --out exports/base-nf4 --evaluate librispeech:test-clean",
        ),
    )
    _add_model_option(p)
    p.add_argument("--recipe", required=True, help="named recipe (see `list`), LIB:key=value,... or a recipe file")
    p.add_argument("--out", type=Path, required=True, help="export folder (new or empty; see --force)")
    p.add_argument("--force", action="store_true", help="replace an earlier export in --out")
    p.add_argument("--evaluate", metavar="DATASET", help="measure WER/CER/RTF on this dataset for the model card")
    p.add_argument("--limit", type=_positive_int, help="with --evaluate: the first N utterances only")
    _add_run_options(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("data", help="dataset management")
    data_sub = p.add_subparsers(dest="data_command", required=True, parser_class=_Parser, metavar="ACTION")
    f = data_sub.add_parser(
        "fetch",
        help="download, verify and unpack official datasets into the data root",
        epilog=_examples("whisper-ptq data fetch librispeech:test-clean ljspeech --data-root ~/speech"),
    )
    f.add_argument("datasets", nargs="+", help="dataset specs, e.g. librispeech:test-clean ljspeech")
    f.add_argument("--data-root", type=Path, help="where to unpack them (else $WHISPER_PTQ_DATA)")
    f.set_defaults(func=cmd_data_fetch)

    p = sub.add_parser(
        "bench",
        help="run an experiment (preset or .toml file) into a results database, then write the report",
        description="Run every model x recipe x dataset of an experiment, each (model, recipe) in its own worker, "
        "into a crash-safe results database; re-running into the same --out resumes.",
        epilog=_examples(
            "whisper-ptq bench quick --data-root ../shared/data",
            "whisper-ptq bench paper --out runs/paper --resume",
            "whisper-ptq bench my-study.toml --executor ray --ray-address HEAD_IP:6379",
        ),
    )
    p.add_argument("experiment", nargs="?", help="preset (paper, quick, paper-gpu) or a .toml file (default paper)")
    p.add_argument("--out", type=Path, help="output directory (default runs/<experiment name>)")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="only continue the results in --out (none: error)")
    again.add_argument("--force", action="store_true", help="discard results of a different experiment in --out")
    p.add_argument("--limit", type=_positive_int, help="first N utterances of each dataset")
    p.add_argument("--executor", choices=list(EXECUTORS), default="local", help="where the workers run")
    p.add_argument(
        "--ray-address",
        help="Ray cluster for --executor ray, e.g. HEAD_IP:6379 (default: $RAY_ADDRESS, else a cluster started on "
        "this machine by `ray start`, else a new local one)",
    )
    _add_data_options(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser(
        "sensitivity",
        help="quantize one group of layers at a time; the WER cost of each group",
        epilog=_examples(
            "whisper-ptq sensitivity --model base --recipe torch-int8-dynamic --dataset librispeech:test-other"
        ),
    )
    _add_model_option(p)
    p.add_argument("--recipe", required=True, help="the recipe restricted to each group in turn")
    p.add_argument("--dataset", default="librispeech:test-other", help="the dataset each group is measured on")
    p.add_argument("--limit", type=_positive_int, help="first N utterances only")
    p.add_argument("--level", choices=["coarse", "fine", "both"], default="coarse", help="component or layer groups")
    p.add_argument("--out", type=Path, default=Path("runs/sensitivity"), help="output directory (results.sqlite)")
    p.add_argument("--force", action="store_true", help="discard results of a different study in --out")
    _add_run_options(p)
    _add_decoding_options(p)
    p.set_defaults(func=cmd_sensitivity)

    p = sub.add_parser(
        "search",
        help="mixed precision: one format per layer group under a size budget",
        epilog=_examples(
            "whisper-ptq search --model base --budget 0.25 --formats fp32,int8,int4 --search-dataset ljspeech "
            "--test-datasets librispeech:test-other"
        ),
    )
    _add_model_option(p)
    p.add_argument("--budget", type=float, required=True, help="largest size as a fraction of fp32, in (0, 1]")
    p.add_argument("--formats", default="fp32,int8,int4,int3", help="formats to choose from: fp32,int8,int4,int3,int2")
    p.add_argument("--search-dataset", default="ljspeech", help="the dataset the search measures on")
    p.add_argument("--test-datasets", nargs="+", default=["librispeech:test-other"], help="datasets never searched on")
    p.add_argument("--limit", type=_positive_int, help="first N utterances of the search dataset")
    p.add_argument("--test-limit", type=_positive_int, help="first N utterances of each test dataset")
    p.add_argument("--level", choices=["coarse", "fine"], default="coarse", help="component or layer groups")
    p.add_argument("--out", type=Path, default=Path("runs/search"), help="output directory (results.sqlite)")
    p.add_argument("--force", action="store_true", help="discard results of a different search in --out")
    _add_run_options(p)
    _add_decoding_options(p)
    p.set_defaults(func=cmd_search)

    p = sub.add_parser(
        "compare",
        help="two runs on the same utterances: paired test, CIs and the utterances that differ",
        description="Compare run B with run A on the utterances both transcribed: WER and CER with 95% CIs, the "
        "paired permutation test of B against A with the paired CI of the difference, and every utterance whose "
        "normalized hypotheses differ (normalized reference and both hypotheses). A run is an eval output folder, "
        "or DIR:RECIPE (DIR:MODEL/RECIPE when DIR holds several models) for a recipe of a bench folder.",
        epilog=_examples(
            "whisper-ptq compare runs/eval/tiny.en-fp32-clean runs/eval/tiny.en-ct2-int8-clean",
            "whisper-ptq compare runs/paper:fp32 runs/paper:quanto-int8 --dataset other",
        ),
    )
    p.add_argument("run_a", metavar="RUN_A", help="eval output folder, or BENCH_DIR:RECIPE")
    p.add_argument("run_b", metavar="RUN_B", help="eval output folder, or BENCH_DIR:RECIPE")
    p.add_argument("--dataset", help="only this dataset (spec or label, e.g. other) of a bench folder")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser(
        "report",
        help="write the report of a bench output directory from its database alone",
        epilog=_examples("whisper-ptq report runs/paper"),
    )
    p.add_argument("dir", type=Path, help="a bench output directory (holding results.sqlite)")
    p.set_defaults(func=cmd_report)
    return parser


# ------------------------------------------------------------------------------------------------ main


def error_message(exc: UserError) -> str:
    """The library's message with its parameter named as this command line's flag (`batch_size` -> `--batch-size`)."""
    message = str(exc)
    if exc.param:
        message = re.sub(rf"\b{re.escape(exc.param)}\b", "--" + exc.param.replace("_", "-"), message, count=1)
    return message


def main(argv: Sequence[str] | None = None) -> int:
    from whisper_ptq.settings import QUIET_LIBRARIES

    for key, value in QUIET_LIBRARIES.items():  # before anything imports transformers (see QUIET_LIBRARIES)
        os.environ.setdefault(key, value)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return args.func(args)
    except UserError as exc:
        print(f"error: {error_message(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
