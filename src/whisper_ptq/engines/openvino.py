"""The OpenVINO engine: Whisper's two graphs (`engines/graphs.py`) converted to OpenVINO IR by
`openvino.convert_model` from the torch modules, compiled for the CPU plugin, decoded by the shared search
(`engines.graphs.GraphDecoding`).

A model folder holds `encoder.xml`/`.bin` and `decoder.xml`/`.bin`, with the input and output names of the
ONNX graphs (`engines/onnx.py`). The CPU plugin's default inference precision is bf16 on CPUs with AVX-512 BF16
or AMX; the engine asks for `precision` explicitly (f32 unless told), and records it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from whisper_ptq.errors import UserError

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


def compile_config(threads: int, properties: dict[str, Any]) -> dict[str, Any]:
    """The CPU plugin's compile config of one graph: a recipe's `properties` for it (precision, dynamic
    quantization), on `threads` in one stream (the run decodes one batch at a time)."""
    return {**properties, "INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1}


@dataclass
class CompiledGraphs:
    """Both graphs compiled, with the calls that run them as `GraphDecoding` expects: `encode(features)` -> the
    cross-attention keys/values, `decode(feeds)` -> logits and present keys/values."""

    encoder: Any  # openvino.InferRequest
    decoder: Any
    encode: Callable[[np.ndarray], list[np.ndarray]]
    decode: Callable[[dict[str, np.ndarray]], list[np.ndarray]]


def compile_graphs(
    encoder: Any, decoder: Any, layers: int, threads: int, properties: dict[str, dict[str, Any]], **config: Any
) -> CompiledGraphs:
    """The two graphs (`openvino.Model`s, or their .xml paths) of a `layers`-layer decoder compiled for the CPU
    plugin with each one's `properties` ("encoder", "decoder") and any further `config`.

    Computing in bf16, the cross-attention keys and values pass from the encoder to the decoder in bf16 (as uint16
    arrays holding the bits), not f32: the plugin converted all 12 of whisper-base's (37 MB an utterance) to bf16
    at every decoder step, and skipping that made a step 22% faster (9.8 -> 7.7 ms, Zen 4) with the same logits
    to the bit. The saved IR keeps f32 ports: bf16 is a compile option, which the export's load script sets the same
    way (`backends/openvino.OPENVINO_SESSIONS`)."""
    import openvino as ov

    from whisper_ptq.engines.graphs import cross_names

    core = ov.Core()
    encoder, decoder = (core.read_model(g) if isinstance(g, str) else g for g in (encoder, decoder))
    cross = set(cross_names(layers))
    # Only where the CPU computes in bf16 natively: elsewhere the plugin computes in f32 and would read rounded keys.
    bf16 = properties["decoder"]["INFERENCE_PRECISION_HINT"] == "bf16" and "BF16" in native_capabilities(core)
    if bf16:
        encoder, decoder = _bf16_ports(encoder, "output", cross), _bf16_ports(decoder, "input", cross)
    requests = {}
    for part, graph in (("encoder", encoder), ("decoder", decoder)):
        try:
            compiled = core.compile_model(graph, "CPU", {**compile_config(threads, properties[part]), **config})
        except RuntimeError as error:
            refuse_under_isa_cap(error, f"compile the {part}")
            raise
        requests[part] = compiled.create_infer_request()
    encoder_request, decoder_request = requests["encoder"], requests["decoder"]

    # share_inputs: a plain call copies its inputs, and every decoder step's include each layer's cross-attention
    # keys/values: sharing them made ov-int8 9% faster at batch 1 and 8. The outputs are copied
    # (share_outputs=False): the past keys/values outlive the step. A bf16 output comes back as a float16 array
    # of the same bits, viewed as uint16 here so nothing reads it as float16.
    def encode(features: np.ndarray) -> list[np.ndarray]:
        try:
            outputs = encoder_request.infer({"input_features": features}, share_inputs=True).values()
        except RuntimeError as error:
            refuse_under_isa_cap(error, "run the encoder")
            raise
        return [out.view(np.uint16) for out in outputs] if bf16 else list(outputs)

    def decode(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        if bf16:
            feeds = {k: ov.Tensor(v, list(v.shape), ov.Type.bf16) if k in cross else v for k, v in feeds.items()}
        return list(decoder_request.infer(feeds, share_inputs=True).values())

    return CompiledGraphs(encoder_request, decoder_request, encode, decode)


def _bf16_ports(graph: Any, side: str, names: set[str]) -> Any:
    """`graph` with its `side` ("input" or "output") ports of these `names` typed bf16."""
    import openvino as ov
    from openvino.preprocess import PrePostProcessor

    ports = PrePostProcessor(graph)
    for name in names:
        getattr(ports, side)(name).tensor().set_element_type(ov.Type.bf16)
    return ports.build()


def refuse_under_isa_cap(error: RuntimeError, what: str) -> None:
    """One clear line for a plugin error under `ONEDNN_MAX_CPU_ISA`, which the plugin does not honour: on an
    AVX-512 CPU capped at AVX2, ov-int8-bf16's Softmax had no kernel at compile and ov-int8's FullyConnectedCompressed
    none at the first encoder call (the plugin's own kernels ignore the cap, the oneDNN ones beside them follow
    it). Without the cap the plugin's error stands."""
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA")
    if cap is None:
        return
    lines = [line for line in str(error).splitlines() if line.strip()]
    detail = (lines[-1] if lines else repr(error)).split(". Run workload")[0]
    raise UserError(
        f"OpenVINO cannot {what} under ONEDNN_MAX_CPU_ISA={cap} ({detail}): its CPU plugin does not honour that "
        "cap; unset it to run OpenVINO recipes"
    ) from error


def native_capabilities(core: Any) -> list[str]:
    return list(core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


def openvino_engine(
    encoder: Any,
    decoder: Any,
    model: Any,
    processor: Any,
    threads: int,
    properties: dict[str, dict[str, Any]],
    workspace: Any = None,
) -> Any:
    """The two graphs compiled (`compile_graphs`), decoded by the shared search (`engines.graphs.GraphDecoding`);
    `model` gives the decoding rules (its configs)."""
    from whisper_ptq.engines.graphs import GraphDecoding

    graphs = compile_graphs(encoder, decoder, model.config.decoder_layers, threads, properties)
    return GraphDecoding(graphs.encode, graphs.decode, model, processor, workspace)
