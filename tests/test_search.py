"""Mixed-precision search and the mixed backend on the packaged tiny.en: plans, recipe files, the knapsack,
the budget on measured sizes, and refusals."""

from __future__ import annotations

import itertools
import random
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from whisper_ptq.backends import BuildContext, backend_for, get_recipe
from whisper_ptq.backends.base import directory_bytes
from whisper_ptq.backends.layers import HeadTiedEmbedding
from whisper_ptq.backends.mixed import PlanEntry, mixed_recipe, plan_of
from whisper_ptq.cli import main
from whisper_ptq.data import open_dataset
from whisper_ptq.errors import UserError
from whisper_ptq.models.loading import load_model
from whisper_ptq.recipes import save_recipe_file
from whisper_ptq.settings import Settings
from whisper_ptq.studies.groups import Group
from whisper_ptq.studies.search import Cell, SearchSpec, choose, parse_formats, run_search, write_search_report

hqq_quantize = pytest.importorskip("hqq.core.quantize")

SHORTEST = 4  # index of the 2.1 s utterance in the test-clean sample
# few layers, so that HQQ's solver stays quick on a busy CPU
ENCODER_ATTN = r"^model\.encoder\.layers\.0\.self_attn\.(q|k|v|out)_proj$"
DECODER_MLP = r"^model\.decoder\.layers\.1\.fc[12]$"


HEAD_ENTRY = PlanEntry("proj_out", (r"^proj_out$",), get_recipe("hqq:nbits=3,group_size=64,keep=none"))


def plan() -> list[PlanEntry]:
    return [
        PlanEntry("encoder.attn.0", (ENCODER_ATTN,), get_recipe("hqq:nbits=4,group_size=64,keep=none")),
        PlanEntry("decoder.mlp.1", (DECODER_MLP,), get_recipe("hqq:nbits=8,group_size=64,keep=none")),
    ]


def quantize(recipe, model_cache: Path):
    return backend_for(recipe).quantize(load_model("tiny.en", model_cache), recipe, BuildContext())


@pytest.fixture(scope="module")
def mixed(model_cache: Path):
    recipe = mixed_recipe("test-mix", plan())
    return recipe, quantize(recipe, model_cache)


@pytest.fixture(scope="module")
def with_head(model_cache: Path):
    """The plan with the LM head quantized too (HQQ on a 51864 x 384 matrix: slow on a busy CPU)."""
    recipe = mixed_recipe("test-mix-head", [*plan(), HEAD_ENTRY])
    return recipe, quantize(recipe, model_cache)


@pytest.fixture(scope="module")
def audio(shared_data: Path):
    dataset = open_dataset("librispeech:test-clean", shared_data)
    return [dataset.load_audio(dataset.utterances[SHORTEST])]


def test_plan_applies_each_format_to_its_modules_only(mixed) -> None:
    _, quantized = mixed
    model = quantized.model
    bits = {n: m.meta["nbits"] for n, m in model.named_modules() if isinstance(m, hqq_quantize.HQQLinear)}
    assert {n for n, b in bits.items() if b == 4} == {n for n in bits if re.search(ENCODER_ATTN, n)}
    assert {n for n, b in bits.items() if b == 8} == {n for n in bits if re.search(DECODER_MLP, n)}
    assert len(bits) == 4 + 2
    # everything else is untouched fp32, the head still tied to the fp32 embedding
    plain = [n for n, m in model.named_modules() if type(m) is torch.nn.Linear]
    assert len(plain) == 4 * 6 + 4 * 10 + 1 - 6 and not any(re.search(ENCODER_ATTN, n) for n in plain)
    assert model.proj_out.weight is model.get_input_embeddings().weight
    assert [step["group"] for step in quantized.info["plan"]] == ["encoder.attn.0", "decoder.mlp.1"]


@pytest.mark.slow
def test_quantized_head_stays_tied_to_the_embedding(with_head) -> None:
    _, quantized = with_head
    model = quantized.model
    assert model.proj_out.meta["nbits"] == 3
    embedding = model.get_input_embeddings()
    assert isinstance(embedding, HeadTiedEmbedding)
    assert torch.equal(embedding.weight, model.proj_out.dequantize())
    # stored once: the state dict holds the head's packed weights and no embedding table
    assert not any(key.startswith("model.decoder.embed_tokens") for key in model.state_dict())


