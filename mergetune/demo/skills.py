"""The demo's two skills and the tiny models that learn them, built offline and cached.

A merge search only shows its worth when merging matters: two specialists that
each know one thing, whose best combination is not the obvious 50/50 blend.
This module makes that situation from nothing, deterministically:

* two synthetic skills, *arithmetic* (``what is three plus four ? answer : seven``)
  and *capitals* (``which city is the capital of france ? answer : paris``), each
  a fixed table of facts, taught as text and tested as 4-way multiple choice;
* lm-eval task configs over JSON Lines files (`write_task_dir`): per skill one
  task on the *search* facts and one on disjoint *held-out* facts;
* a tiny base Llama pretrained on generic text in the skills' vocabulary and
  question format (none of the facts), and one specialist per skill fine-tuned
  from it (`build_demo_models`).

Each specialist changes only its own band of layers (arithmetic the lowest
three eighths, capitals the highest) and is held to the base's hidden states on
the other skill's questions, the way a light fine-tune of a large model leaves
unrelated inputs alone. At this size half a task vector teaches nothing, so a
flat 50/50 merge loses both skills, while a merge that takes each band from its
specialist (a per-layer t-curve, or full task-vector weights) keeps both: the
optimum is real, off the diagonal, and findable by a search.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import shutil
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import yaml
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from mergetune.demo.tiny import TinySpec, build_tokenizer, random_model, save_model
from mergetune.errors import MergetuneError

log = logging.getLogger(__name__)

NUMBER_WORDS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen twenty"
).split()

#: Countries whose capital is one word; many are not in `mergetune.tiny`'s corpus
#: and are added to the demo tokenizer through `build_tokenizer(extra_text)`.
CAPITALS: tuple[tuple[str, str], ...] = tuple(
    (country, city)
    for country, city in (
        pair.split(":")
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
)

#: Words the demo tokenizer needs beyond `mergetune.tiny`'s embedded corpus.
EXTRA_WORDS = " ".join(word for pair in CAPITALS for word in pair) + " has number name"

#: Search tasks score the search split's facts; the held-out tasks score facts the
#: search never sees, for the finalists. All facts are in the specialists' fine-tuning text.
SEARCH_TASKS = ("demo_arithmetic", "demo_capitals")
HELDOUT_TASKS = ("demo_arithmetic_heldout", "demo_capitals_heldout")


@dataclass(frozen=True)
class Fact:
    """One thing a skill knows: a question, its answer, and words to draw wrong answers from."""

    question: str
    answer: str
    distractors: tuple[str, ...]


@dataclass(frozen=True)
class Skill:
    """A named fact table: fine-tuning text for its specialist, multiple-choice documents for its task."""

    name: str
    facts: tuple[Fact, ...]

    @property
    def task(self) -> str:
        return f"demo_{self.name}"

    def texts(self) -> list[str]:
        """The fine-tuning corpus: every fact as a question with its answer."""
        return [f"{fact.question} {fact.answer}" for fact in self.facts]

    def split(self, part: str, seed: int = 0) -> list[Fact]:
        """The "search" or "heldout" half of the fact table (a seeded partition)."""
        facts = list(self.facts)
        random.Random(f"{seed}/{self.name}/split").shuffle(facts)
        half = len(facts) // 2
        return {"search": facts[:half], "heldout": facts[half:]}[part]


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
            facts.append(Fact(f"what is {left} {op} {right} ? answer :", answer, tuple(near)))
    return Skill("arithmetic", tuple(facts))


def _capitals() -> Skill:
    """Capital of a country and country of a capital; the other capitals (countries) as distractors."""
    cities = tuple(city for _, city in CAPITALS)
    countries = tuple(country for country, _ in CAPITALS)
    facts = []
    for country, city in CAPITALS:
        other_cities = tuple(c for c in cities if c != city)
        other_countries = tuple(c for c in countries if c != country)
        facts.append(Fact(f"which city is the capital of {country} ? answer :", city, other_cities))
        facts.append(Fact(f"which country has the capital {city} ? answer :", country, other_countries))
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


def eval_docs(skill: Skill, part: str, count: int, seed: int = 0) -> list[dict]:
    """`count` multiple-choice documents cycling over the part's facts: 3 seeded distractors, gold at a seeded place."""
    facts = skill.split(part, seed)
    rng = random.Random(f"{seed}/{skill.name}/{part}/docs")
    docs = []
    for index in range(count):
        fact = facts[index % len(facts)]
        choices = rng.sample(fact.distractors, 3)
        gold = rng.randrange(4)
        choices.insert(gold, fact.answer)
        docs.append({"question": fact.question, "choices": choices, "gold": gold})
    return docs


