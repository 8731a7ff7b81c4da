"""Tests for whisper_ptq.data against the real shared sample (never copied; a file or two go to tmp_path)."""

import hashlib
import json
import shutil
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from whisper_ptq import data
from whisper_ptq.data import SAMPLE_RATE, datasets, load_audio, open_dataset
from whisper_ptq.errors import UserError

TEST_CLEAN_FLAC = "librispeech/test-clean/1089/134686/1089-134686-0000.flac"


def _snr_db(clean: np.ndarray, noisy: np.ndarray) -> float:
    clean64 = clean.astype(np.float64)
    noise = noisy.astype(np.float64) - clean64
    return 10 * np.log10(np.mean(clean64**2) / np.mean(noise**2))


def _peak_hz(x: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / rate)[np.argmax(spectrum)])


def _make_split(root: Path, shared_data: Path, trans_lines: list[str], flacs: list[str]) -> Path:
    """A one-chapter LibriSpeech split under root, its audio copied from one real test-clean file."""
    chapter = root / "librispeech" / "mini" / "1" / "2"
    chapter.mkdir(parents=True)
    for utt in flacs:
        shutil.copy(shared_data / TEST_CLEAN_FLAC, chapter / f"{utt}.flac")
    (chapter / "1-2.trans.txt").write_text("".join(line + "\n" for line in trans_lines))
    return chapter


# ------------------------------------------------------------------------------------------ datasets


@pytest.mark.parametrize(
    ("spec", "count", "has_text"),
    [
        ("librispeech:test-clean", 11, True),
        ("librispeech:test-other", 100, True),
        ("librispeech:train-clean-100", 64, False),
        ("ljspeech", 200, True),
    ],
)
def test_sample_datasets(shared_data, spec, count, has_text):
    ds = open_dataset(spec, shared_data)
    ids = [u.id for u in ds.utterances]
    assert len(ids) == count
    assert ids == sorted(set(ids))
    assert ds.has_transcripts is has_text
    assert all((u.text is not None) is has_text and u.audio_path.is_file() for u in ds.utterances)
    assert ds.spec == spec


def test_librispeech_texts_match_trans_txt(shared_data):
    expected = {}
    for trans in (shared_data / "librispeech" / "test-clean").glob("*/*/*.trans.txt"):
        for line in trans.read_text().splitlines():
            utt_id, text = line.split(" ", 1)
            expected[utt_id] = text
    ds = open_dataset("librispeech:test-clean", shared_data)
    assert {u.id: u.text for u in ds.utterances} == expected


def test_ljspeech_uses_raw_text_column(shared_data):
    first = (shared_data / "ljspeech" / "metadata.csv").read_text().splitlines()[0].split("|")
    utt = open_dataset("ljspeech", shared_data).utterances[0]
    assert (utt.id, utt.text) == (first[0], first[1])


def test_data_root_from_env(shared_data, monkeypatch):
    monkeypatch.setenv("WHISPER_PTQ_DATA", str(shared_data))
    assert data.resolve_data_root() == shared_data
    assert data.resolve_data_root("/elsewhere") == Path("/elsewhere")
    assert len(open_dataset("librispeech:test-clean").utterances) == 11


def test_official_archive_layout_is_accepted(shared_data, tmp_path):
    (tmp_path / "LibriSpeech").mkdir()
    (tmp_path / "LibriSpeech" / "test-clean").symlink_to(shared_data / "librispeech" / "test-clean")
    assert len(open_dataset("librispeech:test-clean", tmp_path).utterances) == 11


def test_limit(shared_data):
    ds = open_dataset("librispeech:test-other", shared_data)
    assert ds.limit(3).utterances == ds.utterances[:3]
    assert ds.limit(None) is ds
    assert ds.limit(1000).utterances == ds.utterances


def test_manifest_with_relative_and_absolute_paths(shared_data, tmp_path):
    (tmp_path / "clips").mkdir()
    shutil.copy(shared_data / TEST_CLEAN_FLAC, tmp_path / "clips" / "a.flac")
    absolute = shared_data / "ljspeech" / "wavs" / "LJ001-0002.wav"
    manifest = tmp_path / "set.jsonl"
    lines = [{"audio": "clips/a.flac", "text": "hello"}, {"audio": str(absolute), "text": "hi", "id": "lj"}]
    manifest.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    ds = open_dataset(f"manifest:{manifest}")
    assert [(u.id, u.text, u.audio_path) for u in ds.utterances] == [
        ("clips/a", "hello", tmp_path / "clips" / "a.flac"),
        ("lj", "hi", absolute),
    ]
    assert ds.root == tmp_path
    assert ds.load_audio(ds.utterances[0]).size > 0


# --------------------------------------------------------------------------------------------- audio


