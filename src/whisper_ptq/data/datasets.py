"""Named datasets: finding their utterances on disk, and fetching their official archives.

A dataset spec (grammar in `specs`) names a kind and its argument, then modifiers (`modifiers`). Kinds live in
``KINDS``: adding one touches one entry there.

On-disk layout under the data root (see ``resolve_data_root``):

- ``librispeech/<split>/<speaker>/<chapter>/`` with ``.flac`` files and ``<speaker>-<chapter>.trans.txt``.
  ``LibriSpeech/<split>`` is accepted too, so the official archive can be unpacked into the data root as
  is; the lowercase folder wins when both exist.
- ``ljspeech/`` (or the archive's own ``LJSpeech-1.1/``) with ``wavs/<id>.wav`` and ``metadata.csv``.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import platformdirs
import soundfile as sf
from tqdm import tqdm

from whisper_ptq.data.audio import SAMPLE_RATE, load_audio
from whisper_ptq.data.modifiers import Modifier, make_modifier
from whisper_ptq.data.specs import parse_dataset_spec
from whisper_ptq.errors import UserError

if TYPE_CHECKING:
    from whisper_ptq.settings import Settings

# Short enough that an offline machine fails within seconds, long enough for a slow mirror to answer.
CONNECT_TIMEOUT_S = 5.0
OPENSLR_URL = "https://www.openslr.org/resources/12/{split}.tar.gz"
LJSPEECH_URL = "https://data.keithito.com/data/speech/LJSpeech-1.1.tar.bz2"

# OpenSLR's published md5sum.txt for resource 12.
LIBRISPEECH_MD5 = {
    "dev-clean": "42e2234ba48799c1f50f24a7926300a1",
    "dev-other": "c8d0bcc9cca99d4f8b62fcc847357931",
    "test-clean": "32fa31d27d2e1cad72775fee3f4849a9",
    "test-other": "fb5a50374b501bb3bac4815ee91d3135",
    "train-clean-100": "2a93770f6d5c6c964bc36631d331a522",
    "train-clean-360": "c0e676e450a7ff2f54aeade5171606fa",
    "train-other-500": "d1a0fd59409feb2c614ce4d30c387708",
}
# The LJ Speech site publishes no checksum; this SHA-256 is the one torchaudio pins for the same URL.
LJSPEECH_SHA256 = "be1a30453f28eb8dd26af4101ae40cbf2c50413b1bb21936cbcdc6fae3de8aa5"


@dataclass(frozen=True)
class Utterance:
    id: str
    audio_path: Path
    text: str | None  # reference transcript; None for audio-only splits (calibration)
    parts: tuple[Utterance, ...] = ()  # a recording joined from these (`+concat`), `pause` seconds apart
    pause: float = 0.0

    @property
    def audio_paths(self) -> tuple[Path, ...]:
        """Every file its audio comes from."""
        return tuple(p.audio_path for p in self.parts) if self.parts else (self.audio_path,)

    def duration(self) -> float:
        """Seconds of audio, from the files' headers (no decoding)."""
        if self.parts:
            return sum(p.duration() for p in self.parts) + self.pause * (len(self.parts) - 1)
        try:
            return float(sf.info(self.audio_path).duration)
        except (sf.LibsndfileError, RuntimeError) as exc:
            raise UserError(f"cannot read audio file {self.audio_path}: {exc}") from exc


@dataclass(frozen=True)
class Dataset:
    """Utterances (sorted by id) of one spec; ``spec`` is canonical and ``root`` is the dataset's folder."""

    spec: str
    utterances: tuple[Utterance, ...]
    root: Path
    modifiers: tuple[Modifier, ...] = ()
    # Utterances a modifier may draw from (babble talkers). It stays the full dataset after limit(), so
    # limiting a run does not change the noise mixed into the utterances it keeps.
    pool: tuple[Utterance, ...] = field(default=(), repr=False)

    def __post_init__(self) -> None:
        if not self.pool:
            object.__setattr__(self, "pool", self.utterances)

    @property
    def has_transcripts(self) -> bool:
        return bool(self.utterances) and all(u.text is not None for u in self.utterances)

    def fingerprint(self, utt: Utterance) -> str:
        """What a result for `utt` is computed from: a hash of its audio files' bytes (every part of a joined
        recording, `+concat`), its reference text and the modifiers applied to it. A stored result whose
        fingerprint differs is of other data."""
        digest = hashlib.sha256()
        for path in utt.audio_paths:
            try:
                with open(path, "rb") as audio:
                    digest.update(hashlib.file_digest(audio, "sha256").digest())
            except OSError as exc:
                raise UserError(f"cannot read audio file {path}: {exc.strerror}") from None
        digest.update(b"\0".join(part.encode() for part in (utt.text or "", *(m.spec for m in self.modifiers))))
        return digest.hexdigest()[:32]

    def load_audio(self, utt: Utterance) -> np.ndarray:
        if utt.parts:
            pause = np.zeros(round(utt.pause * SAMPLE_RATE), np.float32)
            pieces = [piece for part in utt.parts for piece in (pause, load_audio(part.audio_path))][1:]
            audio = np.concatenate(pieces)
        else:
            audio = load_audio(utt.audio_path)
        for modifier in self.modifiers:
            audio = modifier.apply(audio, utt, self.pool)
        return audio

    def limit(self, n: int | None) -> Dataset:
        """The first n utterances (all of them for None), for quick runs."""
        if n is None:
            return self
        if n < 1:
            raise UserError(f"utterance limit must be at least 1, got {n}")
        return replace(self, utterances=self.utterances[:n])


