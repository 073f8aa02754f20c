"""The demo's two skills and the tiny models that learn them, built offline and cached.

A merge search only shows its worth when merging matters: two specialists that
each know one thing, whose best combination is not the obvious 50/50 blend.
This module makes that situation from nothing, deterministically:

* two synthetic skills, *arithmetic* (``what is three plus four ? answer : seven``)
  and *capitals* (``what is the capital of france ? answer : paris``), each a
  fixed table of facts, taught as plain text and tested as 4-way multiple choice;
* lm-eval task configs over JSON Lines files (`write_task_dir`): per skill one
  task on the *search* facts and one on disjoint *held-out* facts;
* a tiny base Llama pretrained on generic text in the skills' vocabulary and
  question format (but none of the facts), and two specialists fine-tuned from
  it on one skill each (`build_demo_models`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import yaml
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from mergetune.tiny import TinySpec, build_tokenizer, random_model, save_model

log = logging.getLogger(__name__)

NUMBER_WORDS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen twenty"
).split()

#: Countries whose capital is one word; many are not in `mergetune.tiny`'s corpus
#: and are added to the demo tokenizer through `build_tokenizer(extra_text)`.
CAPITALS: tuple[tuple[str, str], ...] = tuple(
    tuple(pair.split(":"))  # type: ignore[misc]
    for pair in (
        "france:paris germany:berlin italy:rome spain:madrid japan:tokyo china:beijing egypt:cairo "
        "canada:ottawa brazil:brasilia india:delhi kenya:nairobi peru:lima chile:santiago norway:oslo "
        "sweden:stockholm poland:warsaw greece:athens turkey:ankara russia:moscow australia:canberra "
        "portugal:lisbon austria:vienna ireland:dublin cuba:havana iran:tehran hungary:budapest "
        "finland:helsinki denmark:copenhagen belgium:brussels netherlands:amsterdam switzerland:bern "
        "czechia:prague romania:bucharest bulgaria:sofia serbia:belgrade croatia:zagreb ukraine:kyiv "
        "iceland:reykjavik thailand:bangkok vietnam:hanoi korea:seoul indonesia:jakarta "
        "philippines:manila pakistan:islamabad nepal:kathmandu iraq:baghdad syria:damascus "
        "lebanon:beirut jordan:amman qatar:doha morocco:rabat nigeria:abuja ghana:accra senegal:dakar "
        "colombia:bogota venezuela:caracas ecuador:quito uruguay:montevideo paraguay:asuncion "
        "afghanistan:kabul latvia:riga lithuania:vilnius estonia:tallinn slovakia:bratislava "
        "slovenia:ljubljana albania:tirana cyprus:nicosia malta:valletta libya:tripoli tunisia:tunis "
        "sudan:khartoum uganda:kampala zambia:lusaka zimbabwe:harare angola:luanda jamaica:kingston"
    ).split()
)

#: Words the demo tokenizer needs beyond `mergetune.tiny`'s embedded corpus.
EXTRA_WORDS = " ".join(word for pair in CAPITALS for word in pair) + " has number name"

#: Search tasks score the search split's facts; the held-out tasks score facts the
#: search never sees, for the finalists. All facts are in the fine-tuning text.
SEARCH_TASKS = ("demo_arithmetic", "demo_capitals")
HELDOUT_TASKS = ("demo_arithmetic_heldout", "demo_capitals_heldout")


@dataclass(frozen=True)
class Fact:
    """One thing a skill knows: a question, its answer, and words to draw wrong answers from."""

    question: str
    answer: str
    statement: str
    distractors: tuple[str, ...]


@dataclass(frozen=True)
class Skill:
    name: str
    facts: tuple[Fact, ...]

    @property
    def task(self) -> str:
        return f"demo_{self.name}"

    def texts(self) -> list[str]:
        """The fine-tuning corpus: every fact as a question with its answer."""
        return [f"{fact.question} {fact.answer}" for fact in self.facts]

    def statements(self) -> list[str]:
        """Every fact stated plainly: knowledge for the base, which never sees the questions."""
        return [fact.statement for fact in self.facts]

    def split(self, seed: int = 0) -> tuple[list[Fact], list[Fact]]:
        """(search facts, held-out facts): a seeded half/half partition of the table."""
        facts = list(self.facts)
        random.Random(f"{seed}/{self.name}/split").shuffle(facts)
        half = len(facts) // 2
        return facts[:half], facts[half:]


def _arithmetic() -> Skill:
    """Sums up to ten plus ten and differences of numbers up to twenty; near misses as distractors."""
    facts = []
    for op, pairs in (
        ("plus", [(a, b) for a in range(11) for b in range(11)]),
        ("minus", [(a, b) for a in range(21) for b in range(11) if b <= a]),
    ):
        for a, b in pairs:
            value = a + b if op == "plus" else a - b
            left, right, answer = NUMBER_WORDS[a], NUMBER_WORDS[b], NUMBER_WORDS[value]
            near = [NUMBER_WORDS[v] for v in range(max(0, value - 4), min(20, value + 4) + 1) if v != value]
            facts.append(
                Fact(f"what is {left} {op} {right} ? answer :", answer, f"{left} {op} {right} equals {answer}", tuple(near))
            )
    return Skill("arithmetic", tuple(facts))


def _capitals() -> Skill:
    """Capital of a country and country of a capital; the other capitals (countries) as distractors."""
    cities = tuple(city for _, city in CAPITALS)
    countries = tuple(country for country, _ in CAPITALS)
    facts = []
    for country, city in CAPITALS:
        facts.append(
            Fact(
                f"which city is the capital of {country} ? answer :",
                city,
                f"the capital of {country} is {city}",
                tuple(c for c in cities if c != city),
            )
        )
        facts.append(
            Fact(
                f"which country has the capital {city} ? answer :",
                country,
                f"{city} is the capital of {country}",
                tuple(c for c in countries if c != country),
            )
        )
    return Skill("capitals", tuple(facts))


SKILLS: dict[str, Skill] = {skill.name: skill for skill in (_arithmetic(), _capitals())}


def generic_texts() -> list[str]:
    """Pretraining text: the skills' words and question format, none of their facts.

    Class questions (``what is paris ? answer : city``) and copy questions
    (``name paris ? answer : paris``) teach the base to bring a question's subject
    to the answer position, so a specialist can learn its skill in a band of layers.
    """
    words = [(word, "number") for word in NUMBER_WORDS]
    words += [(word, kind) for pair in CAPITALS for word, kind in zip(pair, ("country", "city"))]
    texts = []
    for word, kind in words:
        texts += [f"what is {word} ? answer : {kind}", f"name {word} ? answer : {word}", f"{word} is a {kind}"]
    texts += [" ".join(NUMBER_WORDS[start : start + 5]) for start in range(len(NUMBER_WORDS) - 2)]
    return texts


def eval_docs(skill: Skill, facts: Sequence[Fact], count: int, seed: int) -> list[dict]:
    """`count` multiple-choice documents cycling over `facts`: 3 seeded distractors, gold at a seeded place."""
    rng = random.Random(f"{seed}/{skill.name}/docs/{len(facts)}")
    docs = []
    for index in range(count):
        fact = facts[index % len(facts)]
        choices = rng.sample(fact.distractors, 3)
        gold = rng.randrange(4)
        choices.insert(gold, fact.answer)
        docs.append({"question": fact.question, "choices": choices, "gold": gold})
    return docs


def _task_config(task: str, data_files: dict[str, str], split_key: str, split: str) -> dict:
    return {
        "task": task,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": data_files},
        "output_type": "multiple_choice",
        split_key: split,
        "doc_to_text": "{{question}}",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{gold}}",
        # Each choice is one word-level token: length normalisation (acc_norm) would only
        # add a bias towards long words, so accuracy is the one metric.
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        "num_fewshot": 0,
        "metadata": {"version": 1.0},
    }


def write_task_dir(directory: str | Path, docs_per_split: int = 300, seed: int = 0) -> Path:
    """Write lm-eval task YAMLs and their JSONL data; the directory is an lm-eval include path.

    Per skill: `demo_<skill>` (validation split: the search facts) for the search,
    and `demo_<skill>_heldout` (test split: the other facts) for the finalists.
    """
    directory = Path(directory).expanduser().resolve()
    directory.mkdir(parents=True, exist_ok=True)
    for skill in SKILLS.values():
        search, heldout = skill.split(seed)
        files = {"validation": directory / f"{skill.name}_search.jsonl", "test": directory / f"{skill.name}_heldout.jsonl"}
        for split, facts in (("validation", search), ("test", heldout)):
            rows = eval_docs(skill, facts, docs_per_split, seed)
            files[split].write_text("".join(json.dumps(row) + "\n" for row in rows))
        data_files = {split: str(path) for split, path in files.items()}
        for task, split_key, split in (
            (skill.task, "validation_split", "validation"),
            (f"{skill.task}_heldout", "test_split", "test"),
        ):
            config = _task_config(task, data_files, split_key, split)
            (directory / f"{task}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    log.info("demo tasks written to %s: %s", directory, ", ".join((*SEARCH_TASKS, *HELDOUT_TASKS)))
    return directory


@dataclass(frozen=True)
class DemoSettings:
    """Everything the demo models depend on besides this module's data; the cache key."""

    spec: TinySpec = TinySpec(hidden_size=128, intermediate_size=256, num_hidden_layers=8)
    pretrain_steps: int = 300
    finetune_steps: int = 300
    batch_size: int = 64
    pretrain_lr: float = 3e-3
    finetune_lr: float = 1e-3
    seed: int = 0