def test_recipe_file_round_trip(mixed, tmp_path: Path) -> None:
    recipe, _ = mixed
    path = tmp_path / "mix.json"
    save_recipe_file(recipe, path)
    loaded = get_recipe(str(path))
    assert loaded == recipe and plan_of(loaded) == plan()
    assert loaded.library == "mixed" and loaded.weights == "mixed" and loaded.scheme == "weight-only"


@pytest.mark.slow
def test_saved_mix_reloads_to_the_same_transcript(with_head, audio, model_cache: Path, tmp_path: Path) -> None:
    recipe, quantized = with_head
    backend = backend_for(recipe)
    backend.save(quantized, tmp_path)
    fp32 = load_model("tiny.en", model_cache).model
    fp32_bytes = sum(p.numel() * 4 for p in fp32.parameters())  # tied: the embedding once
    table_bytes = fp32.get_input_embeddings().weight.numel() * 4  # half of tiny.en
    # Most layers stay fp32, so the saved mix is about fp32 less the table plus its 3-bit copy (~51% of fp32);
    # the table stored twice (fp32 embedding beside the quantized head) would be above fp32.
    assert directory_bytes(tmp_path) < fp32_bytes - 0.5 * table_bytes
    reloaded = backend.load(load_model("tiny.en", model_cache), recipe, tmp_path, BuildContext())
    assert isinstance(reloaded.model.get_input_embeddings(), HeadTiedEmbedding)
    assert reloaded.transcriber.transcribe(audio) == quantized.transcriber.transcribe(audio)


@pytest.mark.parametrize(
    "entries, message",
    [
        ([], "plan is empty"),
        ([PlanEntry("all", (".",), get_recipe("bf16"))], "not a quantizer"),
        ([PlanEntry("fc", ("fc1",), replace(get_recipe("hqq-int4"), modules=("fc2",)))], "already restricts"),
        ([PlanEntry("none", (), get_recipe("hqq-int4"))], "selects no modules"),
    ],
)
def test_bad_plans_are_refused(entries: list[PlanEntry], message: str) -> None:
    with pytest.raises(UserError, match=message):
        mixed_recipe("bad", entries)


def test_overlapping_entries_are_refused(model_cache: Path) -> None:
    int4 = get_recipe("hqq-int4")
    recipe = mixed_recipe("overlap", [PlanEntry("a", ("fc1",), int4), PlanEntry("b", (r"layers\.0\.",), int4)])
    with pytest.raises(UserError, match="both select model.decoder.layers.0.fc1"):
        quantize(recipe, model_cache)


def test_parametric_mixed_recipe_is_refused() -> None:
    with pytest.raises(UserError, match="plan file"):
        get_recipe("mixed:")


# ---------------------------------------------------------------------------------------------- choosing


def cells(spec: dict[str, list[tuple[str, float, int]]]) -> list[Cell]:
    return [
        Cell(Group(name, name, None, (name,)), fmt, wer, 0.0, saved)
        for name, options in spec.items()
        for fmt, wer, saved in options
    ]


def test_choose_takes_the_least_wer_that_saves_enough() -> None:
    table = cells(
        {
            "a": [("fp32", 0.0, 0), ("int8", 0.1, 50), ("int4", 2.0, 80)],
            "b": [("fp32", 0.0, 0), ("int8", 0.0, 30), ("int4", 0.5, 45)],
        }
    )
    assert [c.format for c in choose(table, 60)] == ["int8", "int8"]  # 0.1 for 80 saved
    assert [c.format for c in choose(table, 90)] == ["int8", "int4"]  # 0.6 beats int4+int8's 2.0
    assert [c.format for c in choose(table, 0)] == ["fp32", "fp32"]  # a tie keeps the earlier, finer format
    with pytest.raises(UserError, match="no mix of these formats saves"):
        choose(table, 126)


def test_choose_takes_no_precision_away_for_a_measured_improvement() -> None:
    """A negative cell is noise: int4's "-0.5" must not beat int8's 0.0 when int8 saves enough, and among
    equally good plans the one that saves the least (keeps the most precision) wins."""
    table = cells(
        {
            "a": [("fp32", 0.0, 0), ("int8", 0.0, 50), ("int4", -0.5, 80)],
            "b": [("fp32", 0.0, 0), ("int8", 0.0, 30), ("int4", -0.4, 45)],
        }
    )
    assert [c.format for c in choose(table, 60)] == ["int8", "int8"]
    assert [c.format for c in choose(table, 30)] == ["fp32", "int8"]  # 30 saved, not a's 50
    assert [c.format for c in choose(table, 100)] == ["int4", "int8"]  # int4 only where the budget needs it


