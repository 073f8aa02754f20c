"""The demo's skills, task files and models: deterministic, loadable by lm-eval, shaped so merging matters."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mergetune.merge_ops.inmemory import InMemoryBuilder
from mergetune.merge_ops.recipe import recipe_from_dict
from mergetune.merge_ops.sources import open_source
from mergetune.demo.skills import (
    HELDOUT_TASKS,
    SEARCH_TASKS,
    SKILLS,
    DemoSettings,
    build_demo_models,
    demo_tokenizer,
    eval_docs,
    generic_texts,
    specialist_layers,
    write_task_dir,
)
from mergetune.demo.tiny import TinySpec
from mergetune.errors import MergetuneError

#: Seconds to build; too short to learn anything, enough to check determinism and caching.
TINY = DemoSettings(
    spec=TinySpec(hidden_size=32, intermediate_size=64, num_hidden_layers=4),
    pretrain_steps=10,
    finetune_steps=10,
    batch_size=16,
)
#: About 20 s on a 2-core CPU: half the demo's depth, enough for both skills to be learned.
SMALL = DemoSettings(
    spec=TinySpec(hidden_size=64, intermediate_size=128, num_hidden_layers=4), pretrain_steps=300, finetune_steps=400
)


def weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(directory / "model.safetensors")


def accuracy(model: torch.nn.Module, skill: str, count: int = 200) -> float:
    """Held-out multiple-choice accuracy; every choice is one token, so one forward pass per question."""
    tok = demo_tokenizer()
    docs = eval_docs(SKILLS[skill], "heldout", count)
    ids = [tok(doc["question"], add_special_tokens=False)["input_ids"] for doc in docs]
    lengths = torch.tensor([len(row) for row in ids])
    tokens = torch.full((len(ids), int(lengths.max())), tok.pad_token_id)
    for row, values in enumerate(ids):
        tokens[row, : len(values)] = torch.tensor(values)
    mask = (torch.arange(tokens.shape[1])[None] < lengths[:, None]).long()
    with torch.no_grad():
        logits = model(input_ids=tokens, attention_mask=mask).logits[torch.arange(len(ids)), lengths - 1]
    choices = torch.tensor([tok.convert_tokens_to_ids(doc["choices"]) for doc in docs])
    gold = torch.tensor([doc["gold"] for doc in docs])
    return (logits.float().gather(1, choices).argmax(dim=1) == gold).float().mean().item()


def test_data_is_deterministic_in_vocabulary_and_search_and_heldout_facts_are_disjoint():
    vocab = demo_tokenizer().get_vocab()
    for skill in SKILLS.values():
        search, heldout = eval_docs(skill, "search", 300), eval_docs(skill, "heldout", 300)
        assert search == eval_docs(skill, "search", 300) and heldout == eval_docs(skill, "heldout", 300)
        assert not {doc["question"] for doc in search} & {doc["question"] for doc in heldout}
        answers = {fact.question: fact.answer for fact in skill.facts}
        for doc in search + heldout:
            assert len(set(doc["choices"])) == 4 and doc["choices"][doc["gold"]] == answers[doc["question"]]
            assert all(choice in vocab for choice in doc["choices"])  # one token each
        assert all(word in vocab for text in skill.texts() for word in text.split())
    assert all(word in vocab for text in generic_texts() for word in text.split())


def test_pretraining_text_teaches_none_of_the_facts():
    generic = " | ".join(generic_texts())
    for skill in SKILLS.values():
        assert not any(fact.question in generic for fact in skill.facts)
    assert "capital" not in generic and "plus" not in generic and "minus" not in generic


def test_task_files_are_reproducible_and_load_in_lm_eval_offline(tmp_path):
    from lm_eval.tasks import TaskManager

    first = write_task_dir(tmp_path / "a", docs_per_split=120)
    second = write_task_dir(tmp_path / "b", docs_per_split=120)
    for path in first.glob("*.jsonl"):
        assert path.read_bytes() == (second / path.name).read_bytes()

    manager = TaskManager(include_path=str(first), include_defaults=False)
    tasks = manager.load(list(SEARCH_TASKS + HELDOUT_TASKS))["tasks"]
    for skill in SKILLS.values():
        for task_name, part in ((skill.task, "search"), (f"{skill.task}_heldout", "heldout")):
            task = tasks[task_name]
            rows = [json.loads(line) for line in (first / f"{skill.name}_{part}.jsonl").read_text().splitlines()]
            assert task.OUTPUT_TYPE == "multiple_choice" and list(task.aggregation()) == ["acc"]
            assert len(task.eval_docs) == 120 and dict(task.eval_docs[0]) == rows[0]
            doc = task.eval_docs[5]
            assert task.doc_to_text(doc) == rows[5]["question"]
            assert task.doc_to_choice(doc) == rows[5]["choices"] and task.doc_to_target(doc) == rows[5]["gold"]


def test_build_is_deterministic_cached_and_keyed_by_settings(tmp_path, caplog):
    first, second = build_demo_models(tmp_path / "a", TINY), build_demo_models(tmp_path / "b", TINY)
    assert set(first) == {"base", "arithmetic", "capitals"}
    for name in first:
        a, b = weights(first[name]), weights(second[name])
        assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a), name

    stamp = tmp_path / "a" / "demo-models.json"
    written = stamp.stat().st_mtime_ns, (first["base"] / "model.safetensors").stat().st_mtime_ns
    with caplog.at_level("INFO", logger="mergetune.demo.skills"):
        assert build_demo_models(tmp_path / "a", TINY) == first
    assert "cached" in caplog.text
    assert (stamp.stat().st_mtime_ns, (first["base"] / "model.safetensors").stat().st_mtime_ns) == written

    changed = DemoSettings(spec=TINY.spec, pretrain_steps=10, finetune_steps=11, batch_size=16)
    rebuilt = build_demo_models(tmp_path / "a", changed)
    key = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(weights(rebuilt["arithmetic"])[key], weights(second["arithmetic"])[key])



def test_a_model_folder_the_demo_did_not_build_is_refused_and_left_as_it_was(tmp_path):
    mine = tmp_path / "base" / "model.safetensors"
    mine.parent.mkdir()
    mine.write_text("my own weights")
    with pytest.raises(MergetuneError, match=r"base exists and was not built by the demo \(no demo-models.json"):
        build_demo_models(tmp_path, TINY)
    assert mine.read_text() == "my own weights" and sorted(tmp_path.iterdir()) == [mine.parent]

def test_specialists_change_only_attention_and_mlp_of_their_band(tmp_path):
    paths = build_demo_models(tmp_path, TINY)
    base = weights(paths["base"])
    for skill in SKILLS:
        band = specialist_layers(skill, TINY.spec.num_hidden_layers)
        changed = {name for name, tensor in weights(paths[skill]).items() if not torch.equal(tensor, base[name])}
        expected = {
            name
            for name in base
            if name.startswith("model.layers.")
            and int(name.split(".")[2]) in band
            and (".self_attn." in name or ".mlp." in name)
        }
        assert changed == expected, skill
    assert set(specialist_layers("arithmetic", 8)) == {0, 1, 2} and set(specialist_layers("capitals", 8)) == {5, 6, 7}


@pytest.fixture(scope="module")
def small_models(tmp_path_factory) -> dict[str, Path]:
    return build_demo_models(tmp_path_factory.mktemp("small"), SMALL)


def test_each_specialist_learns_its_skill_and_only_its_skill(small_models):
    from transformers import AutoModelForCausalLM

    scores = {
        name: {skill: accuracy(AutoModelForCausalLM.from_pretrained(path).eval(), skill) for skill in SKILLS}
        for name, path in small_models.items()
    }
    for skill in SKILLS:
        other = next(name for name in SKILLS if name != skill)
        assert scores[skill][skill] >= 0.8 and scores[skill][skill] >= scores["base"][skill] + 0.4, scores
        assert scores[skill][other] <= 0.4, scores  # near chance (0.25), like the base


def test_merging_matters_full_task_vectors_keep_both_skills_and_half_lose_them(small_models):
    base, model_a, model_b = (str(small_models[name]) for name in ("base", "arithmetic", "capitals"))

    def task_arithmetic(weight: float):
        return recipe_from_dict(
            {
                "merge_method": "task_arithmetic",
                "base_model": base,
                "models": [
                    {"model": base},
                    {"model": model_a, "parameters": {"weight": weight}},
                    {"model": model_b, "parameters": {"weight": weight}},
                ],
            }
        )

    builder = InMemoryBuilder.for_recipe(task_arithmetic(1.0), {m: open_source(m) for m in (base, model_a, model_b)})
    builder.build(task_arithmetic(1.0))
    full = {skill: accuracy(builder.model, skill) for skill in SKILLS}
    builder.build(task_arithmetic(0.5))
    half = {skill: accuracy(builder.model, skill) for skill in SKILLS}
    assert min(full.values()) >= 0.7, full
    assert sum(half.values()) / 2 <= sum(full.values()) / 2 - 0.3, (half, full)
