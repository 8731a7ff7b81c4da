"""Command line: parsing only; every command delegates to the module that owns the work."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from whisper_ptq.errors import UserError

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
    from whisper_ptq.evaluate import DEFAULT_CALIBRATION, Settings

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
    from whisper_ptq.data import open_dataset
    from whisper_ptq.evaluate import Session, write_outputs
    from whisper_ptq.export import is_export_dir
    from whisper_ptq.recipes import get_recipe

    settings = _settings(args)
    _check_out_dir(args.out)
    dataset = open_dataset(args.dataset, settings.data_root).limit(args.limit)
    if is_export_dir(args.model):
        if args.recipe is not None:
            raise UserError(f"--recipe is not allowed with an exported model: {args.model} carries its recipe")
        session = Session.from_export(Path(args.model), settings)
    else:
        session = Session.open(args.model, get_recipe(args.recipe or "fp32"), settings, evaluated=[dataset])
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
    from whisper_ptq.evaluate import Session
    from whisper_ptq.export import write_export
    from whisper_ptq.recipes import get_recipe

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="whisper-ptq", description="Post-training quantization studies of OpenAI Whisper."
    )
    sub = parser.add_subparsers(dest="command", required=True)

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
    data_sub = p.add_subparsers(dest="data_command", required=True)
    f = data_sub.add_parser("fetch", help="download and unpack official datasets into the data root")
    f.add_argument("datasets", nargs="+", help="e.g. librispeech:test-clean ljspeech")
    f.add_argument("--data-root", type=Path, default=None)
    f.set_defaults(func=cmd_data_fetch)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
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