def test_ljspeech_resampled_to_16k(shared_data):
    ds = open_dataset("ljspeech", shared_data)
    utt = ds.utterances[0]
    info = sf.info(utt.audio_path)
    assert info.samplerate == 22050
    audio = ds.load_audio(utt)
    assert audio.dtype == np.float32 and audio.ndim == 1 and audio.flags.c_contiguous
    assert abs(len(audio) - info.frames * SAMPLE_RATE / 22050) <= 1


def test_stereo_44k_becomes_mono_16k(tmp_path):
    t = np.arange(44100) / 44100
    left = 0.5 * np.sin(2 * np.pi * 440 * t)
    path = tmp_path / "stereo.wav"
    sf.write(path, np.stack([left, np.zeros_like(left)], axis=1), 44100, subtype="FLOAT")
    audio = load_audio(path)
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert abs(len(audio) - SAMPLE_RATE) <= 1
    # The channel average of (sine, silence) is the sine at half amplitude.
    assert np.max(np.abs(audio[100:-100])) == pytest.approx(0.25, abs=0.01)


def test_resampling_preserves_frequency(tmp_path):
    rate, freq = 22050, 1234.0
    path = tmp_path / "sine.wav"
    sf.write(path, 0.5 * np.sin(2 * np.pi * freq * np.arange(2 * rate) / rate), rate, subtype="FLOAT")
    audio = load_audio(path)
    assert _peak_hz(audio, SAMPLE_RATE) == pytest.approx(freq, abs=1.0)
    assert np.sqrt(np.mean(audio[200:-200] ** 2)) == pytest.approx(0.5 / np.sqrt(2), rel=0.01)


# --------------------------------------------------------------------------------------------- noise


@pytest.mark.parametrize("kind", ["white", "babble"])
def test_noise_snr(shared_data, kind):
    clean_ds = open_dataset("librispeech:test-clean", shared_data)
    noisy_ds = open_dataset(f"librispeech:test-clean+noise:snr=10,kind={kind}", shared_data)
    for utt in clean_ds.utterances[:3]:
        assert _snr_db(clean_ds.load_audio(utt), noisy_ds.load_audio(utt)) == pytest.approx(10, abs=0.1)


@pytest.mark.parametrize("kind", ["white", "babble"])
def test_noise_deterministic(shared_data, kind):
    spec = f"librispeech:test-clean+noise:snr=5,kind={kind},seed=7"
    first, again = open_dataset(spec, shared_data), open_dataset(spec, shared_data)
    other_seed = open_dataset(spec.replace("seed=7", "seed=8"), shared_data)
    utt = first.utterances[0]
    assert np.array_equal(first.load_audio(utt), again.load_audio(utt))
    assert not np.array_equal(first.load_audio(utt), other_seed.load_audio(utt))
    # Babble draws from the whole split, so limiting a run does not change the noise.
    assert np.array_equal(first.limit(1).load_audio(utt), first.load_audio(utt))


def test_noise_spec_is_canonical(shared_data):
    ds = open_dataset("librispeech:test-other+noise:snr=10.0", shared_data)
    assert ds.spec == "librispeech:test-other+noise:snr=10,kind=white,seed=0"


# -------------------------------------------------------------------------------------------- errors


def test_unknown_kind(shared_data):
    with pytest.raises(UserError, match=r"'timit'.*librispeech:<split>"):
        open_dataset("timit:test", shared_data)


@pytest.mark.parametrize("spec", ["librispeech", "ljspeech:extra"])
def test_bad_argument(shared_data, spec):
    with pytest.raises(UserError, match=spec):
        open_dataset(spec, shared_data)


@pytest.mark.parametrize("spec", ["librispeech:test-clean", "ljspeech"])
def test_missing_data_root(tmp_path, spec):
    missing = tmp_path / "nowhere"
    with pytest.raises(UserError, match=rf"{missing}.*whisper-ptq data fetch {spec}"):
        open_dataset(spec, missing)


def test_missing_split(shared_data):
    with pytest.raises(UserError, match=r"librispeech/dev-clean.*whisper-ptq data fetch librispeech:dev-clean"):
        open_dataset("librispeech:dev-clean", shared_data)


def test_trans_line_without_text(shared_data, tmp_path):
    chapter = _make_split(tmp_path, shared_data, ["1-2-0000 HELLO", "1-2-0001"], ["1-2-0000", "1-2-0001"])
    with pytest.raises(UserError, match=rf"{chapter / '1-2.trans.txt'}:2"):
        open_dataset("librispeech:mini", tmp_path)


def test_listed_audio_missing(shared_data, tmp_path):
    chapter = _make_split(tmp_path, shared_data, ["1-2-0000 HELLO", "1-2-0001 WORLD"], ["1-2-0000"])
    with pytest.raises(UserError, match=str(chapter / "1-2-0001.flac")):
        open_dataset("librispeech:mini", tmp_path)


