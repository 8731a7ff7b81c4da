"""The ONNX Runtime engine: Whisper's two graphs (`engines/graphs.py`) exported to ONNX, run by ORT's CPU execution
provider, decoded by the shared search (`engines.graphs.GraphDecoding`).

Export uses `torch.onnx.export`'s TorchScript exporter (`dynamo=False`). The dynamo exporter (torch 2.13's
default) exports the same graphs correctly but took 260 s for tiny.en on two cores against 25 s, and folds the
tied head's transpose into a second copy of the embedding table.

A model folder holds `encoder.onnx` (input `input_features` -> `cross_key_{i}`, `cross_value_{i}`) and
`decoder.onnx` (`input_ids`, `past_key_{i}`, `past_value_{i}`, `cross_key_{i}`, `cross_value_{i}` -> `logits`,
`present_key_{i}`, `present_value_{i}`), each a single file with its weights inside.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

ENCODER, DECODER = "encoder.onnx", "decoder.onnx"
OPSET = 17  # LayerNormalization is an ONNX op from 17 on: one node per norm, which ORT runs fused


def export_onnx(model: Any, out_dir: Path, tie_head: bool = True) -> None:
    """Write the transformers model's encoder and decoder graphs to `out_dir` (fp32). With `tie_head` the LM head
    reads the token embedding itself (stored once); without, it is a MatMul over its own transposed copy, the
    form ORT's quantizers quantize."""
    import torch

    from whisper_ptq.engines.graphs import cross_names, exportable_graphs, layer_names, present_names

    out_dir.mkdir(parents=True, exist_ok=True)
    layers = model.config.decoder_layers
    axes: dict[str, dict[int, str]] = {"input_features": {0: "batch"}, "input_ids": {0: "batch", 1: "new"}}
    axes |= {name: {0: "batch"} for name in ["logits", *cross_names(layers)]}
    axes |= {name: {0: "batch", 2: "past"} for name in layer_names(layers) if name.startswith("past")}
    axes |= {name: {0: "batch", 2: "length"} for name in present_names(layers)}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        for (graph, inputs, names_in, names_out), file in zip(
            exportable_graphs(model), (ENCODER, DECODER), strict=True
        ):
            torch.onnx.export(
                graph,
                inputs,
                str(out_dir / file),
                input_names=names_in,
                output_names=names_out,
                dynamic_axes={name: axes[name] for name in names_in + names_out},
                opset_version=OPSET,
                dynamo=False,
            )
    if tie_head:
        tie_lm_head(out_dir / DECODER)


def tie_lm_head(path: Path) -> None:
    """Replace the head's MatMul over a transposed copy of the embedding (what the exporter folds
    `F.linear(hidden, embedding)` into) by Gemm(hidden, embedding, transB=1), and drop the copy."""
    import onnx

    model = onnx.load(str(path))
    graph = model.graph
    [node] = [n for n in graph.node if "logits" in n.output]
    [embedding] = [i.name for i in graph.initializer if i.name.endswith("embed_tokens.weight")]
    copy = node.input[1]
    gemm = onnx.helper.make_node("Gemm", [node.input[0], embedding], ["logits"], name="lm_head", transB=1)
    graph.node.insert(list(graph.node).index(node), gemm)
    graph.node.remove(node)
    graph.initializer.remove(next(i for i in graph.initializer if i.name == copy))
    onnx.save(model, str(path))


def session_options(threads: int) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return options


def onnx_engine(model_dir: Path, model: Any, processor: Any, threads: int, workspace: Any = None) -> Any:
    """The folder's two graphs in ORT sessions on the CPU execution provider, decoded by the shared search
    (`engines.graphs.GraphDecoding`); `model` gives the decoding rules (its configs)."""
    import onnxruntime as ort

    from whisper_ptq.engines.graphs import GraphDecoding

    options, providers = session_options(threads), ["CPUExecutionProvider"]
    encoder = ort.InferenceSession(str(model_dir / ENCODER), options, providers=providers)
    decoder = ort.InferenceSession(str(model_dir / DECODER), options, providers=providers)
    return GraphDecoding(
        lambda features: encoder.run(None, {"input_features": features}),
        lambda feeds: decoder.run(None, feeds),
        model,
        processor,
        workspace,
    )
