"""Transcribe one clip with an exported ONNX Runtime or OpenVINO folder through the runtime's own API only
(no whisper_ptq import): what a user of the export does. Run as a script in a fresh process:

    python tests/runtime_reload.py onnxruntime|openvino EXPORT_DIR AUDIO.npy

Prints the text as JSON. The greedy loop is the export README's contract: prompt, suppressed tokens, eos.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np


def reload_and_transcribe(runtime: str, export: Path, audio: np.ndarray, scratch: Path) -> str:
    """The text this script prints for `audio`, run in a fresh Python process."""
    clip = scratch / "clip.npy"
    np.save(clip, audio)
    command = [sys.executable, str(Path(__file__)), runtime, str(export), str(clip)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def runtime_models(runtime: str, weights: str):
    if runtime == "onnxruntime":
        import onnxruntime

        encoder, decoder = (
            onnxruntime.InferenceSession(f"{weights}/{part}.onnx", providers=["CPUExecutionProvider"])
            for part in ("encoder", "decoder")
        )
        return (lambda feeds: encoder.run(None, feeds)), (lambda feeds: decoder.run(None, feeds))
    import openvino

    core = openvino.Core()
    encoder, decoder = (
        core.compile_model(core.read_model(f"{weights}/{part}.xml"), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        for part in ("encoder", "decoder")
    )
    return (lambda feeds: list(encoder(feeds).values())), (lambda feeds: list(decoder(feeds).values()))


def main() -> None:
    from transformers import GenerationConfig, WhisperProcessor

    runtime, export, audio = sys.argv[1], sys.argv[2], np.load(sys.argv[3])
    processor = WhisperProcessor.from_pretrained(f"{export}/model")
    generation = GenerationConfig.from_pretrained(f"{export}/model")
    encode, decode = runtime_models(runtime, f"{export}/weights")
    features = processor.feature_extractor(audio, sampling_rate=16000, return_tensors="np").input_features
    cross = encode({"input_features": features.astype(np.float32)})
    past = [np.zeros((1, c.shape[1], 0, c.shape[3]), np.float32) for c in cross]
    prompt = processor.tokenizer.convert_tokens_to_ids(["<|startoftranscript|>", "<|notimestamps|>"])
    tokens, new = list(prompt), list(prompt)
    while len(tokens) < generation.max_length:
        feeds = {"input_ids": np.array([new], dtype=np.int64)}
        for i in range(len(cross) // 2):
            feeds |= {f"past_key_{i}": past[2 * i], f"past_value_{i}": past[2 * i + 1]}
            feeds |= {f"cross_key_{i}": cross[2 * i], f"cross_value_{i}": cross[2 * i + 1]}
        logits, *past = decode(feeds)
        logits = np.array(logits[0], dtype=np.float32)
        logits[generation.suppress_tokens] = -np.inf
        if len(tokens) == len(prompt):
            logits[generation.begin_suppress_tokens] = -np.inf
        token = int(logits.argmax())
        tokens.append(token)
        if token == generation.eos_token_id:
            break
        new = [token]
    print(json.dumps(processor.tokenizer.decode(tokens, skip_special_tokens=True)))


if __name__ == "__main__":
    main()