def test_choose_matches_brute_force_and_never_undershoots() -> None:
    rng = random.Random(0)
    for _ in range(30):
        spec = {
            f"g{i}": [("fp32", 0.0, 0)] + [(f"q{k}", rng.uniform(0, 3), rng.randrange(1, 10**7)) for k in range(3)]
            for i in range(5)
        }
        table = cells(spec)
        need = rng.randrange(1, 3 * 10**7)
        groups = [[c for c in table if c.group.name == name] for name in spec]
        feasible = [combo for combo in itertools.product(*groups) if sum(c.saved_bytes for c in combo) >= need]
        if not feasible:
            continue
        picked = choose(table, need)
        assert sum(c.saved_bytes for c in picked) >= need
        optimum = min(sum(c.wer_increase for c in combo) for combo in feasible)
        # rounding savings down may only ever cost a little optimality, never the budget
        assert sum(c.wer_increase for c in picked) <= optimum + 1.0


# ---------------------------------------------------------------------------------------------- refusals


def test_formats_are_checked() -> None:
    assert parse_formats("fp32, int8,int4,int8") == ("fp32", "int8", "int4")
    with pytest.raises(UserError, match="unknown format 'int5'"):
        parse_formats("fp32,int5")
    with pytest.raises(UserError, match="no quantized format"):
        parse_formats("fp32")


@pytest.mark.parametrize("budget", [0.0, -0.2, 1.01])
def test_budget_outside_zero_one_is_refused(shared_data: Path, budget: float) -> None:
    search, test = open_dataset("ljspeech", shared_data), open_dataset("librispeech:test-clean", shared_data)
    with pytest.raises(UserError, match=r"not in \(0, 1\]"):
        SearchSpec("tiny.en", budget, ("fp32", "int4"), search, (test,))


@pytest.mark.parametrize("test_spec", ["ljspeech", "ljspeech+noise:snr=10"])
def test_search_and_test_data_must_differ(shared_data: Path, test_spec: str) -> None:
    search = open_dataset("ljspeech", shared_data).limit(3)
    test = open_dataset(test_spec, shared_data)
    with pytest.raises(UserError, match="shares audio with the search dataset"):
        SearchSpec("tiny.en", 0.5, ("fp32", "int4"), search, (test,))


def test_cli_refusals_are_one_line_exit_2(shared_data: Path, capsys) -> None:
    base = ["search", "--model", "tiny.en", "--data-root", str(shared_data)]
    for extra, message in [
        (["--budget", "0.5", "--formats", "fp32,int5"], "unknown format"),
        (["--budget", "1.5"], "not in (0, 1]"),
        (["--budget", "0.5", "--test-datasets", "ljspeech"], "shares audio"),
    ]:
        assert main([*base, *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1


# ---------------------------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_search_meets_the_budget_on_measured_sizes(shared_data: Path, model_cache: Path, tmp_path: Path) -> None:
    search = open_dataset("ljspeech", shared_data).limit(1)
    clean = open_dataset("librispeech:test-clean", shared_data)
    test = replace(clean, utterances=(clean.utterances[SHORTEST],))
    spec = SearchSpec("tiny.en", 0.45, ("fp32", "int4"), search, (test,))
    result = run_search(spec, Settings(data_root=shared_data, cache_dir=model_cache, progress=False), tmp_path)
    assert result.within_budget
    assert result.mix_search.size_bytes <= 0.45 * result.mix_search.fp32_size_bytes
    # per-group savings, measured one group at a time, add up to the whole mix's measured size
    assert result.mix_search.size_fraction == pytest.approx(result.predicted_size_fraction, abs=0.002)
    assert get_recipe(str(result.recipe_file)) == result.recipe
    assert {c.group.name for c in result.chosen} == {c.group.name for c in result.cells}
    labels = [m.run.label for m in result.tests]
    assert labels == ["fp32", result.recipe.name, "uniform-int4"]
    written = write_search_report(result, tmp_path)
    assert written.name == "search-tiny.en-b0.45.md" and written.with_suffix(".csv").is_file()
    report = written.read_text()
    uniform = result.tests[2]
    # the verdict pairs the mix with the rival utterance by utterance
    assert (uniform.size_bytes <= result.tests[1].size_bytes) == ("p = " in report)
