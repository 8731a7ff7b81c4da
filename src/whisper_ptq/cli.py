"""Command line: parsing only; every command delegates to the module that owns the work."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from whisper_ptq.errors import UserError
from whisper_ptq.executors import EXECUTORS

Command = Callable[[argparse.Namespace], int]


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-size", type=_positive_int, default=1, help="utterances per generate call")
    p.add_argument("--threads", type=_positive_int, default=None, help="intra-op CPU threads (default: torch's)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--data-root", type=Path, default=None, help="data root (else $WHISPER_PTQ_DATA)")
    p.add_argument("--cache-dir", type=Path, default=None, help="model cache (else $WHISPER_PTQ_CACHE)")
    p.add_argument(
        "--calibration",
        default=None,
        help="calibration dataset for static recipes (default librispeech:train-clean-100)",
    )
    p.add_argument("--calibration-limit", type=_positive_int, default=32, help="calibration utterances")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _settings(args: argparse.Namespace):
    from whisper_ptq.settings import DEFAULT_CALIBRATION, Settings

    return Settings(
        device=args.device,
        batch_size=args.batch_size,
        threads=args.threads,
        data_root=args.data_root,
        cache_dir=args.cache_dir,
        calibration=args.calibration or DEFAULT_CALIBRATION,
        calibration_limit=args.calibration_limit,
        progress=not args.no_progress,
    )


def _check_out_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"output directory {out} exists and is a file")


def cmd_eval(args: argparse.Namespace) -> int:
    from whisper_ptq.backends import get_recipe
    from whisper_ptq.data import open_dataset
    from whisper_ptq.evaluation import Session
    from whisper_ptq.export import is_export_dir
    from whisper_ptq.results.outputs import write_outputs

    settings = _settings(args)
    _check_out_dir(args.out)
    exported = is_export_dir(args.model)
    if exported and args.recipe is not None:
        raise UserError(f"--recipe is not allowed with an exported model: {args.model} carries its recipe")
    recipe = None if exported else get_recipe(args.recipe or "fp32")
    dataset = open_dataset(args.dataset, settings.data_root).limit(args.limit)
    if recipe is None:
        session = Session.from_export(Path(args.model), settings)
    else:
        session = Session.open(args.model, recipe, settings, evaluated=[dataset])
    result = session.evaluate(dataset, settings.batch_size, progress=settings.progress)
    summary = result.summary()
    write_outputs(args.out, summary, result.rows)
    print(
        f"{summary['model']} {summary['recipe']} {summary['dataset']}: n={summary['n_utterances']} "
        f"WER {summary['wer']:.2f}% CER {summary['cer']:.2f}% RTF {summary['rtf']:.3f} "
        f"size {summary['size_bytes'] / 1e6:.1f} MB ({100 * summary['size_reduction']:.0f}% smaller) -> {args.out}"
    )
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from whisper_ptq.backends import backend_for, named_recipes

    rows = []
    for name, recipe in named_recipes().items():
        reason = backend_for(recipe).check(recipe, args.device)
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
            }
        )
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"whisper-ptq recipes (runnable on {args.device})")
    for column in ("name", "library", "scheme", "description", "runnable here"):
        table.add_column(column, overflow="fold")
    for row in rows:
        runnable = "yes" if row["runnable"] else f"no: {row['reason']}"
        table.add_row(row["name"], row["library"], row["scheme"], row["description"], runnable)
    Console(width=max(120, Console().width)).print(table)
    print("Parametric form: LIBRARY:key=value,... e.g. hqq:nbits=3,group_size=64")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from whisper_ptq.backends import get_recipe
    from whisper_ptq.evaluation import Session
    from whisper_ptq.export import write_export

    settings = _settings(args)
    recipe = get_recipe(args.recipe)
    session = Session.open(args.model, recipe, settings)
    write_export(session.bundle, recipe, session.quantized, args.out)
    print(f"exported {args.model} with {recipe.name} to {args.out} ({session.info['size_bytes'] / 1e6:.1f} MB)")
    return 0


def cmd_data_fetch(args: argparse.Namespace) -> int:
    from whisper_ptq.data import fetch_dataset

    for spec in args.datasets:
        print(f"{spec}: {fetch_dataset(spec, args.data_root)}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from whisper_ptq.report import write_report
    from whisper_ptq.studies.bench import SweepOptions, print_summary, run_sweep
    from whisper_ptq.studies.experiment import select_experiment

    if args.ray_address is not None and args.executor != "ray":
        raise UserError("--ray-address needs --executor ray")
    experiment, out = select_experiment(args.experiment, args.out, args.resume, args.limit)
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
    print_summary(sweep.results)
    write_report(out, sweep.results, experiment.config())
    print(f"report: {out / 'report.md'}")
    return 1 if any(r["status"] == "failed" for r in sweep.results) else 0


def cmd_report(args: argparse.Namespace) -> int:
    from whisper_ptq.report import write_report
    from whisper_ptq.studies.experiment import stored_results

    config, results = stored_results(args.dir)
    write_report(args.dir, results, config)
    print(f"report: {args.dir / 'report.md'}")
    return 0


def cmd_sensitivity(args: argparse.Namespace) -> int:
    from whisper_ptq.backends import get_recipe
    from whisper_ptq.data import open_dataset
    from whisper_ptq.studies.sensitivity import Study, run_sensitivity

    settings = _settings(args)
    _check_out_dir(args.out)
    dataset = open_dataset(args.dataset, settings.data_root).limit(args.limit)
    study = Study(args.model, get_recipe(args.recipe), dataset, args.level)
    result = run_sensitivity(study, settings, args.out, args.force)
    print(result.files[0].read_text())
    print("written: " + ", ".join(str(f) for f in result.files))
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from whisper_ptq.data import open_dataset
    from whisper_ptq.studies.search import SearchSpec, parse_formats, run_search, write_search_report

    settings = _settings(args)
    _check_out_dir(args.out)
    formats = parse_formats(args.formats)
    search_set = open_dataset(args.search_dataset, settings.data_root).limit(args.limit)
    tests = [open_dataset(spec, settings.data_root).limit(args.test_limit) for spec in args.test_datasets]
    spec = SearchSpec(args.model, args.budget, formats, search_set, tuple(tests), args.level)
    result = run_search(spec, settings, args.out, args.force)
    report = write_search_report(result, args.out)
    print(report.read_text())
    print(f"recipe: {result.recipe_file} (use it as --recipe {result.recipe_file}); report: {report}")
    return 0 if result.within_budget else 1


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line naming the culprit, exit code 2, like every other bad input."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"error: {self.prog}: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="whisper-ptq", description="Post-training quantization studies of OpenAI Whisper.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("eval", help="evaluate one model x recipe on one dataset")
    p.add_argument("--model", default="base", help="packaged name (base, tiny.en), hub id, or a local dir")
    p.add_argument("--recipe", default=None, help="named recipe (see `list`) or LIB:key=value,...")
    p.add_argument("--dataset", default="librispeech:test-other", help="e.g. librispeech:test-clean")
    p.add_argument("--limit", type=_positive_int, default=None, help="first N utterances only")
    p.add_argument("--out", type=Path, default=Path("runs/eval"), help="output directory")
    _add_run_options(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("list", help="list named recipes and whether they run here")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("export", help="quantize a model and save it for `eval --model DIR`")
    p.add_argument("--model", default="base")
    p.add_argument("--recipe", required=True)
    p.add_argument("--out", type=Path, required=True)
    _add_run_options(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("data", help="dataset management")
    data_sub = p.add_subparsers(dest="data_command", required=True, parser_class=_Parser)
    f = data_sub.add_parser("fetch", help="download and unpack official datasets into the data root")
    f.add_argument("datasets", nargs="+", help="e.g. librispeech:test-clean ljspeech")
    f.add_argument("--data-root", type=Path, default=None)
    f.set_defaults(func=cmd_data_fetch)

    p = sub.add_parser("bench", help="run an experiment (preset or .toml file) into a results database and report")
    p.add_argument("experiment", nargs="?", default=None, help="preset (paper, quick, paper-gpu) or a .toml file")
    p.add_argument("--out", type=Path, default=None, help="output directory (default runs/<experiment name>)")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="only continue the results in --out (none: error)")
    again.add_argument("--force", action="store_true", help="discard results of a different experiment in --out")
    p.add_argument("--limit", type=_positive_int, default=None, help="first N utterances of each dataset")
    p.add_argument("--executor", choices=list(EXECUTORS), default="local", help="where the workers run")
    p.add_argument(
        "--ray-address",
        default=None,
        help="Ray cluster for --executor ray, e.g. HEAD_IP:6379 (default: $RAY_ADDRESS, else a cluster started on "
        "this machine by `ray start`, else a new local one)",
    )
    p.add_argument("--data-root", type=Path, default=None, help="data root (else $WHISPER_PTQ_DATA)")
    p.add_argument("--cache-dir", type=Path, default=None, help="model cache (else $WHISPER_PTQ_CACHE)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("sensitivity", help="quantize one group of layers at a time; WER cost of each group")
    p.add_argument("--model", default="base", help="packaged name (base, tiny.en), hub id, or a local dir")
    p.add_argument("--recipe", required=True, help="the recipe restricted to each group in turn")
    p.add_argument("--dataset", default="librispeech:test-other")
    p.add_argument("--limit", type=_positive_int, default=None, help="first N utterances only")
    p.add_argument("--level", choices=["coarse", "fine", "both"], default="coarse", help="component or layer groups")
    p.add_argument("--out", type=Path, default=Path("runs/sensitivity"), help="output directory (results.sqlite)")
    p.add_argument("--force", action="store_true", help="discard results of a different study in --out")
    _add_run_options(p)
    p.set_defaults(func=cmd_sensitivity)

    p = sub.add_parser("search", help="mixed precision: one format per layer group under a size budget")
    p.add_argument("--model", default="base", help="packaged name (base, tiny.en), hub id, or a local dir")
    p.add_argument("--budget", type=float, required=True, help="largest size as a fraction of fp32, in (0, 1]")
    p.add_argument("--formats", default="fp32,int8,int4,int3", help="formats to choose from: fp32,int8,int4,int3,int2")
    p.add_argument("--search-dataset", default="ljspeech", help="the dataset the search measures on")
    p.add_argument("--test-datasets", nargs="+", default=["librispeech:test-other"], help="datasets never searched on")
    p.add_argument("--limit", type=_positive_int, default=None, help="first N utterances of the search dataset")
    p.add_argument("--test-limit", type=_positive_int, default=None, help="first N utterances of each test dataset")
    p.add_argument("--level", choices=["coarse", "fine"], default="coarse", help="component or layer groups")
    p.add_argument("--out", type=Path, default=Path("runs/search"), help="output directory (results.sqlite)")
    p.add_argument("--force", action="store_true", help="discard results of a different search in --out")
    _add_run_options(p)
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("report", help="write the report of a bench output directory from its database alone")
    p.add_argument("dir", type=Path, help="a bench output directory (holding results.sqlite)")
    p.set_defaults(func=cmd_report)
    return parser


def _quiet_libraries() -> None:
    """Our own progress bars and one-line summaries are the output; transformers' load bars and deprecation
    chatter would bury them. Set through the environment, read when transformers is first imported (never by
    commands that need no model) and inherited by sweep workers."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(argv: Sequence[str] | None = None) -> int:
    _quiet_libraries()
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