def _task_config(task: str, data_files: dict[str, str], split_key: str, split: str) -> dict:
    """One lm-eval task over the JSONL files; `split_key` picks which file lm-eval scores."""
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

    Per skill: `demo_<skill>` (`SEARCH_TASKS`; its only split, validation, asks
    about the search half of the facts) for the search, and `demo_<skill>_heldout`
    (`HELDOUT_TASKS`; test split, the other half) for the finalists. The YAMLs
    name their data files by absolute path, so the directory stays where it is written.
    """
    directory = Path(directory).expanduser().resolve()
    directory.mkdir(parents=True, exist_ok=True)
    for skill in SKILLS.values():
        files = {}
        for split, part in (("validation", "search"), ("test", "heldout")):
            files[split] = directory / f"{skill.name}_{part}.jsonl"
            rows = eval_docs(skill, part, docs_per_split, seed)
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
    """Everything the demo models depend on besides this module's data: the cache key."""

    spec: TinySpec = TinySpec(hidden_size=64, intermediate_size=128, num_hidden_layers=8)
    pretrain_steps: int = 600
    finetune_steps: int = 800
    batch_size: int = 64
    lr: float = 3e-3
    #: weight of the term holding a specialist to the base's hidden states on the other skill
    keep_weight: float = 20.0
    seed: int = 0


#: Bump when the training procedure changes in a way `DemoSettings` does not show.
_BUILD_VERSION = 1
_STAMP = "demo-models.json"
_KEEP_BATCH = 32


def demo_tokenizer() -> PreTrainedTokenizerFast:
    """The demo models' tokenizer: `mergetune.tiny`'s corpus plus the capitals."""
    return build_tokenizer(EXTRA_WORDS)


def specialist_layers(skill: str, num_layers: int) -> range:
    """The layers a skill's specialist may change: arithmetic the lowest 3/8, capitals the highest 3/8.

    The gap between the bands keeps the ideal merge reachable by a five-point
    t-curve ([0, 0, x, 1, 1] puts the bands within 0.15 of 0 and 1).
    """
    width = max(1, round(num_layers * 3 / 8))
    return range(width) if skill == "arithmetic" else range(num_layers - width, num_layers)