# ---------------------------------------------------------------------------------------------- audio


# ------------------------------------------------------------------------------------------- kinds


@dataclass(frozen=True)
class _Archive:
    """A downloadable archive and where its content goes under the data root."""

    url: str
    algorithm: str  # hashlib name of the published checksum
    digest: str
    member: str  # folder inside the archive holding the dataset
    dest: str  # folder under the data root


@dataclass(frozen=True)
class _Kind:
    usage: str
    arg: str | None  # name of the required argument after ':', or None when the kind takes none
    scan: Callable[[Path, str, str], tuple[Path, list[Utterance]]]  # (data root, arg, spec) -> folder, utts
    archive: Callable[[str, str], _Archive] | None = None  # (arg, spec) -> archive


def _missing(spec: str, expected: str, fetchable: bool = True) -> UserError:
    hint = f"; run `whisper-ptq data fetch {spec}` or put the files there by hand" if fetchable else ""
    return UserError(f"dataset {spec!r} not found: expected {expected}{hint}")


def _first_dir(candidates: Sequence[Path]) -> Path | None:
    return next((c for c in candidates if c.is_dir()), None)


def _scan_librispeech(root: Path, split: str, spec: str) -> tuple[Path, list[Utterance]]:
    folder = _first_dir([root / "librispeech" / split, root / "LibriSpeech" / split])
    if folder is None:
        raise _missing(spec, f"{root / 'librispeech' / split}/<speaker>/<chapter>/*.flac")
    audio = {p.stem: p for p in folder.glob("*/*/*.flac")}
    transcripts = sorted(folder.glob("*/*/*.trans.txt"))
    if not audio and not transcripts:
        raise _missing(spec, f"<speaker>/<chapter>/*.flac files in {folder}")
    if not transcripts:
        return folder, [Utterance(id=k, audio_path=p, text=None) for k, p in audio.items()]
    utterances = [u for trans in transcripts for u in _read_trans(trans)]
    # A split with transcripts is scored, so an unlisted recording is an error rather than silently dropped.
    unlisted = sorted(set(audio) - {u.id for u in utterances})
    if unlisted:
        raise UserError(f"{audio[unlisted[0]]} has no line in its chapter's .trans.txt")
    return folder, utterances


def _read_trans(path: Path) -> list[Utterance]:
    utterances = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        utt_id, _, text = line.strip().partition(" ")
        if not utt_id:
            continue
        if not text.strip():
            raise UserError(f"{path}:{lineno}: utterance {utt_id} has no transcript text")
        audio = path.parent / f"{utt_id}.flac"
        if not audio.is_file():
            raise UserError(f"{path}:{lineno}: audio file {audio} is missing")
        utterances.append(Utterance(id=utt_id, audio_path=audio, text=text.strip()))
    return utterances


