"""Whisper decoding, written once for every engine: short clips, whole recordings, languages, tasks, fallback.

An engine only decodes batches of 30-second log-mel windows (`WindowDecoder.decode`) and detects languages;
`transcribe` here does everything else, the same way for all of them, so that a quantized recipe and fp32 are
compared under the same decoding:

- **Features**: transformers' `WhisperFeatureExtractor` (the processor's), as every engine used before.
- **Short form** (audio of 30 s or less): one window, padded to 30 s, decoded without timestamps
  (`<|notimestamps|>`); the path and the tokens are those of the engines before long-form existed.
- **Long form** (longer audio): OpenAI's sequential algorithm (`whisper/transcribe.py`). The log-mel of the whole
  recording with 30 s of zeros appended (so the -8 dB floor is the recording's, as in OpenAI); windows of up to
  3000 frames from `seek`, zero-padded; the decoder emits timestamp tokens under OpenAI's timestamp rules
  (transformers' `WhisperTimeStampLogitsProcessor`, CTranslate2's own C++ copy), at most 224 tokens a window;
  the window's complete segments (closed by a timestamp pair) are kept and the next window starts at the last
  complete segment's end timestamp, or at the window's end when the output ends on a single timestamp or has
  no pair. Instantaneous or empty segments are dropped, as OpenAI does. No window is skipped: OpenAI's
  no-speech skip is not applied, so every second of audio is decoded.
- **Language**: given, or (`auto`) detected once per recording on its first 30 s. English-only models have
  no language or task tokens.
- **Options** (`settings.DecodingOptions`, off by default): beam search; temperature fallback (OpenAI's: a window
  whose text compresses more than 2.4x with zlib or whose mean log-probability is below -1 is decoded again by
  sampling at 0.2, 0.4, ... 1.0, seeded by the window's content, so runs repeat exactly); conditioning each
  window on the text before it (`<|startofprev|>`, at most 223 tokens, reset after a window sampled above 0.5).
- **Batching**: recordings advance in lockstep; windows sharing a prompt go to the engine together, and each
  engine's rows are independent of each other, so a batch gives the texts of batch size 1.
- **What happened** is returned with the text (`Transcript`): the language, whether a window stopped at the
  token limit (a runaway), the audio seconds decoded and the number of windows.

An engine may instead be a `Pipeline`: a library's own recording-level transcription (faster-whisper's
`WhisperModel.transcribe`; whisper.cpp's `whisper_full`, asked for by `whispercpp:decoding=native`), run as that
library's users run it; `transcribe` hands it the recordings and the options.

Step-wise engines (the fast CPU engine; the ONNX Runtime and OpenVINO engines, `engines.graphs.GraphDecoding`;
the whisper.cpp engine) do not write a window decoder: they implement `StepModel` (`encode` features, `start`
the decoder on a prompt, `step` one token, `keep` some rows of their state), each step returning `Logits`, and
`StepDecoding` supplies `decode` and `detect_language` on top: greedy search (sampling for fallback) with
Whisper's suppressed tokens and OpenAI's timestamp rules, rows leaving the batch at their end-of-text.
`Logits.shortlist` lets an engine give approximate logits for the whole vocabulary (the fast engine's int8 head)
and exact ones for the few best candidates: the token is chosen among those, re-scored. Step-wise engines search
greedily only.
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple, Protocol, runtime_checkable

import numpy as np

from whisper_ptq.data.audio import SAMPLE_RATE
from whisper_ptq.models.names import LANGUAGES
from whisper_ptq.settings import AUTO, DecodingOptions

N_SAMPLES = 30 * SAMPLE_RATE  # one window: 30 s
HOP_LENGTH = 160  # samples per log-mel frame
N_FRAMES = N_SAMPLES // HOP_LENGTH  # 3000 frames per window
INPUT_STRIDE = 2  # log-mel frames per timestamp step (the encoder's conv2 has stride 2): 0.02 s
SAMPLE_LEN = 224  # OpenAI's tokens per long-form window: n_text_ctx // 2
MAX_INITIAL_TIMESTAMP_INDEX = 50  # OpenAI's max_initial_timestamp 1.0 s, in 0.02 s steps
FALLBACK_TEMPERATURES = (0.2, 0.4, 0.6, 0.8, 1.0)
COMPRESSION_RATIO_THRESHOLD = 2.4
LOGPROB_THRESHOLD = -1.0
RESET_PROMPT_TEMPERATURE = 0.5  # a window sampled hotter than this does not prompt the next one


# ------------------------------------------------------------------------------------------- the interface


@dataclass(frozen=True)
class Prompt:
    """What a window is decoded as: its language (None for English-only models), task, whether it emits
    timestamps, and the tokens of the text before it (conditioning)."""

    language: str | None
    task: str
    timestamps: bool
    previous: tuple[int, ...] = ()


@dataclass(frozen=True)
class Search:
    """How a batch of windows is searched. `max_new_tokens` None: the engine's short-form limit (transformers'
    rule, `max_length` less the prompt); `seed` is set when `temperature` > 0 (then the batch is one window)."""

    beam_size: int = 1
    temperature: float = 0.0
    seed: int | None = None
    max_new_tokens: int | None = None
    scores: bool = False  # whether `Decoded.logprob` is needed


@dataclass(frozen=True)
class Decoded:
    tokens: tuple[int, ...]  # generated, without the prompt and the end-of-text
    finished: bool  # ended with end-of-text; False: stopped at the token limit
    logprob: float = 0.0  # sum of the log-probabilities of the tokens and the end-of-text (when scores asked)
    temperature: float = 0.0  # the temperature it was sampled at (0: greedy or beam search)


class WindowDecoder(Protocol):
    """What an engine implements (or gets from `StepDecoding`)."""

    processor: Any  # the transformers WhisperProcessor: feature extractor and tokenizer
    multilingual: bool
    max_target_positions: int  # the decoder's positions (448)

    def decode(self, features: np.ndarray, prompt: Prompt, search: Search) -> list[Decoded]:
        """features: (windows, mels, 3000) float32; one prompt for all of them."""
        ...

    def detect_language(self, features: np.ndarray) -> list[int]:
        """The most likely language token of each window."""
        ...


@runtime_checkable
class Pipeline(Protocol):
    """An engine that runs a library's own recording-level pipeline instead of this module's decoding, by design
    (faster-whisper's `WhisperModel.transcribe`, whisper.cpp's `whisper_full`): what that library's users get,
    with `options` applied as far as the library has them."""

    def transcribe_recordings(self, audios: Sequence[np.ndarray], options: DecodingOptions) -> list[Transcript]: ...


@dataclass(frozen=True)
class Transcript:
    text: str
    language: str  # the language of the text (given or detected; "en" for translations and English-only models)
    hit_token_limit: bool  # some window stopped at the token limit instead of its end-of-text
    decoded_seconds: float  # audio the windows covered
    windows: int


# ------------------------------------------------------------------------------------------- vocabulary


@dataclass(frozen=True)
class Vocabulary:
    """Whisper's special tokens in one model's tokenizer (their ids move with the vocabulary: large-v3 has one
    more language)."""

    sot: int
    eot: int
    transcribe: int
    translate: int
    start_of_prev: int
    no_timestamps: int
    languages: dict[str, int]  # code -> token id, the languages this model has
    multilingual: bool

    @property
    def timestamp_begin(self) -> int:
        return self.no_timestamps + 1

    @classmethod
    def of(cls, tokenizer: Any, multilingual: bool) -> Vocabulary:
        ids = tokenizer.convert_tokens_to_ids
        vocab = tokenizer.get_vocab()
        languages = {code: vocab[f"<|{code}|>"] for code in LANGUAGES if f"<|{code}|>" in vocab} if multilingual else {}
        return cls(
            sot=ids("<|startoftranscript|>"),
            eot=ids("<|endoftext|>"),
            transcribe=ids("<|transcribe|>"),
            translate=ids("<|translate|>"),
            start_of_prev=ids("<|startofprev|>"),
            no_timestamps=ids("<|notimestamps|>"),
            languages=languages,
            multilingual=multilingual,
        )

    def tokens(self, prompt: Prompt, max_target_positions: int) -> tuple[int, ...]:
        """The decoder prompt: [<|startofprev|> previous...] <|startoftranscript|> [language task]
        [<|notimestamps|>], the previous text cut to OpenAI's n_text_ctx // 2 - 1 last tokens."""
        start: list[int] = []
        if prompt.previous:
            start = [self.start_of_prev, *prompt.previous[-(max_target_positions // 2 - 1) :]]
        sequence = [self.sot]
        if self.multilingual:
            sequence += [
                self.languages[prompt.language],
                self.translate if prompt.task == "translate" else self.transcribe,
            ]
        if not prompt.timestamps:
            sequence.append(self.no_timestamps)
        return (*start, *sequence)

    def language_of(self, token: int) -> str:
        return next(code for code, i in self.languages.items() if i == token)


def vocabulary(engine: WindowDecoder) -> Vocabulary:
    cached = getattr(engine, "_vocabulary", None)
    if cached is None:
        cached = Vocabulary.of(engine.processor.tokenizer, engine.multilingual)
        engine._vocabulary = cached  # type: ignore[attr-defined]
    return cached


def window_token_limit(prompt_length: int, max_target_positions: int) -> int:
    """New tokens a long-form window may have: OpenAI's sample_len, within the decoder's positions."""
    return min(SAMPLE_LEN, max_target_positions - prompt_length)


# ------------------------------------------------------------------------------------------- transcription


def transcribe(
    engine: WindowDecoder | Pipeline, audios: Sequence[np.ndarray], options: DecodingOptions
) -> list[Transcript]:
    """Text of each 16 kHz mono float32 recording, any length (see the module docstring)."""
    if isinstance(engine, Pipeline):
        return engine.transcribe_recordings(audios, options)
    vocab = vocabulary(engine)
    if options.language not in (AUTO, "en") and vocab.multilingual and options.language not in vocab.languages:
        raise ValueError(f"this model has no language {options.language!r}")
    results: list[Transcript | None] = [None] * len(audios)
    short = [i for i, audio in enumerate(audios) if len(audio) <= N_SAMPLES]
    if short:
        features = log_mel(engine.processor, [audios[i] for i in short])
        languages = _languages(engine, vocab, features, options)
        prompts = [Prompt(language, options.task, timestamps=False) for language in languages]
        for i, decoded, prompt in zip(short, _decode_all(engine, features, prompts, options), prompts, strict=True):
            text = _text(engine, vocab, decoded.tokens)
            seconds = len(audios[i]) / SAMPLE_RATE
            results[i] = Transcript(text, _text_language(prompt), not decoded.finished, seconds, 1)
    long = [i for i, audio in enumerate(audios) if len(audio) > N_SAMPLES]
    for i, transcript in zip(long, _long_form(engine, vocab, [audios[i] for i in long], options), strict=True):
        results[i] = transcript
    return results  # type: ignore[return-value]


def log_mel(processor: Any, audios: Sequence[np.ndarray]) -> np.ndarray:
    """transformers' Whisper features of a batch of clips of 30 s or less, (batch, mels, 3000) float32."""
    features = processor.feature_extractor(list(audios), sampling_rate=SAMPLE_RATE, return_tensors="np")
    return np.ascontiguousarray(features.input_features, dtype=np.float32)


def _languages(
    engine: WindowDecoder, vocab: Vocabulary, first_windows: np.ndarray, options: DecodingOptions
) -> list[str | None]:
    if not vocab.multilingual:
        return [None] * len(first_windows)
    if options.language != AUTO:
        return [options.language] * len(first_windows)
    return [vocab.language_of(token) for token in engine.detect_language(first_windows)]


def _text_language(prompt: Prompt) -> str:
    return "en" if prompt.task == "translate" or prompt.language is None else prompt.language


def _text(engine: WindowDecoder, vocab: Vocabulary, tokens: Sequence[int]) -> str:
    return engine.processor.tokenizer.decode([t for t in tokens if t < vocab.eot])


def _decode_all(
    engine: WindowDecoder, windows: np.ndarray, prompts: Sequence[Prompt], options: DecodingOptions
) -> list[Decoded]:
    """Decode each window with its prompt: windows sharing a prompt in one engine call, then the fallback."""
    decoded: list[Decoded | None] = [None] * len(prompts)
    groups: dict[Prompt, list[int]] = {}
    for i, prompt in enumerate(prompts):
        groups.setdefault(prompt, []).append(i)
    for prompt, rows in groups.items():
        search = Search(options.beam_size, scores=options.temperature_fallback, max_new_tokens=_limit(engine, prompt))
        for row, result in zip(rows, engine.decode(windows[rows], prompt, search), strict=True):
            decoded[row] = result
    if options.temperature_fallback:
        for row, prompt in enumerate(prompts):
            decoded[row] = _fallback(engine, windows[row : row + 1], prompt, decoded[row])  # type: ignore[arg-type]
    return decoded  # type: ignore[return-value]


def _limit(engine: WindowDecoder, prompt: Prompt) -> int | None:
    if not prompt.timestamps:
        return None  # the short-form rule, the engines' own (transformers' generate)
    length = len(vocabulary(engine).tokens(prompt, engine.max_target_positions))
    return window_token_limit(length, engine.max_target_positions)


def _fallback(engine: WindowDecoder, window: np.ndarray, prompt: Prompt, decoded: Decoded) -> Decoded:
    """OpenAI's temperature fallback for one window; the last attempt stands when none passes."""
    vocab = vocabulary(engine)
    seed = zlib.crc32(window.tobytes())
    for index, temperature in enumerate(FALLBACK_TEMPERATURES):
        if not _needs_fallback(_text(engine, vocab, decoded.tokens), decoded):
            return decoded
        search = Search(1, temperature, seed + index, _limit(engine, prompt), scores=True)
        decoded = replace(engine.decode(window, prompt, search)[0], temperature=temperature)
    return decoded


def _needs_fallback(text: str, decoded: Decoded) -> bool:
    raw = text.encode("utf-8")
    repetitive = bool(raw) and len(raw) / len(zlib.compress(raw)) > COMPRESSION_RATIO_THRESHOLD
    return repetitive or decoded.logprob / (len(decoded.tokens) + 1) < LOGPROB_THRESHOLD


@dataclass
class _Recording:
    """One long recording's progress through OpenAI's seek loop."""

    mel: np.ndarray  # (mels, content frames + 3000)
    language: str | None = None
    seek: int = 0
    tokens: list[int] = field(default_factory=list)  # kept segments' tokens, timestamps included
    prompt_reset_since: int = 0
    windows: int = 0
    hit_token_limit: bool = False

    @property
    def content_frames(self) -> int:
        return self.mel.shape[1] - N_FRAMES

    def window(self) -> np.ndarray:
        size = min(N_FRAMES, self.content_frames - self.seek)
        window = np.zeros((self.mel.shape[0], N_FRAMES), dtype=np.float32)
        window[:, :size] = self.mel[:, self.seek : self.seek + size]
        return window


def _long_form(
    engine: WindowDecoder, vocab: Vocabulary, audios: Sequence[np.ndarray], options: DecodingOptions
) -> list[Transcript]:
    if not audios:
        return []
    extractor = engine.processor.feature_extractor
    recordings = [
        _Recording(
            extractor(
                np.concatenate([audio, np.zeros(N_SAMPLES, np.float32)]),
                sampling_rate=SAMPLE_RATE,
                truncation=False,
                padding="longest",
                return_tensors="np",
            ).input_features[0]
        )
        for audio in audios
    ]
    languages = _languages(engine, vocab, np.stack([r.mel[:, :N_FRAMES] for r in recordings]), options)
    for recording, language in zip(recordings, languages, strict=True):
        recording.language = language
    while active := [r for r in recordings if r.seek < r.content_frames]:
        prompts = [
            Prompt(
                r.language,
                options.task,
                timestamps=True,
                previous=tuple(r.tokens[r.prompt_reset_since :]) if options.condition_on_previous_text else (),
            )
            for r in active
        ]
        windows = np.stack([r.window() for r in active])
        for recording, decoded in zip(active, _decode_all(engine, windows, prompts, options), strict=True):
            _advance(recording, decoded, vocab, engine, options)
    return [
        Transcript(
            _text(engine, vocab, r.tokens),
            _text_language(Prompt(r.language, options.task, timestamps=True)),
            r.hit_token_limit,
            len(audio) / SAMPLE_RATE,
            r.windows,
        )
        for r, audio in zip(recordings, audios, strict=True)
    ]


def _advance(
    recording: _Recording, decoded: Decoded, vocab: Vocabulary, engine: WindowDecoder, options: DecodingOptions
) -> None:
    """Keep the window's segments and move `seek`, as OpenAI's `transcribe` does."""
    tokens, begin = list(decoded.tokens), vocab.timestamp_begin
    size = min(N_FRAMES, recording.content_frames - recording.seek)
    is_timestamp = [t >= begin for t in tokens]
    single_ending = is_timestamp[-2:] == [False, True]
    consecutive = [i + 1 for i in range(len(tokens) - 1) if is_timestamp[i] and is_timestamp[i + 1]]
    if consecutive:
        slices = consecutive + ([len(tokens)] if single_ending else [])
        segments = [tokens[a:b] for a, b in zip([0, *slices[:-1]], slices, strict=True)]
        advance = size if single_ending else (tokens[slices[-1] - 1] - begin) * INPUT_STRIDE
    else:
        segments, advance = [tokens], size
    for segment in segments:
        instantaneous = len(segment) > 1 and segment[0] >= begin and segment[0] == segment[-1]
        if not instantaneous and _text(engine, vocab, segment).strip():
            recording.tokens.extend(segment)
    recording.seek += advance if advance > 0 else size  # the rules make advance > 0; never loop forever
    recording.windows += 1
    recording.hit_token_limit |= not decoded.finished
    if not options.condition_on_previous_text or decoded.temperature > RESET_PROMPT_TEMPERATURE:
        recording.prompt_reset_since = len(recording.tokens)


# ------------------------------------------------------------------------------------------- step-wise engines


class Logits(NamedTuple):
    """A decoding step's logits: `values` for every token (rows, vocab), in any float dtype, possibly
    approximate; `shortlist`, when the values are approximate: (masked values) -> (candidate ids, their exact
    logits), both (rows, k). The token is then chosen among the candidates, by their exact logits."""

    values: Any  # torch.Tensor
    shortlist: Callable[[Any], tuple[Any, Any]] | None = None


class StepModel(Protocol):
    """The pieces a step-wise engine supplies; `StepDecoding` does the search."""

    def encode(self, features: Any) -> Any:
        """(batch, mels, 3000) float32 torch features -> the engine's encoder output."""
        ...

    def start(self, encoded: Any, prompt: Any, max_length: int) -> tuple[Logits, Any]:
        """Run the decoder over the prompt tokens (batch, length), with room for `max_length` positions; the
        logits of the last prompt position, and the decoding state (caches)."""
        ...

    def step(self, tokens: Any, position: int, state: Any) -> Logits:
        """Feed one token per row (rows, 1) at `position`; the logits of that position."""
        ...

    def keep(self, state: Any, rows: list[int]) -> Any:
        """The state of the given rows only (ascending), for the rows still decoding."""
        ...


def keep_rows(tensors: Sequence[Any], rows: Sequence[int]) -> list[Any]:
    """Move `rows` (ascending) to the front of each tensor, in place, and return views of that front: no new
    copy of the caches (3 MB a row and layer of cross-attention keys/values for whisper-base) is allocated.
    Row i is filled from row rows[i] >= i, which has not been overwritten yet. Torch tensors (the fast
    engine's caches) or numpy arrays (the runtimes' graphs' caches)."""
    for tensor in tensors:
        for i, row in enumerate(rows):
            if i != row:
                tensor[i] = tensor[row]
    return [tensor[: len(rows)] for tensor in tensors]


@dataclass(frozen=True)
class StepRules:
    """Transformers' Whisper generate rules for a step-wise engine: suppressed tokens (always, and at the first
    generated position), the end-of-text, and the short-form length limit (prompt included)."""

    suppress: tuple[int, ...]
    begin_suppress: tuple[int, ...]
    eos: int
    max_length: int

    @classmethod
    def from_model(cls, model: Any) -> StepRules:
        config = model.generation_config
        return cls(
            suppress=tuple(config.suppress_tokens or ()),
            begin_suppress=tuple(config.begin_suppress_tokens or ()),
            eos=int(config.eos_token_id),
            max_length=min(int(config.max_length), int(model.config.max_target_positions)),
        )


class StepDecoding:
    """`WindowDecoder.decode` and `detect_language` for an engine that implements `StepModel`; the engine
    sets `processor`, `multilingual`, `max_target_positions`, `rules` (`StepRules`) and `generation_config`
    (transformers', for its timestamp rules), and may override `threads` (a context for the decoding loop)."""

    processor: Any
    multilingual: bool
    max_target_positions: int
    rules: StepRules
    generation_config: Any

    def threads(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def decode(self, features: np.ndarray, prompt: Prompt, search: Search) -> list[Decoded]:
        import torch

        if search.beam_size > 1:
            raise ValueError(f"{type(self).__name__} searches greedily only, not with a beam of {search.beam_size}")
        tokens = vocabulary(self).tokens(prompt, self.max_target_positions)
        limit = self.rules.max_length if search.max_new_tokens is None else len(tokens) + search.max_new_tokens
        with torch.inference_mode():
            encoded = self.encode(torch.from_numpy(features))
            with self.threads():
                return self._search(encoded, len(features), tokens, limit, search, prompt.timestamps)

    def detect_language(self, features: np.ndarray) -> list[int]:
        import torch

        vocab = vocabulary(self)
        with torch.inference_mode():
            encoded = self.encode(torch.from_numpy(features))
            with self.threads():
                logits, _ = self.start(encoded, torch.full((len(features), 1), vocab.sot), 1)
            others = torch.ones(logits.values.shape[-1], dtype=torch.bool)
            others[list(vocab.languages.values())] = False
            return _choose(logits, logits.values.masked_fill(others, float("-inf")), None)[0].tolist()

    def _search(
        self, encoded: Any, batch: int, prompt: tuple[int, ...], max_length: int, search: Search, timestamps: bool
    ):
        """Greedy (or sampled) decoding of the batch in lockstep; a row leaves the batch at its end-of-text
        (its state dropped in place), so the longest row's steps cost only its own."""
        import torch

        rules, length = self.rules, len(prompt)
        suppress = torch.tensor(rules.suppress, dtype=torch.long)
        suppress_first = torch.tensor(sorted({*rules.suppress, *rules.begin_suppress}), dtype=torch.long)
        timestamp_rules = self._timestamp_rules(length) if timestamps else None
        generators = None
        if search.temperature > 0:
            generators = [torch.Generator().manual_seed(search.seed + i) for i in range(batch)]  # type: ignore[operator]
        ids = torch.full((batch, max_length), rules.eos)
        ids[:, :length] = torch.tensor(prompt)
        logprobs = torch.zeros(batch, dtype=torch.float64)
        rows = torch.arange(batch)  # the batch row of each active row
        logits, state = self.start(encoded, ids[:, :length], max_length)
        position = length
        while True:
            values = logits.values.index_fill_(1, suppress_first if position == length else suppress, float("-inf"))
            if timestamp_rules is not None:
                values = timestamp_rules(ids[rows, :position], values)
            token, logprob = _choose(logits, values, search, generators, rows)
            ids[rows, position] = token
            if search.scores:
                logprobs[rows] += logprob.double()
            going = token != rules.eos
            position += 1
            if not bool(going.any()) or position == max_length:
                break
            if not bool(going.all()):
                kept = going.nonzero().view(-1).tolist()
                rows, token = rows[going], token[going]
                state = self.keep(state, kept)
            logits = self.step(token[:, None], position - 1, state)
        return [
            _decoded(row, length, rules.eos, float(lp))
            for row, lp in zip(ids[:, :position].tolist(), logprobs, strict=True)
        ]

    def _timestamp_rules(self, begin_index: int) -> Callable[[Any, Any], Any]:
        from transformers.generation.logits_process import WhisperTimeStampLogitsProcessor

        config = timestamp_config(self.generation_config)
        return WhisperTimeStampLogitsProcessor(config, begin_index=begin_index)


def timestamp_config(generation_config: Any) -> Any:
    """A copy of a transformers generation config with OpenAI's initial-timestamp limit, the one every engine
    uses (CTranslate2's default too)."""
    import copy

    config = copy.deepcopy(generation_config)
    config.max_initial_timestamp_index = MAX_INITIAL_TIMESTAMP_INDEX
    return config


def _choose(
    logits: Logits, values: Any, search: Search | None, generators: list[Any] | None = None, rows: Any = None
) -> tuple[Any, Any]:
    """The next token of each row and its log-probability (under the masked distribution)."""
    import torch

    if logits.shortlist is None:
        greedy = values.argmax(dim=-1)
    else:
        candidates, exact = logits.shortlist(values)
        exact = exact.float().masked_fill(values.gather(1, candidates).isinf(), float("-inf"))
        greedy = candidates.gather(1, exact.argmax(dim=-1, keepdim=True)).squeeze(1)
    if search is None or not (search.scores or search.temperature > 0):
        return greedy, None
    mixed = values.float() if logits.shortlist is None else values.float().scatter(1, candidates, exact)
    logprobs = torch.log_softmax(mixed, dim=-1)
    if search.temperature > 0:
        probabilities = torch.softmax(mixed / search.temperature, dim=-1)
        greedy = torch.cat(
            [torch.multinomial(probabilities[i], 1, generator=generators[int(row)]) for i, row in enumerate(rows)]
        )
    return greedy, logprobs.gather(1, greedy[:, None]).squeeze(1)


def _decoded(row: list[int], prompt_length: int, eos: int, logprob: float) -> Decoded:
    generated = row[prompt_length:]
    if eos in generated:
        return Decoded(tuple(generated[: generated.index(eos)]), True, logprob)
    return Decoded(tuple(generated), False, logprob)


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run a block with `threads` intra-op threads (None: unchanged), restoring the previous number."""
    import torch

    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