def _encode(tok: PreTrainedTokenizerFast, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Texts as one right-padded id tensor and its attention mask (no special tokens)."""
    ids = [tok(text, add_special_tokens=False)["input_ids"] for text in texts]
    if any(tok.unk_token_id in row for row in ids):
        raise ValueError("demo text has words outside the tokenizer's vocabulary")
    tokens = torch.full((len(ids), max(len(row) for row in ids)), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(tokens)
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


@dataclass(frozen=True)
class _Keep:
    """Prompts whose residual stream after the first `after` layers (`hidden_states[after]`) must stay put."""

    prompts: Sequence[str]
    after: int
    weight: float


def _in_band(name: str, layers: range) -> bool:
    """An attention or MLP weight of one of `layers`; norms stay the base's, so a merge's
    per-layer self_attn / mlp curves alone decide where each specialist's change lands."""
    parts = name.split(".")
    return name.startswith("model.layers.") and int(parts[2]) in layers and parts[3] in ("self_attn", "mlp")


def _hidden(model: LlamaForCausalLM, tokens: torch.Tensor, mask: torch.Tensor, after: int) -> torch.Tensor:
    return model(input_ids=tokens, attention_mask=mask, output_hidden_states=True).hidden_states[after]


def _train(
    model: LlamaForCausalLM,
    tok: PreTrainedTokenizerFast,
    texts: Sequence[str],
    settings: DemoSettings,
    steps: int,
    seed: int,
    *,
    answer_only: bool = False,
    layers: range | None = None,
    keep: _Keep | None = None,
) -> float:
    """AdamW on random batches of `texts` with linear decay; returns the last loss.

    answer_only: loss on each text's last word only (the answer), as instruction
    tuning does. layers: only these decoder layers' attention and MLP weights are
    trained (None: everything).
    keep: adds weight x relative squared change of the hidden states on its prompts.
    """
    tokens, mask = _encode(tok, texts)
    labels = tokens.masked_fill(mask == 0, -100)
    if answer_only:
        last = mask.sum(dim=1) - 1
        labels = torch.full_like(tokens, -100)
        labels[torch.arange(len(tokens)), last] = tokens[torch.arange(len(tokens)), last]
    if keep is not None:
        keep_tokens, keep_mask = _encode(tok, keep.prompts)
        with torch.no_grad():
            reference = _hidden(model, keep_tokens, keep_mask, keep.after)
    trained = [param for name, param in model.named_parameters() if layers is None or _in_band(name, layers)]
    for param in model.parameters():
        param.requires_grad_(False)
    for param in trained:
        param.requires_grad_(True)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(trained, lr=settings.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / steps)
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        rows = torch.randint(len(texts), (settings.batch_size,), generator=generator)
        loss = model(input_ids=tokens[rows], attention_mask=mask[rows], labels=labels[rows]).loss
        if keep is not None:
            rows = torch.randint(len(keep.prompts), (_KEEP_BATCH,), generator=generator)
            hidden = _hidden(model, keep_tokens[rows], keep_mask[rows], keep.after)
            weights = keep_mask[rows].unsqueeze(-1)
            change = ((hidden - reference[rows]) ** 2 * weights).sum() / (reference[rows] ** 2 * weights).sum()
            loss = loss + keep.weight * change
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    for param in model.parameters():
        param.requires_grad_(True)
    model.eval()
    return loss.item()


def _fingerprint(settings: DemoSettings) -> dict:
    """What a cached build must match: settings, build version and a hash of all training text."""
    texts = generic_texts() + [text for skill in SKILLS.values() for text in skill.texts()]
    return {
        "version": _BUILD_VERSION,
        "settings": asdict(settings),
        "data_sha256": hashlib.sha256("\n".join(texts + [EXTRA_WORDS]).encode()).hexdigest(),
        "torch": torch.__version__,
    }


def build_demo_models(cache_dir: str | Path, settings: DemoSettings = DemoSettings()) -> dict[str, Path]:
    """The demo's checkpoints in `cache_dir`: "base" and one specialist per skill ("arithmetic", "capitals").

    Built once (75–135 s on the 2-core CPUs this project has used, with the default
    settings); a later call with the same settings and data (the stamp file) returns
    the cached directories. Seeds and deterministic kernels make a rebuild identical on the
    same machine and thread count. A model folder already there without the stamp is not the
    demo's: it is refused, never replaced.
    """
    cache_dir = Path(cache_dir).expanduser().resolve()
    paths = {name: cache_dir / name for name in ("base", *SKILLS)}
    fingerprint = _fingerprint(settings)
    stamp = cache_dir / _STAMP
    if (
        stamp.is_file()
        and json.loads(stamp.read_text()) == fingerprint
        and all((path / "config.json").is_file() for path in paths.values())
    ):
        log.info("demo models cached in %s", cache_dir)
        return paths
    if not stamp.is_file():
        foreign = next((path for path in paths.values() if path.exists() or path.is_symlink()), None)
        if foreign is not None:
            raise MergetuneError(
                f"{foreign} exists and was not built by the demo (no {stamp.name} beside it); "
                "choose another output directory or move it away"
            )
    cache_dir.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps({"building": _BUILD_VERSION}))  # from here on, the folders below are the demo's
    for path in paths.values():
        shutil.rmtree(path, ignore_errors=True)
    tok = demo_tokenizer()
    num_layers = settings.spec.num_hidden_layers
    start = time.perf_counter()
    with _deterministic():
        model = random_model(settings.spec, tok, settings.seed)
        loss = _train(model, tok, generic_texts(), settings, settings.pretrain_steps, settings.seed)
        log.info("base pretrained: loss %.3f", loss)
        base_state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
        save_model(model, tok, paths["base"])
        for index, skill in enumerate(SKILLS.values(), start=1):
            model.load_state_dict(base_state)
            layers = specialist_layers(skill.name, num_layers)
            others = [fact.question for other in SKILLS.values() if other is not skill for fact in other.facts]
            loss = _train(
                model, tok, skill.texts(), settings, settings.finetune_steps, settings.seed * 1000 + index,
                answer_only=True, layers=layers, keep=_Keep(others, layers.stop, settings.keep_weight),
            )
            log.info("%s specialist fine-tuned (layers %d-%d): loss %.3f", skill.name, layers[0], layers[-1], loss)
            save_model(model, tok, paths[skill.name])
    stamp.write_text(json.dumps(fingerprint, indent=1))
    log.info("demo models built in %s in %.0f s", cache_dir, time.perf_counter() - start)
    return paths
