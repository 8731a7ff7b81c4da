"""Layer-wise sensitivity on the packaged tiny.en: group definitions, restriction to one group, the study."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from whisper_ptq.backends import BuildContext, backend_for, get_recipe
from whisper_ptq.backends.mixed import all_linears
from whisper_ptq.data import open_dataset
from whisper_ptq.errors import UserError
from whisper_ptq.models.loading import load_model
from whisper_ptq.results.store import Store
from whisper_ptq.settings import Settings
from whisper_ptq.studies.groups import groups, restrict
from whisper_ptq.studies.runner import Measurement, Run, Runner
from whisper_ptq.studies.sensitivity import Study, run_sensitivity, table_rows, write_tables

SHORTEST = 4  # index of the 2.1 s utterance in the test-clean sample
DynamicLinear = torch.ao.nn.quantized.dynamic.Linear


@pytest.fixture(scope="module")
def tiny(model_cache: Path):
    return load_model("tiny.en", model_cache)


@pytest.fixture(scope="module")
def one_utterance(shared_data: Path):
    dataset = open_dataset("librispeech:test-clean", shared_data)
    return replace(dataset, utterances=(dataset.utterances[SHORTEST],))


def settings(shared_data: Path, model_cache: Path) -> Settings:
    return Settings(data_root=shared_data, cache_dir=model_cache, progress=False)


@pytest.mark.parametrize("level", ["coarse", "fine"])
def test_each_level_covers_every_linear_exactly_once(tiny, level: str) -> None:
    chosen = groups(tiny.model.config, level)
    linears = all_linears(tiny.model)
    assert len(linears) == 4 * 6 + 4 * 10 + 1  # encoder layers x 6, decoder layers x 10, the head
    for name in linears:
        matching = [g.name for g in chosen if any(re.search(p, name) for p in g.patterns)]
        assert len(matching) == 1, (name, matching)
    assert len(chosen) == (6 if level == "coarse" else 5 * 4 + 1)


def test_fine_groups_name_their_layer(tiny) -> None:
    fine = {g.name: g for g in groups(tiny.model.config, "fine")}
    assert fine["decoder.cross_attn.3"].layer == 3 and fine["decoder.cross_attn.3"].component == "decoder.cross_attn"
    assert fine["proj_out"].layer is None and fine["proj_out"].level == "coarse"
    both = [g.name for g in groups(tiny.model.config, "both")]
    assert len(both) == len(set(both)) == 5 + 5 * 4 + 1


def test_restricted_recipe_quantizes_only_its_group(model_cache: Path, tiny) -> None:
    group = next(g for g in groups(tiny.model.config, "fine") if g.name == "decoder.cross_attn.1")
    recipe = restrict(get_recipe("torch-int8-dynamic"), group)
    assert recipe.name == "torch-int8-dynamic@decoder.cross_attn.1"
    model = backend_for(recipe).quantize(load_model("tiny.en", model_cache), recipe, BuildContext()).model
    quantized = {n for n, m in model.named_modules() if isinstance(m, DynamicLinear)}
    assert quantized == {f"model.decoder.layers.1.encoder_attn.{p}_proj" for p in "qkv"} | {
        "model.decoder.layers.1.encoder_attn.out_proj"
    }
    assert sum(type(m) is torch.nn.Linear for m in model.modules()) == len(all_linears(tiny.model)) - 4


def test_unrestrictable_recipes_are_refused(tmp_path: Path, shared_data: Path, model_cache: Path, one_utterance):
    for recipe, message in [
        (get_recipe("fp32"), "quantizes nothing"),
        (replace(get_recipe("hqq-int4"), modules=("fc1",)), "already selects modules"),
    ]:
        with pytest.raises(UserError, match=message):
            run_sensitivity(Study("tiny.en", recipe, one_utterance), settings(shared_data, model_cache), tmp_path)


def test_a_run_that_quantizes_outside_its_group_is_refused(tmp_path, shared_data, model_cache, tiny, one_utterance):
    """What a library that ignores Recipe.modules looks like: more quantized than the run expects."""
    full = get_recipe("torch-int8-dynamic")
    run = Run("pretend group", full, groups(tiny.model.config, "coarse")[0], frozenset({"proj_out"}))
    with Store.create(tmp_path / "results.sqlite", "t", {"kind": "test"}) as store:
        runner = Runner(store, "tiny.en", settings(shared_data, model_cache), all_linears(tiny.model))
        with pytest.raises(UserError, match="ignores Recipe.modules"):
            runner.measure(run, one_utterance)
        assert store.results()[0]["status"] == "failed" and not store.results()[0]["utterances"]


@pytest.mark.slow
def test_study_stores_every_group_and_resumes(tmp_path, shared_data, model_cache, tiny, one_utterance, monkeypatch):
    study = Study("tiny.en", get_recipe("hqq-int4"), one_utterance, "coarse")
    result = run_sensitivity(study, settings(shared_data, model_cache), tmp_path)
    labels = [row.label for row in result.rows]
    # hqq-int4 keeps the tied head fp32: that group has nothing to quantize and says so.
    assert labels == ["fp32", "hqq-int4 (all groups)", *(g.name for g in groups(tiny.model.config, "coarse")[:-1])]
    assert [name for name, _ in result.skipped] == ["proj_out"]
    assert [row.modules for row in result.rows[2:]] == [16, 8, 16, 16, 8]
    assert result.rows[0].wer_increase == 0 and result.rows[0].size_fraction == 1
    assert all(row.size_fraction < 1 for row in result.rows[1:])
    assert {f.name for f in result.files} == {
        "sensitivity_coarse.md",
        "sensitivity_coarse.csv",
        "sensitivity_coarse.png",
    }
    with Store.open(tmp_path / "results.sqlite") as store:
        stored = store.results()
    assert [r["recipe"] for r in stored] == ["fp32", "hqq-int4", *(f"hqq-int4@{label}" for label in labels[2:])]
    assert all(r["status"] == "done" and len(r["utterances"]) == 1 for r in stored)

    def no_more_work(*args, **kwargs):
        raise AssertionError("a finished study ran again")

    monkeypatch.setattr("whisper_ptq.evaluation.Quantized.build", no_more_work)  # imported on use
    assert run_sensitivity(study, settings(shared_data, model_cache), tmp_path).rows == result.rows


def test_table_and_heatmap_from_measurements(tiny, tmp_path: Path) -> None:
    fine = groups(tiny.model.config, "both")
    fp32 = Measurement(Run("fp32", get_recipe("fp32")), "d", 3, 10.0, 5.0, 100, 100, None)
    full = Measurement(Run("all", get_recipe("torch-int8-dynamic")), "d", 3, 14.0, 6.0, 30, 100, None)
    cells = [
        Measurement(Run(g.name, get_recipe("torch-int8-dynamic"), g), "d", 3, 10.0 + i % 3, 5.0, 90, 100, 2)
        for i, g in enumerate(fine)
    ]
    rows = table_rows([fp32, full, *cells])
    assert rows[1].share is None and rows[1].wer_increase == 4.0
    assert [r.share for r in rows[2:5]] == [0.0, 25.0, 50.0]  # percent of the full recipe's +4 points
    files = write_tables(tmp_path, "s", rows, [], "test")
    assert (tmp_path / "s.png").read_bytes().startswith(b"\x89PNG")
    assert {f.name for f in files} == {"s.md", "s.csv", "s.png"}
    assert {f.name for f in write_tables(tmp_path / "none", "s", rows[:2], [], "no groups")} == {"s.md", "s.csv"}
