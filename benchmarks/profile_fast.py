"""What limits `fast-cpu` on this CPU, in numbers: each GEMM kind's throughput at the encoder's width against the
CPU's peak for its instruction set, the decoder's few-row GEMMs as bytes of weights read per second, and how a
transcription splits between the encoder and the decoding loop, beside transformers fp32's split (whose encoder share
bounds what faster kernels can gain), the two interleaved utterance by utterance against a shared machine's drift;
where fast-cpu is an OpenVINO recipe, the CPU plugin's own per-node counters of each graph, its linears against the
same peaks.

    python benchmarks/profile_fast.py --model base --data-root ../shared/data --limit 12 [--cpu-class avx2]

Peaks are per core and cycle (two FMA ports: fp32 FMA 64 FLOP on AVX-512, 32 on AVX2; AVX-512 BF16 128;
AVX-512 VNNI int8 256 ops; AMX 1024 bf16 FLOP and 2048 int8 ops) times the nominal clock /proc/cpuinfo reports
and the threads used: an upper bound, since a VM's cores run at whatever clock they get.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

from whisper_ptq.results.environment import FORCE_CLASS_ENV, cpu_class, force_cpu_class_of

force_cpu_class_of(sys.argv)  # before torch loads: the libraries read their ISA caps once

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from whisper_ptq.backends import get_recipe  # noqa: E402
from whisper_ptq.backends.base import linear_layers  # noqa: E402
from whisper_ptq.data import SAMPLE_RATE, open_dataset  # noqa: E402
from whisper_ptq.engines.fast import DynamicInt8Linear, quantize_rows  # noqa: E402
from whisper_ptq.evaluation import Quantized  # noqa: E402
from whisper_ptq.settings import Settings  # noqa: E402

# Peak FLOP (or int8 ops) per core and cycle, per CPU class and GEMM kind; None: emulated or absent.
PEAK_PER_CYCLE = {
    "amx": {"fp32": 64, "bf16": 1024, "int8": 2048},
    "avx512-bf16": {"fp32": 64, "bf16": 128, "int8": 256},
    "avx512-vnni": {"fp32": 64, "bf16": None, "int8": 256},
    "avx2": {"fp32": 32, "bf16": None, "int8": 64},  # vpmaddubsw + vpmaddwd: 32 int8 MACs a cycle and port
    "portable": {"fp32": None, "bf16": None, "int8": None},
}
ROWS, WIDTH, OUT = 1500, 512, 2048  # whisper-base's MLP (fc1) over the encoder's 1500 frames


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="base")
    p.add_argument("--recipe", default="fast-cpu")
    p.add_argument(
        "--baseline",
        default="fp32",
        help="split beside the recipe, interleaved: the reference the goals are ratios against",
    )
    p.add_argument("--dataset", default="librispeech:test-other")
    p.add_argument("--data-root", type=Path, default=None)
    p.add_argument("--limit", type=int, default=12)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cpu-class", choices=sorted(FORCE_CLASS_ENV), default=None, help="as benchmarks/speed.py")
    return p.parse_args()


def median_seconds(call, repeats: int = 20) -> float:
    for _ in range(5):
        call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def nominal_ghz() -> float | None:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("cpu MHz"):
            return float(line.split(":")[1]) / 1000
    return None


def gemm_throughput(threads: int) -> None:
    """The encoder's fc1 at full width in each kind, and the decoder's (one row) as weight bytes per second."""
    torch.manual_seed(0)
    weight = torch.randn(OUT, WIDTH) * 0.05
    int8_weight, weight_scale = quantize_rows(weight)

    def int_mm(x: torch.Tensor) -> torch.Tensor:  # oneDNN's int8 GEMM with per-token activation scales
        values, scale = quantize_rows(x)
        return torch._int_mm(values, int8_weight.t()).float() * scale * weight_scale.view(1, -1)

    kinds = {
        "fp32": (lambda x: F.linear(x, weight), "fp32", 4),
        "bf16": ((lambda w: lambda x: F.linear(x.bfloat16(), w))(weight.bfloat16()), "bf16", 2),
        "int8 _int_mm (per-token)": (int_mm, "int8", 1),
        "int8 fbgemm (per-call)": (DynamicInt8Linear(weight, None), "int8", 1),
        "int8 fbgemm 7-bit": (DynamicInt8Linear(weight, None, seven_bit=True), "int8", 1),
    }
    here, ghz = cpu_class(), nominal_ghz()
    print(f"GEMM {ROWS}x{WIDTH} by {WIDTH}x{OUT}, {threads} threads, class {here}, nominal {ghz} GHz")
    frames, token = torch.randn(ROWS, WIDTH), torch.randn(1, WIDTH)
    for name, (linear, kind, size) in kinds.items():
        full = median_seconds(lambda linear=linear: linear(frames), repeats=10)
        row = median_seconds(lambda linear=linear: linear(token), repeats=50)
        rate = 2 * ROWS * WIDTH * OUT / full / 1e9
        peak = PEAK_PER_CYCLE[here][kind]
        vs_peak = (
            f"{100 * rate / (peak * ghz * threads):.0f}% of peak {peak * ghz * threads:.0f}" if peak and ghz else "-"
        )
        print(
            f"  {name:<26} {full * 1e3:7.2f} ms  {rate:7.0f} GFLOP/s ({vs_peak});  "
            f"1 row {row * 1e6:6.1f} us = {OUT * WIDTH * size / row / 1e9:5.1f} GB/s of weights"
        )


def timed_encoder(session: Quantized) -> tuple[list[float], Callable[[], None]]:
    """Times every encoder window of `session` into the returned list until the returned function is called: an
    engine's own `encode` where it has one, a torch model's encoder module (transformers) otherwise."""
    transcriber, seconds = session.built.transcriber, []
    if hasattr(transcriber, "encode"):
        encode = transcriber.encode

        def timed_encode(features):
            start = time.perf_counter()
            encoded = encode(features)
            seconds.append(time.perf_counter() - start)
            return encoded

        transcriber.encode = timed_encode
        return seconds, lambda: setattr(transcriber, "encode", encode)
    encoder, started = session.model.get_encoder(), []
    hooks = (
        encoder.register_forward_pre_hook(lambda *_: started.append(time.perf_counter())),
        encoder.register_forward_hook(lambda *_: seconds.append(time.perf_counter() - started.pop())),
    )
    return seconds, lambda: [hook.remove() for hook in hooks]


def encoder_decoder_split(sessions: list[Quantized], audios: list) -> None:
    """Batch-1 transcription time split into the encoder's windows and the rest (features and the decoding loop),
    the sessions interleaved utterance by utterance; then each later session as x faster than the first."""
    for session in sessions:
        for audio in audios[:3]:
            session.transcribe_timed([audio])
    timers = [timed_encoder(session) for session in sessions]
    totals = [0.0] * len(sessions)
    for audio in audios:
        for i, session in enumerate(sessions):
            totals[i] += session.transcribe_timed([audio])[1]
    audio_s = sum(len(a) for a in audios) / SAMPLE_RATE
    parts = []  # per session: (encoder, decoding and features, transcription) seconds
    for session, (encoder_s, stop), total in zip(sessions, timers, totals, strict=True):
        stop()
        encoder = sum(encoder_s)
        parts.append((encoder, total - encoder, total))
        plan = session.info.get("kernel_plan")
        kernels = f"{plan['name']} plan" if plan else session.info.get("engine", session.recipe.library)
        print(
            f"{session.recipe.name} ({kernels}), batch 1, {len(audios)} utterances, {audio_s:.0f} s: "
            f"RTF {total / audio_s:.4f}; encoder {encoder:.2f} s ({100 * encoder / total:.0f}%, "
            f"{1e3 * encoder / len(encoder_s):.0f} ms a 30 s window), decoding and features {total - encoder:.2f} s "
            f"({100 * (total - encoder) / total:.0f}%)"
        )
    for part in parts[1:]:
        encoder, rest, total = (base / seconds for base, seconds in zip(parts[0], part, strict=True))
        print(
            f"  x faster than {sessions[0].recipe.name}: encoder {encoder:.2f}, "
            f"decoding and features {rest:.2f}, transcription {total:.2f}"
        )


def openvino_nodes(args: argparse.Namespace, session: Quantized, audio) -> None:
    """Where an OpenVINO recipe's time goes, by the CPU plugin's own per-node counters (`PERF_COUNT`): the
    encoder on a 30 s window, the decoder over every step of greedy-decoding one utterance; the linears
    (FullyConnected nodes, "Compressed" with int8 weights) as GFLOP/s against the peak of the precision they
    compute in, int8 where the encoder's activations are (encoder), and as bytes of int8
    weights read per second (decoder)."""
    from whisper_ptq.engines.openvino import DECODER, ENCODER, compile_graphs

    properties = session.info["plugin_properties"]
    precision = properties["encoder"]["INFERENCE_PRECISION_HINT"]
    folder, layers = Path(session.built.model), session.bundle.model.config.decoder_layers
    graphs = compile_graphs(
        str(folder / ENCODER), str(folder / DECODER), layers, args.threads, properties, PERF_COUNT=True
    )
    runs = {
        "encoder": (graphs.encoder, lambda f: graphs.encode(f["input_features"])),
        "decoder": (graphs.decoder, graphs.decode),
    }
    encoder_feeds, steps = session.built.transcriber.calibration_feeds(audio)

    def per_node_type(part: str, all_feeds: list[dict]) -> dict[str, float]:
        request, run = runs[part]
        seconds: dict[str, float] = {}
        for feeds in all_feeds:
            run(feeds)
            for node in request.profiling_info:
                seconds[node.node_type] = seconds.get(node.node_type, 0.0) + node.real_time.total_seconds()
        return {kind: t / len(all_feeds) for kind, t in seconds.items()}

    # Weights of each graph's linears: the encoder also projects every decoder layer's cross-attention keys and
    # values; the decoder's linears include the LM head (the tied embedding, int8 in these IRs).
    config_ = session.bundle.model.config
    cross = ("encoder_attn.k_proj", "encoder_attn.v_proj")
    weights = {"encoder": 0, "decoder": config_.vocab_size * config_.d_model}
    for name, count in linear_layers(session.bundle.model).items():
        weights["encoder" if ".encoder." in name or name.endswith(cross) else "decoder"] += count
    # The encoder's linears multiply int8 inputs where the recipe quantizes its activations (ptq, ptq-encoder), and
    # where the plugin quantizes them at run time (`dynamic_quantization`): its counters name the same bf16/f32
    # kernel either way, but a window was 1.4x faster with it, its outputs changed.
    int8 = session.recipe.activations == "int8" or session.info["dynamic_quantization"]["encoder"] > 0
    computes = "int8" if int8 else "bf16" if precision == "bf16" else "fp32"
    peak = PEAK_PER_CYCLE[cpu_class()][computes]
    ghz = nominal_ghz()
    per_node_type("encoder", [encoder_feeds])  # warm-up
    for graph, feeds in (("encoder", [encoder_feeds] * 3), ("decoder", steps)):
        times = per_node_type(graph, feeds)
        total = sum(times.values())
        linear = sum(t for kind, t in times.items() if kind.startswith("FullyConnected"))  # ...Compressed: int8
        top = sorted(times.items(), key=lambda kv: -kv[1])[:5]
        shares = ", ".join(f"{kind} {1e3 * t:.2f} ms ({100 * t / total:.0f}%)" for kind, t in top)
        if graph == "encoder":
            rate = 2 * 1500 * weights["encoder"] / linear / 1e9
            ceiling = peak * ghz * args.threads if peak and ghz else None
            limit = f"linears {rate:.0f} GFLOP/s" + (
                f" ({100 * rate / ceiling:.0f}% of {computes} peak {ceiling:.0f})" if ceiling else ""
            )
            unit = "a 30 s window"
        else:
            limit = f"linears read {weights['decoder'] / linear / 1e9:.1f} GB/s of int8 weights"
            unit = f"a step (mean of {len(steps)})"
        print(f"  {graph} ({precision}): {1e3 * total:.2f} ms {unit}: {shares}; {limit}")


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    gemm_throughput(args.threads)
    settings = Settings(threads=args.threads, data_root=args.data_root, progress=False)
    dataset = open_dataset(args.dataset, args.data_root).limit(args.limit)
    audios = [dataset.load_audio(u) for u in dataset.utterances]
    sessions = [
        Quantized.build(args.model, get_recipe(name), settings) for name in dict.fromkeys((args.baseline, args.recipe))
    ]
    encoder_decoder_split(sessions, audios)
    session = sessions[-1]
    if session.recipe.library == "openvino":
        openvino_nodes(args, session, audios[0])


if __name__ == "__main__":
    main()