def test_audio_missing_from_trans(shared_data, tmp_path):
    chapter = _make_split(tmp_path, shared_data, ["1-2-0000 HELLO"], ["1-2-0000", "1-2-0001"])
    with pytest.raises(UserError, match=str(chapter / "1-2-0001.flac")):
        open_dataset("librispeech:mini", tmp_path)


def test_missing_audio_file(tmp_path):
    with pytest.raises(UserError, match=str(tmp_path / "gone.wav")):
        load_audio(tmp_path / "gone.wav")


def test_empty_audio_file(tmp_path):
    path = tmp_path / "empty.wav"
    sf.write(path, np.zeros(0, dtype=np.float32), 16000)
    with pytest.raises(UserError, match=rf"empty.*{path}"):
        load_audio(path)


@pytest.mark.parametrize(
    ("name", "content"),
    [("corrupt.flac", np.random.default_rng(0).bytes(4096)), ("notes.wav", b"just some text\n" * 50)],
)
def test_undecodable_audio(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(UserError, match=str(path)):
        load_audio(path)


@pytest.mark.parametrize(
    "line",
    [
        "{not json",
        '["a.wav"]',
        '{"text": "no audio"}',
        '{"audio": "a.wav", "text": 3}',
        '{"audio": "gone.wav"}',
    ],
)
def test_malformed_manifest_line(tmp_path, line):
    (tmp_path / "a.wav").write_bytes(b"")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"audio": "a.wav", "text": "ok"}\n' + line + "\n")
    with pytest.raises(UserError, match=rf"{manifest}:2"):
        open_dataset(f"manifest:{manifest}")


@pytest.mark.parametrize("n", [0, -1])
def test_bad_limit(shared_data, n):
    ds = open_dataset("librispeech:test-clean", shared_data)
    with pytest.raises(UserError, match=str(n)):
        ds.limit(n)


@pytest.mark.parametrize(
    ("modifier", "culprit"),
    [
        ("noise:snr=loud", "loud"),
        ("noise:snr=10,kind=pink", "pink.*white, babble"),
        ("noise:snr=10,colour=red", "colour.*snr=<dB>"),
        ("noise:kind=white", "snr=<dB>"),
        ("noise:snr=10,seed=x", "seed=x"),
        ("noise:snr", "'snr'"),
        ("reverb:rt60=0.3", "'reverb'.*noise:snr=<dB>"),
    ],
)
def test_bad_modifier(shared_data, modifier, culprit):
    with pytest.raises(UserError, match=culprit):
        open_dataset(f"librispeech:test-clean+{modifier}", shared_data)


def test_babble_needs_other_utterances(shared_data):
    ds = open_dataset("librispeech:test-clean+noise:snr=10,kind=babble", shared_data)
    single = data.Dataset(ds.spec, ds.utterances[:1], ds.root, ds.modifiers)
    with pytest.raises(UserError, match="babble"):
        single.load_audio(single.utterances[0])


# ------------------------------------------------------------------------------------------ fetching


def _serve_archive(tmp_path: Path, shared_data: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """Point test-clean's download at a local tar.gz in the official layout; returns its md5."""
    staging = tmp_path / "staging"
    _make_split(staging, shared_data, ["1-2-0000 HELLO"], ["1-2-0000"])
    tarball = tmp_path / "test-clean.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(staging / "librispeech" / "mini", arcname="LibriSpeech/test-clean")
    monkeypatch.setattr(datasets, "OPENSLR_URL", f"file://{tmp_path}/{{split}}.tar.gz")
    return hashlib.md5(tarball.read_bytes()).hexdigest()


def test_fetch_unpacks_verified_archive(shared_data, tmp_path, monkeypatch):
    md5 = _serve_archive(tmp_path, shared_data, monkeypatch)
    monkeypatch.setitem(datasets.LIBRISPEECH_MD5, "test-clean", md5)
    root = tmp_path / "root"
    assert data.fetch_dataset("librispeech:test-clean", root) == root / "librispeech" / "test-clean"
    assert [u.text for u in open_dataset("librispeech:test-clean", root).utterances] == ["HELLO"]
    assert sorted(p.name for p in root.iterdir()) == ["librispeech"]  # no temp folder left behind


def test_fetch_rejects_bad_checksum(shared_data, tmp_path, monkeypatch):
    _serve_archive(tmp_path, shared_data, monkeypatch)
    root = tmp_path / "root"
    with pytest.raises(UserError, match=r"md5.*librispeech/test-clean"):
        data.fetch_dataset("librispeech:test-clean", root)
    assert list(root.iterdir()) == []


def test_fetch_fails_fast_offline(tmp_path, monkeypatch):
    for var in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    # A non-routable address: the connection hangs until the connect timeout instead of failing at once.
    monkeypatch.setattr(datasets, "OPENSLR_URL", "http://10.255.255.1/{split}.tar.gz")
    monkeypatch.setattr(datasets, "CONNECT_TIMEOUT_S", 2.0)
    start = time.monotonic()
    with pytest.raises(UserError, match=rf"by hand.*{tmp_path / 'librispeech' / 'test-clean'}"):
        data.fetch_dataset("librispeech:test-clean", tmp_path)
    assert time.monotonic() - start < 10
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("spec", "culprit"), [("librispeech:test-foo", "test-foo"), ("manifest:x.jsonl", "x.jsonl")])
def test_fetch_unfetchable(tmp_path, spec, culprit):
    with pytest.raises(UserError, match=culprit):
        data.fetch_dataset(spec, tmp_path)


