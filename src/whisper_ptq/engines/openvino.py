"""The OpenVINO engine: Whisper's two graphs (`engines/graphs.py`) converted to OpenVINO IR by
`openvino.convert_model` from the torch modules, compiled for the CPU plugin, decoded by the shared search
(`engines.graphs.GraphDecoding`).

A model folder holds `encoder.xml`/`.bin` and `decoder.xml`/`.bin`, with the input and output names of the
ONNX graphs (`engines/onnx.py`). The CPU plugin's default inference precision is bf16 on CPUs with AVX-512 BF16
or AMX; the engine asks for `precision` explicitly (f32 unless told), and records it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

ENCODER, DECODER = "encoder.xml", "decoder.xml"


def convert_openvino(model: Any) -> tuple[Any, Any]:
    """The transformers model's encoder and decoder graphs as `openvino.Model`s (fp32, dynamic shapes)."""
    import openvino as ov
    import torch
    from openvino.frontend.pytorch.ts_decoder import TorchScriptPythonDecoder

    from whisper_ptq.engines.graphs import exportable_graphs

    converted = []
    with torch.no_grad():
        for graph, inputs, names_in, names_out in exportable_graphs(model):
            shapes = [ov.PartialShape([-1] * len(t.shape)) for t in inputs]
            # Traced, not from torch.export's program: that leaves attention as MatMul + Softmax, where the
            # trace's becomes ScaledDotProductAttention (encoder 395 against 303 ms a window, whisper-base fp32,
            # 2 threads). The trace is not checked: convert_model's own `torch.jit.trace` re-runs the graph twice
            # to compare (11 of the encoder's 13.4 s); the converted ops are the same (4.8 s).
            traced = TorchScriptPythonDecoder(graph, example_input=inputs, trace_kwargs={"check_trace": False})
            ov_model = ov.convert_model(traced, input=shapes)
            for port, name in zip(ov_model.inputs, names_in, strict=True):
                port.get_tensor().set_names({name})
            for port, name in zip(ov_model.outputs, names_out, strict=True):
                port.get_tensor().set_names({name})
            converted.append(ov_model)
    return converted[0], converted[1]


def save_openvino(encoder: Any, decoder: Any, out_dir: Path) -> None:
    import openvino as ov

    out_dir.mkdir(parents=True, exist_ok=True)
    for model, name in ((encoder, ENCODER), (decoder, DECODER)):
        # save_model compresses fp32 weights to fp16 unless told not to
        ov.save_model(model, str(out_dir / name), compress_to_fp16=False)


def compile_config(threads: int, precision: str) -> dict[str, Any]:
    return {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": precision, "NUM_STREAMS": 1}


def openvino_engine(
    encoder: Any, decoder: Any, model: Any, processor: Any, threads: int, precision: str, workspace: Any = None
) -> Any:
    """The two graphs (`openvino.Model`s, or their .xml paths) compiled for the CPU plugin, decoded by the
    shared search (`engines.graphs.GraphDecoding`); `model` gives the decoding rules (its configs)."""
    import openvino as ov

    from whisper_ptq.engines.graphs import GraphDecoding

    core, config = ov.Core(), compile_config(threads, precision)
    encoder_request = core.compile_model(encoder, "CPU", config).create_infer_request()
    decoder_request = core.compile_model(decoder, "CPU", config).create_infer_request()
    # share_inputs: a plain call copies its inputs, and every decoder step's include each layer's cross-attention
    # keys/values (37 MB an utterance for whisper-base): sharing them made ov-int8 9% faster at batch 1 and 8.
    # The outputs are copied (share_outputs=False): the past keys/values outlive the step.
    return GraphDecoding(
        lambda features: list(encoder_request.infer({"input_features": features}, share_inputs=True).values()),
        lambda feeds: list(decoder_request.infer(feeds, share_inputs=True).values()),
        model,
        processor,
        workspace,
    )


def openvino_dir_engine(
    model_dir: Path, model: Any, processor: Any, threads: int, precision: str, workspace: Any = None
) -> Any:
    return openvino_engine(
        str(model_dir / ENCODER), str(model_dir / DECODER), model, processor, threads, precision, workspace
    )
