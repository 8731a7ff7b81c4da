"""Which of faster-whisper's settings make its WER differ from whisper-ptq's CTranslate2 rows (issue 19, part 4).

One CTranslate2 conversion, transcribed by: the study's common decoding (`ct2-*`), faster-whisper's own pipeline
with the study's settings (`faster-whisper-*`), and that pipeline with one difference removed at a time:
- no-speech skipping off (`no_speech_threshold=None`);
- blank suppression off at the first token (`suppress_blank=False`);
- the length limit lifted to the common decoding's (faster-whisper passes max_length=448 to CTranslate2,
  which decodes at most half of it; the benchmark raises WhisperModel.max_length to twice that);
and the common decoding fed faster-whisper's log-mel features instead of transformers'.
It prints WER / CER per variant and how many hypotheses differ from the common decoding's, with the ids.

    python benchmarks/faster_whisper_settings.py --model base --compute-type float32 --threads 2 \
        --dataset librispeech:test-other --data-root ../shared/data --json fw.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from whisper_ptq.backends import BuildContext, backend_for, get_recipe
from whisper_ptq.data import SAMPLE_RATE, open_dataset
from whisper_ptq.engines.ct2 import CT2Transcriber
from whisper_ptq.engines.decoding import Prompt, Search, Transcript, transcribe, vocabulary
from whisper_ptq.engines.faster_whisper import FasterWhisperTranscriber
from whisper_ptq.models.loading import load_model
from whisper_ptq.results.metrics import corpus_rates, score_utterance
from whisper_ptq.settings import DecodingOptions

VARIANTS = {
    "faster-whisper (study settings)": {},
    "  no_speech_threshold=None": {"no_speech_threshold": None},
    "  suppress_blank=False": {"suppress_blank": False},
    "  max length as the common decoding": {"max_length": True},
    "  all three": {"no_speech_threshold": None, "suppress_blank": False, "max_length": True},
}


class FasterWhisperFeatures:
    """The common decoding with faster-whisper's log-mel features (its FeatureExtractor, padded to 30 s)."""

    def __init__(self, common: CT2Transcriber):
        from faster_whisper.audio import pad_or_trim
        from faster_whisper.feature_extractor import FeatureExtractor

        self.common, self.extract, self.pad = common, FeatureExtractor(), pad_or_trim

    def transcribe_recordings(self, audios: list[np.ndarray], options: DecodingOptions) -> list[Transcript]:
        features = np.stack([self.pad(self.extract(a)[..., :-1]) for a in audios]).astype(np.float32)
        decoded = self.common.decode(features, short_prompt(self.common), Search())
        tokenizer = self.common.processor.tokenizer
        texts = tokenizer.batch_decode([d.tokens for d in decoded], skip_special_tokens=True)
        pieces = zip(texts, decoded, audios, strict=True)
        return [Transcript(t, "en", not d.finished, len(a) / SAMPLE_RATE, 1) for t, d, a in pieces]


def short_prompt(engine: CT2Transcriber) -> Prompt:
    """The common decoding's prompt for an English clip of 30 s or less."""
    return Prompt("en" if engine.multilingual else None, "transcribe", timestamps=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="base")
    parser.add_argument("--compute-type", default="float32")
    parser.add_argument("--dataset", default="librispeech:test-other")
    parser.add_argument("--data-root", type=Path, default=None)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dataset = open_dataset(args.dataset, args.data_root)
    utterances = dataset.utterances[: args.limit]
    audios = [dataset.load_audio(u) for u in utterances]
    recipe = get_recipe(f"ctranslate2:compute_type={args.compute_type},pipeline=native")
    bundle = load_model(args.model, None)
    with tempfile.TemporaryDirectory() as work:
        built = backend_for(recipe).quantize(bundle, recipe, BuildContext(work_dir=Path(work)))
        model_dir = built.model
        common = CT2Transcriber.for_bundle(model_dir, bundle, args.compute_type, "cpu")
        systems = {f"common decoding (ct2-{args.compute_type})": common}
        for name, overrides in VARIANTS.items():
            overrides = dict(overrides)
            lift = overrides.pop("max_length", False)
            fw = FasterWhisperTranscriber(model_dir, args.compute_type, "cpu", args.threads, overrides=overrides)
            if lift:
                prompt = vocabulary(common).tokens(short_prompt(common), common.max_target_positions)
                fw.model.max_length = common.ct2_max_length(len(prompt))
            systems[name] = fw
        systems["common decoding, faster-whisper's features"] = FasterWhisperFeatures(common)
        results = {}
        base_texts = None
        for name, system in systems.items():
            texts = [transcribe(system, [a], DecodingOptions())[0].text for a in audios]
            scores = [score_utterance(u.text, t) for u, t in zip(utterances, texts, strict=True)]
            wer, cer = corpus_rates(scores)[:2]
            base_texts = base_texts or texts
            differing = [u.id for u, t, b in zip(utterances, texts, base_texts, strict=True) if t.strip() != b.strip()]
            results[name] = {"wer": wer, "cer": cer, "differ_from_common": differing, "texts": texts}
            print(f"{name:48s} WER {wer:6.2f}  CER {cer:5.2f}  differ from common: {len(differing)} {differing}")
    long = [u.id for u, a in zip(utterances, audios, strict=True) if len(a) > 30 * SAMPLE_RATE]
    print(f"utterances longer than 30 s (long form): {len(long)} {long}")
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"data_root": str(args.data_root)}, **results}, indent=1))


if __name__ == "__main__":
    main()