# ------------------------------------------------------------------------------------------ concat


def test_concat_joins_consecutive_utterances_of_a_chapter(shared_data):
    clips = open_dataset("librispeech:test-other", shared_data)
    joined = open_dataset("librispeech:test-other+concat:seconds=120", shared_data)
    assert joined.spec == "librispeech:test-other+concat:seconds=120,within=chapter,pause=0.5"
    assert len(joined.utterances) == 10  # the sample's 10 chapters, each under 120 s
    first = joined.utterances[0]
    assert [p.id for p in first.parts] == [u.id for u in clips.utterances[:10]]
    assert first.id == f"{clips.utterances[0].id}..{clips.utterances[9].id}"
    assert first.text == " ".join(u.text for u in clips.utterances[:10])
    audio = joined.load_audio(first)
    pieces = [clips.load_audio(u) for u in clips.utterances[:10]]
    assert len(audio) == sum(map(len, pieces)) + 9 * SAMPLE_RATE // 2
    assert np.array_equal(audio[: len(pieces[0])], pieces[0])
    assert not audio[len(pieces[0]) : len(pieces[0]) + SAMPLE_RATE // 2].any()  # the pause is silence
    assert first.duration() == pytest.approx(len(audio) / SAMPLE_RATE, abs=1e-3)
    assert open_dataset("librispeech:test-other+concat:seconds=120", shared_data) == joined  # deterministic


def test_a_joined_recordings_fingerprint_covers_every_part(shared_data, tmp_path):
    """A stored result (or a kept calibrated build) of a joined recording is stale when any of its parts
    changes, not only its first."""
    sources = [u.audio_path for u in open_dataset("librispeech:test-clean", shared_data).utterances[:3]]
    for index, source in enumerate(sources[:2]):
        shutil.copy(source, tmp_path / f"clip{index}.flac")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps({"audio": f"clip{i}.flac", "text": "a b"}) + "\n" for i in range(2)))
    spec = f"manifest:{manifest}+concat:seconds=60,within=dataset"

    def joined_fingerprint() -> str:
        dataset = open_dataset(spec, shared_data)
        [joined] = dataset.utterances
        assert len(joined.parts) == 2
        return dataset.fingerprint(joined)

    before = joined_fingerprint()
    shutil.copy(sources[2], tmp_path / "clip1.flac")  # the second part's audio is edited
    assert joined_fingerprint() != before


def test_concat_within_dataset_and_length_bound(shared_data):
    joined = open_dataset("librispeech:test-clean+concat:seconds=75,within=dataset", shared_data)
    assert [len(u.parts) for u in joined.utterances] == [9, 2]
    assert joined.utterances[0].duration() <= 75 and len(joined.utterances[0].text.split()) == 192
    single = open_dataset("librispeech:test-clean+concat:seconds=5", shared_data)
    assert all(not u.parts for u in single.utterances[:1])  # longer than 5 s alone: left as it is
    noisy = open_dataset("librispeech:test-clean+concat:seconds=75,within=dataset+noise:snr=10", shared_data)
    assert len(noisy.load_audio(noisy.utterances[0])) == len(joined.load_audio(joined.utterances[0]))


@pytest.mark.parametrize(
    ("modifier", "culprit"),
    [
        ("concat:within=chapter", "seconds=<s>"),
        ("concat:seconds=-1", "positive"),
        ("concat:seconds=60,within=book", "book"),
        ("concat:seconds=60,gap=1", "'gap'"),
    ],
)
def test_bad_concat(shared_data, modifier, culprit):
    with pytest.raises(UserError, match=culprit):
        open_dataset(f"librispeech:test-clean+{modifier}", shared_data)


def test_concat_needs_transcripts(shared_data):
    with pytest.raises(UserError, match="transcripts"):
        open_dataset("librispeech:train-clean-100+concat:seconds=60", shared_data)