#: Bump when the training procedure changes in a way `DemoSettings` does not show.
_BUILD_VERSION = 1
_STAMP = "demo-models.json"


def tokenizer() -> PreTrainedTokenizerFast:
    """The demo models' tokenizer: tiny's corpus plus the capitals."""
    return build_tokenizer(EXTRA_WORDS)


def _batches(tok: PreTrainedTokenizerFast, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """All texts as one padded id tensor, ending in EOS, and its mask."""
    ids = [tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for text in texts]
    if any(tok.unk_token_id in row for row in ids):
        raise ValueError("demo text has words outside the tokenizer's vocabulary")
    width = max(len(row) for row in ids)
    tokens = torch.full((len(ids), width), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for row, values in enumerate(ids):
        tokens[row, : len(values)] = torch.tensor(values)
        mask[row, : len(values)] = 1
    return tokens, mask


@contextmanager
def _deterministic() -> Iterator[None]:
    """Deterministic kernels while training; the caller's setting is restored afterwards."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


def _train(
    model: LlamaForCausalLM, tok: PreTrainedTokenizerFast, texts: Sequence[str], steps: int, lr: float, batch_size: int, seed: int
) -> float:
    """Causal-LM training on random batches of `texts` (AdamW, linear decay); returns the last loss."""
    tokens, mask = _batches(tok, texts)
    labels = tokens.masked_fill(mask == 0, -100)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / steps)
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        rows = torch.randint(len(texts), (batch_size,), generator=generator)
        loss = model(input_ids=tokens[rows], attention_mask=mask[rows], labels=labels[rows]).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval()
    return float(loss)


def _fingerprint(settings: DemoSettings) -> dict:
    """What a cached build must match: settings, build version and a hash of all training text."""
    text = "\n".join(generic_texts() + [t for skill in SKILLS.values() for t in skill.texts()]) + EXTRA_WORDS
    return {
        "version": _BUILD_VERSION,
        "settings": asdict(settings),
        "data_sha256": hashlib.sha256(text.encode()).hexdigest(),
        "torch": torch.__version__,
    }


def build_demo_models(cache_dir: str | Path, settings: DemoSettings = DemoSettings()) -> dict[str, Path]:
    """The demo's models in `cache_dir`: "base", and one specialist per skill ("arithmetic", "capitals").

    Built once; a later call with the same settings (same stamp) returns the cached
    directories. Seeds and deterministic kernels make a rebuild identical on the
    same machine and thread count.
    """
    cache_dir = Path(cache_dir).expanduser().resolve()
    names = ("base", *SKILLS)
    paths = {name: cache_dir / name for name in names}
    fingerprint = _fingerprint(settings)
    stamp = cache_dir / _STAMP
    if stamp.is_file() and json.loads(stamp.read_text()) == fingerprint and all(
        (path / "config.json").is_file() for path in paths.values()
    ):
        log.info("demo models cached in %s", cache_dir)
        return paths
    stamp.unlink(missing_ok=True)
    for path in paths.values():
        shutil.rmtree(path, ignore_errors=True)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tok = tokenizer()
    with _deterministic():
        base = random_model(settings.spec, tok, settings.seed)
        loss = _train(base, tok, generic_texts(), settings.pretrain_steps, settings.pretrain_lr, settings.batch_size, settings.seed)
        log.info("base pretrained: loss %.3f", loss)
        base_state = {name: tensor.clone() for name, tensor in base.state_dict().items()}
        save_model(base, tok, paths["base"])
        for index, skill in enumerate(SKILLS.values(), start=1):
            base.load_state_dict(base_state)
            seed = settings.seed * 1000 + index
            loss = _train(base, tok, skill.texts(), settings.finetune_steps, settings.finetune_lr, settings.batch_size, seed)
            log.info("%s specialist fine-tuned: loss %.3f", skill.name, loss)
            save_model(base, tok, paths[skill.name])
    stamp.write_text(json.dumps(fingerprint, indent=1))
    return paths