def _scan_ljspeech(root: Path, arg: str, spec: str) -> tuple[Path, list[Utterance]]:
    folder = _first_dir([root / "ljspeech", root / "LJSpeech-1.1"])
    metadata = folder / "metadata.csv" if folder else None
    if metadata is None or not metadata.is_file():
        raise _missing(spec, f"{root / 'ljspeech'}/metadata.csv and wavs/<id>.wav")
    utterances = []
    # Not csv.reader: the texts contain unbalanced quotes, and '|' never occurs inside a field.
    for lineno, line in enumerate(metadata.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split("|")
        # Column 2 is the text as read; column 3 spells out numbers and abbreviations ("Mister", "sixteen
        # hundred"). Whisper writes the former, and the metrics module's Whisper normalizer is built to
        # reconcile written forms, so column 3 would count correct output as errors.
        if len(fields) < 2 or not fields[1].strip():
            raise UserError(f"{metadata}:{lineno}: expected 'id|text|normalized text'")
        wav = folder / "wavs" / f"{fields[0]}.wav"
        if not wav.is_file():
            raise UserError(f"{metadata}:{lineno}: audio file {wav} is missing")
        utterances.append(Utterance(id=fields[0], audio_path=wav, text=fields[1].strip()))
    return folder, utterances


def _scan_manifest(root: Path, arg: str, spec: str) -> tuple[Path, list[Utterance]]:
    manifest = Path(arg).expanduser()
    if not manifest.is_file():
        raise _missing(spec, f"a JSON-lines manifest at {manifest.resolve()}", fetchable=False)
    utterances = []
    for lineno, line in enumerate(manifest.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            utterances.append(_manifest_utterance(line, manifest, lineno))
    if not utterances:
        raise UserError(f"manifest {manifest} is empty: it lists no utterances")
    if len({u.text is None for u in utterances}) > 1:
        raise UserError(f'{manifest}: some lines have "text" and some do not; give it on all or none')
    return manifest.parent, utterances


def _manifest_utterance(line: str, manifest: Path, lineno: int) -> Utterance:
    where = f"{manifest}:{lineno}"
    try:
        entry = json.loads(line)
    except json.JSONDecodeError as exc:
        raise UserError(f"{where}: not valid JSON ({exc.msg})") from exc
    if not isinstance(entry, dict) or not isinstance(entry.get("audio"), str) or not entry["audio"]:
        raise UserError(f'{where}: expected an object like {{"audio": "path.wav", "text": "..."}}')
    text, utt_id = entry.get("text"), entry.get("id", Path(entry["audio"]).with_suffix("").as_posix())
    if not (text is None or isinstance(text, str)) or not isinstance(utt_id, str):
        raise UserError(f'{where}: "text" and "id" must be strings')
    if text is not None and not text.strip():
        # No reference words: its WER would be undefined (or, pooled, count insertions against nothing).
        raise UserError(f'{where}: utterance {utt_id} has no transcript text ("text" is empty)')
    audio = manifest.parent / Path(entry["audio"]).expanduser()  # an absolute path replaces the parent
    if not audio.is_file():
        raise UserError(f"{where}: audio file {audio} is missing")
    return Utterance(id=utt_id, audio_path=audio, text=text)


def _librispeech_archive(split: str, spec: str) -> _Archive:
    if split not in LIBRISPEECH_MD5:
        raise UserError(f"cannot fetch {spec!r}: known LibriSpeech splits are {', '.join(LIBRISPEECH_MD5)}")
    return _Archive(
        url=OPENSLR_URL.format(split=split),
        algorithm="md5",
        digest=LIBRISPEECH_MD5[split],
        member=f"LibriSpeech/{split}",
        dest=f"librispeech/{split}",
    )


def _ljspeech_archive(arg: str, spec: str) -> _Archive:
    return _Archive(LJSPEECH_URL, "sha256", LJSPEECH_SHA256, member="LJSpeech-1.1", dest="ljspeech")


KINDS: dict[str, _Kind] = {
    "librispeech": _Kind("librispeech:<split>", "split", _scan_librispeech, _librispeech_archive),
    "ljspeech": _Kind("ljspeech", None, _scan_ljspeech, _ljspeech_archive),
    "manifest": _Kind("manifest:<file.jsonl>", "file.jsonl", _scan_manifest),
}


# --------------------------------------------------------------------------------------------- specs


@dataclass(frozen=True)
class _Spec:
    kind: _Kind
    base: str  # canonical "<kind>[:<arg>]"
    arg: str
    modifiers: tuple[Modifier, ...]

    @property
    def canonical(self) -> str:
        return "+".join([self.base, *(m.spec for m in self.modifiers)])


def canonical_spec(spec: str) -> str:
    """The spec as tasks are stored under it: the kind's canonical base, every modifier with all its parameters
    (`librispeech:test-clean+concat:seconds=70` -> `...+concat:seconds=70,within=chapter,pause=0.5`)."""
    return _parse_spec(spec).canonical


def _parse_spec(spec: str) -> _Spec:
    parsed = parse_dataset_spec(spec)
    kind = KINDS.get(parsed.kind)
    if kind is None:
        usages = ", ".join(k.usage for k in KINDS.values())
        raise UserError(f"unknown dataset kind {parsed.kind!r} in {spec!r}; valid kinds: {usages}")
    if bool(parsed.arg) != (kind.arg is not None):
        raise UserError(f"bad dataset spec {spec!r}: expected {kind.usage}")
    modifiers = tuple(make_modifier(name, params, spec) for name, params in parsed.modifiers)
    return _Spec(kind, parsed.base, parsed.arg, modifiers)


def resolve_data_root(data_root: Path | str | None = None) -> Path:
    """The data root: the argument, else env WHISPER_PTQ_DATA, else the platform's user data folder."""
    chosen = data_root or os.environ.get("WHISPER_PTQ_DATA") or platformdirs.user_data_dir("whisper-ptq")
    return Path(chosen).expanduser()


def open_dataset(spec: str, data_root: Path | str | None = None) -> Dataset:
    parsed = _parse_spec(spec)
    folder, utterances = parsed.kind.scan(resolve_data_root(data_root), parsed.arg, spec)
    ids = [u.id for u in utterances]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise UserError(f"dataset {spec!r} has utterance id {duplicates[0]!r} more than once")
    ordered = tuple(sorted(utterances, key=lambda u: u.id))
    grouped: Sequence[Utterance] = ordered
    for modifier in parsed.modifiers:
        grouped = modifier.regroup(grouped)
    return Dataset(
        spec=parsed.canonical,
        utterances=tuple(grouped),
        root=folder,
        modifiers=parsed.modifiers,
        pool=ordered,
    )


# ------------------------------------------------------------------------------------------- calibration


def calibration_dataset(settings: Settings, evaluated: Iterable[Dataset]) -> Dataset:
    """The calibration set, refused when it shares any audio with a dataset being evaluated."""
    calib = open_dataset(settings.calibration, settings.data_root).limit(settings.calibration_limit)
    calib_audio = {path.resolve() for u in calib.utterances for path in u.audio_paths}
    for dataset in evaluated:
        if calib_audio & {path.resolve() for u in dataset.utterances for path in u.audio_paths}:
            raise UserError(
                f"calibration set {settings.calibration!r} overlaps the evaluation set {dataset.spec!r}: "
                "calibrating on test data is refused; use e.g. --calibration librispeech:train-clean-100"
            )
    return calib


# ------------------------------------------------------------------------------------------- fetching


def fetch_dataset(spec: str, data_root: Path | str | None = None) -> Path:
    """Download and unpack a dataset's official archive into the data root; returns its folder.

    Already-present data is left alone. Modifiers in the spec are accepted and ignored: they are applied
    when audio is loaded, not stored.
    """
    parsed = _parse_spec(spec)
    if parsed.kind.archive is None:
        raise UserError(f"dataset {spec!r} is made of local files; there is nothing to fetch")
    archive = parsed.kind.archive(parsed.arg, spec)
    root = resolve_data_root(data_root)
    dest = root / archive.dest
    if dest.is_dir():
        return dest
    root.mkdir(parents=True, exist_ok=True)
    # The temp folder sits in the data root so the final rename is atomic: a crash or Ctrl-C leaves either
    # nothing or the complete dataset, never a half-unpacked one.
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=root) as tmp:
        tarball = Path(tmp) / archive.url.rsplit("/", 1)[-1]
        _download(archive, tarball, dest)
        try:
            with tarfile.open(tarball) as tar:
                tar.extractall(Path(tmp) / "unpacked", filter="data")
        except tarfile.TarError as exc:
            raise UserError(f"cannot unpack {archive.url} ({exc}); cannot install it to {dest}") from exc
        unpacked = Path(tmp) / "unpacked" / archive.member
        if not unpacked.is_dir():
            raise UserError(f"{archive.url} does not contain {archive.member}/; cannot install it to {dest}")
        dest.parent.mkdir(parents=True, exist_ok=True)
        unpacked.rename(dest)
    return dest


def _download(archive: _Archive, target: Path, dest: Path) -> None:
    by_hand = f"download it by hand and unpack it so that its {archive.member}/ folder becomes {dest}"
    checksum = hashlib.new(archive.algorithm)
    try:
        with (
            urllib.request.urlopen(archive.url, timeout=CONNECT_TIMEOUT_S) as response,
            target.open("wb") as out,
        ):
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=target.name) as bar:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    checksum.update(chunk)
                    bar.update(len(chunk))
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise UserError(f"cannot download {archive.url} ({reason}); {by_hand}") from exc
    if checksum.hexdigest() != archive.digest:
        raise UserError(f"{archive.url} failed its {archive.algorithm} check (corrupt download); {by_hand}")
