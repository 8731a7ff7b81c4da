"""Cross-check the transformers pipeline against an independent implementation.

CTranslate2 decodes the *original* packaged CTranslate2 weights (not our transformers conversion) with float32
greedy search; whisper-ptq's transformers fp32 path decodes our converted model. Same audio, same prompt.
Prints WER/CER of both and how many hypotheses are identical after Whisper normalization (acceptance: >= 85
of the 100 test-other utterances).

    python benchmarks/crosscheck_ct2.py --model base --dataset librispeech:test-other --data-root ../shared/data
"""

from __future__ import annotations

import argparse

from whisper_ptq.data import open_dataset
from whisper_ptq.engines import set_threads
from whisper_ptq.engines.ct2 import CT2Transcriber
from whisper_ptq.engines.hf import HFTranscriber
from whisper_ptq.models.loading import load_model
from whisper_ptq.models.sources import ct2_model_dir
from whisper_ptq.results.metrics import corpus_rates, normalize, score_utterance


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="base", help="a packaged model or a CTranslate2 directory")
    parser.add_argument("--dataset", default="librispeech:test-other")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    set_threads(args.threads)
    dataset = open_dataset(args.dataset, args.data_root).limit(args.limit)
    bundle = load_model(args.model)
    ours = HFTranscriber(bundle.model, bundle.processor)
    reference = CT2Transcriber(ct2_model_dir(bundle.source), bundle.processor, "float32")
    same, scores = 0, {"transformers": [], "ctranslate2": []}
    for utt in dataset.utterances:
        audio = dataset.load_audio(utt)
        hyps = {"transformers": ours.transcribe([audio])[0], "ctranslate2": reference.transcribe([audio])[0]}
        for name, hyp in hyps.items():
            scores[name].append(score_utterance(utt.text, hyp))
        same += normalize(hyps["transformers"]) == normalize(hyps["ctranslate2"])
    for name, rows in scores.items():
        wer, cer = corpus_rates(rows)
        print(f"{name:>12}: WER {wer:.2f}  CER {cer:.2f}")
    print(f"identical hypotheses after normalization: {same} / {len(dataset.utterances)}")


if __name__ == "__main__":
    main()
