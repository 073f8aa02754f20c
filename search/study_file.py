"""Study files (`studies/*.yaml`): what to merge, what to search, how to score, how long.

Validated with pydantic so a mistyped key or a value out of range is one clear
message naming the file and the field, before any model is loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Annotated, Literal, Optional, Union

import yaml
from pydantic import AfterValidator, BaseModel, Field, create_model, field_validator, model_validator
from pydantic.fields import FieldInfo

from mergetune.dtypes import ModelDtype
from mergetune.errors import MergetuneError
from mergetune.eval.backends import search_backend_names
from mergetune.registry import Registry
from mergetune.search.methods import SEARCHABLE
from mergetune.search.samplers import PRUNERS, SAMPLERS
from mergetune.validation import Settings, read_text, validate, yaml_problem

# Where and how long a study runs, not what its trials mean: free to differ between workers and runs.
RUN_SETTINGS = frozenset({"storage", "storage_options", "budget", "device", "backend", "engine"})
MAX_STUDY_FILE_BYTES = 1_000_000
LEGACY_PRUNING = ("successive_halving", "none")  # the pruners `pruning: true/false` meant
PRUNING_FIELDS = frozenset(field for name in PRUNERS for field in PRUNERS.get(name).fields)  # evaluation.*

MAX_SEED = 2**32 - 1  # numpy's generators (Optuna's samplers) take seeds in [0, 2**32)

# `space:` has one section per searchable method, each that method's own settings model.
Space = create_model(
    "Space", __base__=Settings, **{name: (SEARCHABLE.get(name).space, SEARCHABLE.get(name).space()) for name in SEARCHABLE}
)


def _distinct(values: list[str]) -> list[str]:
    repeated = sorted({value for value in values if values.count(value) > 1})
    if repeated:
        raise ValueError(f"listed more than once: {', '.join(repeated)}")
    return values


Names = Annotated[list[str], AfterValidator(_distinct)]  # a list where a repeat is a mistake, not a weight


def _registered(registry: Registry, value: str) -> str:
    if value not in registry:
        raise ValueError(registry.unknown(value))
    return value


class Final(Settings):
    """The finalists' evaluation: more documents, none of them seen by the search."""

    tasks: Names = Field(
        default_factory=list,
        description="tasks the finalists are scored on (e.g. held-out facts or another benchmark); "
        "default: the search tasks' documents the search did not use",
    )
    limit: Optional[int] = Field(200, ge=1)
    finalists: int = Field(3, ge=1)
    seed: int = 1  # Python's random.Random: any integer


class EstimatorSettings(Settings):
    """How `pruning: estimator` races a candidate (`mergetune.search.samplers.Estimator`)."""

    min_trials: int = Field(
        5, ge=3, description="completed trials (baselines included) to learn from before the estimator stops any"
    )
    learn_from: Literal["study", "method"] = Field(
        "study",
        description="whose completed trials it learns from: every method's in the study (all are scored on the same "
        "search documents, so a method run after another needs no trials of its own to learn from, only `rank` to "
        "set the bar) or the candidate's method's only",
    )
    chunk: float = Field(
        0.05, gt=0, le=0.5, description="fraction of the search documents scored between two estimates"
    )
    confidence: float = Field(
        0.8,
        gt=0.5,
        lt=1,
        description="a candidate stops once its full score is estimated below the bar with this one-sided confidence",
    )
    top_fraction: float = Field(
        0.5, gt=0, le=1, description="documents are ordered by how they separate this best fraction of completed trials"
    )
    rank: Optional[int] = Field(
        None,
        ge=1,
        description="a candidate goes on while it may reach this rank among the completed trials "
        "(1: beat the best; default: final.finalists, a finalist's place)",
    )


class Evaluation(Settings):
    suite: Optional[str] = None
    tasks: Names = Field(default_factory=list)
    include_paths: list[str] = Field(default_factory=list)
    data_dir: Optional[str] = None
    num_fewshot: Optional[int] = Field(None, ge=0)
    limit: int = Field(50, ge=1, description="documents per task scored for each candidate")
    first_limit: Optional[int] = Field(
        None,
        ge=1,
        description="documents per task in the first pruning rung (default: limit / reduction_factor², at least 1)",
    )
    reduction_factor: int = Field(
        3,
        ge=2,
        description="pruning keeps the best 1/reduction_factor of candidates at each rung and scores them on "
        "reduction_factor times as many documents",
    )
    final: Final = Final()
    estimator: EstimatorSettings = EstimatorSettings()
    shared_prefix: bool = Field(
        True,
        description="hf backend, and vllm from vLLM 0.34 on: compute a prefix shared by several requests (a "
        "document's answer choices) once; the scores are lm-eval's either way, false only to compare",
    )

    def rungs(self) -> list[int]:
        """Documents per task at which a candidate may be pruned: first_limit × reduction_factor^k, each at
        most half of `limit` (the full evaluation, which follows, adds at least as many again)."""
        size = self.first_limit or max(1, self.limit // self.reduction_factor**2)
        sizes = []
        while size <= self.limit / 2:
            sizes.append(size)
            size *= self.reduction_factor
        return sizes

    def estimator_rank(self) -> int:
        """The place among its method's completed trials a candidate races for under `pruning: estimator`."""
        return self.estimator.rank or self.final.finalists

    @model_validator(mode="after")
    def _something_to_score(self) -> "Evaluation":
        if not self.suite and not self.tasks:
            raise ValueError("give a suite or a list of tasks")
        if self.first_limit is not None and self.first_limit > self.limit / 2:
            raise ValueError(f"first_limit ({self.first_limit}) must be at most half of limit ({self.limit})")
        return self


class StorageOptions(Settings):
    """How workers share a storage: a running trial's heartbeat, when silence means death, how long to wait for a database."""

    heartbeat_interval: int = Field(30, ge=1, description="seconds between a running trial's heartbeats (RDB storages)")
    grace_period: int = Field(
        120, ge=2, description="seconds without a heartbeat after which a trial is failed and queued again"
    )
    connect_timeout: int = Field(10, ge=1, description="seconds to wait for a database server to answer")

    @model_validator(mode="after")
    def _grace_outlasts_heartbeat(self) -> "StorageOptions":
        if self.grace_period <= self.heartbeat_interval:
            raise ValueError(
                f"grace_period ({self.grace_period}) must be longer than heartbeat_interval ({self.heartbeat_interval})"
            )
        return self


class Engine(Settings):
    """Settings of an engine backend (`backend: vllm`); unset ones take the backend's defaults."""

    tensor_parallel_size: int = Field(1, ge=1, description="GPUs one engine spans; every rank builds the same candidate")
    gpu_memory_utilization: Optional[float] = Field(None, gt=0, le=1, description="fraction of each GPU the engine may take")
    max_model_len: Optional[int] = Field(None, ge=16, description="longest request the engine scores (default: the model's)")
    enforce_eager: Optional[bool] = Field(None, description="no CUDA graphs: slower, less memory, faster start")


class Budget(Settings):
    n_trials: Optional[int] = Field(
        30, ge=1, description="completed (or pruned) trials per method (default 30, none when only a timeout is given)"
    )
    timeout: Optional[float] = Field(None, gt=0, allow_inf_nan=False, description="seconds per method")

    @model_validator(mode="after")
    def _timeout_alone(self) -> "Budget":
        """A budget of a timeout alone runs until it passes, not to the default trial count first."""
        if self.timeout is not None and "n_trials" not in self.model_fields_set:
            self.n_trials = None
        return self


class StudySpec(Settings):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    models: list[str] = Field(min_length=2)
    base_model: Optional[str] = None
    methods: Names = Field(default_factory=lambda: ["slerp", "dare_ties"], min_length=1)
    dtype: ModelDtype = "bfloat16"
    space: Space = Space()
    evaluation: Evaluation
    backend: str = "hf"
    engine: Engine = Engine()
    device: str = "cpu"
    budget: Budget = Budget()
    sampler: str = "tpe"
    pruning: Union[str, bool] = Field(
        "successive_halving", description="a registered pruner; true/false stand for successive_halving/none"
    )
    seed: int = Field(0, ge=0, le=MAX_SEED, description="the samplers' seed")
    storage: Optional[str] = None
    storage_options: StorageOptions = StorageOptions()
    baselines: bool = True

    @field_validator("methods")
    @classmethod
    def _searchable(cls, value: list[str]) -> list[str]:
        return [_registered(SEARCHABLE, name) for name in value]

    @field_validator("sampler")
    @classmethod
    def _sampler(cls, value: str) -> str:
        return _registered(SAMPLERS, value)

    @field_validator("pruning")
    @classmethod
    def _pruner(cls, value: Union[str, bool]) -> str:
        if isinstance(value, bool):
            return "successive_halving" if value else "none"
        return _registered(PRUNERS, value)

    @field_validator("backend")
    @classmethod
    def _live_backend(cls, value: str) -> str:
        if value not in search_backend_names():
            known = ", ".join(search_backend_names())
            raise ValueError(f"backend {value!r} cannot score candidates built in memory; use one of {known}")
        return value

    @model_validator(mode="after")
    def _methods_fit_models(self) -> "StudySpec":
        for name in self.methods:
            count = SEARCHABLE.get(name).model_count
            if count is not None and len(self.models) != count:
                raise ValueError(f"{name} merges exactly {count} models; {len(self.models)} are listed")
        needs_base = [m for m in self.methods if SEARCHABLE.get(m).needs_base]
        if needs_base and not self.base_model:
            raise ValueError(f"{', '.join(needs_base)} need a base_model (the models' common ancestor)")
        given = {f for f in self.evaluation.model_fields_set if getattr(self.evaluation, f) is not None}
        foreign = sorted(given & PRUNING_FIELDS - set(PRUNERS.get(self.pruning).fields))
        if foreign:
            users = [name for name in PRUNERS if foreign[0] in PRUNERS.get(name).fields]
            raise ValueError(
                f"evaluation.{foreign[0]} only makes sense with pruning: {' or '.join(users)} "
                f"(this study has pruning: {self.pruning})"
            )
        return self

    def rungs(self) -> list[int]:
        """Documents per task at which this study's pruner may stop a candidate (empty: never)."""
        return PRUNERS.get(self.pruning).rungs(self.evaluation)

    def definition_hash(self) -> str:
        """Identifies what the trials mean (not where they are stored or how long to run)."""
        return _hash(self.definition())

    def has_definition(self, stored_hash: str, stored: dict) -> bool:
        """Whether a stored study was made from this file, also when an older mergetune stored it: fields
        added since then count as equal while they keep their defaults, and `pruning: true/false` means
        the pruner it meant then. So upgrading mergetune never strands a study."""
        return stored_hash == self.definition_hash() or self.comparable_definition(stored) == upgraded(stored)

    def comparable_definition(self, stored: dict) -> dict:
        """This file's definition without the fields `stored` lacks that still hold their defaults, its paths
        normalized as `upgraded` normalizes the stored ones."""
        return _without_new_defaults(normalized_paths(self.definition()), stored, type(self))

    def definition(self) -> dict:
        """The fields that define the trials; stored with the study (never the storage URL and its password).

        Settings only another pruner reads are left out: they change nothing this study does."""
        return without_other_pruners(self.model_dump(mode="json", exclude=set(RUN_SETTINGS)))


class Study(BaseModel):
    """A validated study file and where it lives (relative paths resolve against it)."""

    spec: StudySpec
    path: Path

    @property
    def directory(self) -> Path:
        return self.path.parent

    def resolve(self, reference: str) -> str:
        """Model references and data paths relative to the study file's folder; hub ids unchanged."""
        candidate = self.directory / Path(reference).expanduser()  # '~/x' is the home's, not the folder's
        return str(candidate.resolve()) if candidate.exists() else reference

    @property
    def storage_display(self) -> str:
        """The storage URL with any password masked: safe for logs, tables, reports and cards."""
        return redact_url(self.storage_url)

    @property
    def storage_url(self) -> str:
        if self.spec.storage:
            return anchored_sqlite_url(self.spec.storage, self.directory)
        return f"sqlite:///{(self.directory / (self.spec.name + '.db')).resolve()}"


def anchored_sqlite_url(url: str, directory: Path) -> str:
    """A SQLite URL with a relative file name (`sqlite:///study.db`) made absolute from `directory`.

    SQLAlchemy would read the name from the current directory, so the same study run from
    another folder would silently start a new database; journal paths resolve from the
    study file's folder too (`storage.journal_path`).
    """
    scheme, separator, rest = url.partition(":///")
    name, question, query = rest.partition("?")
    relative = name and not name.startswith(("/", "file:")) and name != ":memory:"
    if not separator or scheme.split("+", 1)[0].lower() != "sqlite" or not relative:
        return url
    return f"{scheme}:///{(directory / Path(name).expanduser()).resolve()}{question}{query}"


def _hash(definition: dict) -> str:
    return hashlib.sha256(json.dumps(definition, sort_keys=True).encode()).hexdigest()[:16]


def upgraded(stored: dict) -> dict:
    """A stored definition in today's terms: `pruning: true/false` named the pruners it meant, and
    settings of other pruners were stored too."""
    pruning = stored.get("pruning")
    if isinstance(pruning, bool):
        stored = {**stored, "pruning": LEGACY_PRUNING[not pruning]}
    return normalized_paths(without_other_pruners(stored))


def normalized_paths(definition: dict) -> dict:
    """The definition with its model and data references as normalized paths: `./models/a/` and `models/a` name
    the same folder (from the same study file), so an edit that only rewrites one is not a different study."""

    def paths(value: object) -> object:
        if isinstance(value, str):
            return os.path.normpath(value)
        return [paths(item) for item in value] if isinstance(value, list) else value

    result = {key: paths(value) if key in ("models", "base_model") else value for key, value in definition.items()}
    evaluation = result.get("evaluation")
    if isinstance(evaluation, dict):
        result["evaluation"] = {
            key: paths(value) if key in ("include_paths", "data_dir") else value for key, value in evaluation.items()
        }
    return result


def without_other_pruners(definition: dict) -> dict:
    """The definition without the `evaluation` settings its pruner does not read."""
    pruning, evaluation = definition.get("pruning"), definition.get("evaluation")
    if not isinstance(evaluation, dict) or pruning not in PRUNERS:
        return definition
    unread = PRUNING_FIELDS - set(PRUNERS.get(pruning).fields)
    return {**definition, "evaluation": {key: value for key, value in evaluation.items() if key not in unread}}


def _json_default(field: FieldInfo) -> object:
    default = field.get_default(call_default_factory=True)
    return default.model_dump(mode="json") if isinstance(default, BaseModel) else default


def _without_new_defaults(current: dict, stored: dict, model: type[BaseModel]) -> dict:
    kept = {}
    for key, value in current.items():
        field = model.model_fields.get(key)
        nested = field.annotation if field is not None else None
        if key not in stored:
            if field is not None and not field.is_required() and _json_default(field) == value:
                continue
            kept[key] = value
        elif isinstance(value, dict) and isinstance(stored[key], dict) and isinstance(nested, type) and issubclass(nested, BaseModel):
            kept[key] = _without_new_defaults(value, stored[key], nested)
        else:
            kept[key] = value
    return kept


def redact_url(text: str) -> str:
    """postgresql://user:secret@host/db → postgresql://user:***@host/db, anywhere in `text`.

    The password runs to the last '@' of the URL, so one containing '/' or '@' is masked whole;
    `password=...` (a query parameter or a libpq keyword) is masked too.
    """
    text = re.sub(r"(://[^:/@\s'\"]*:)[^\s'\"]*@", r"\1***@", text)
    return re.sub(r"(password=)[^&\s'\"]*", r"\1***", text, flags=re.IGNORECASE)


def load_study(path: str | Path) -> Study:
    path = Path(path)
    if path.is_file() and path.stat().st_size > MAX_STUDY_FILE_BYTES:  # a wrong file (a checkpoint, a log)
        raise MergetuneError(
            f"{path} is {path.stat().st_size:,} bytes; a study file is a few KB of YAML (at most {MAX_STUDY_FILE_BYTES:,})"
        )
    try:
        data = yaml.safe_load(read_text(path, "study file"))
    except yaml.YAMLError as error:
        raise yaml_problem(str(path), error) from None
    if not isinstance(data, dict):
        raise MergetuneError(f"{path}: a study file must be a mapping of fields")
    return Study(spec=validate(StudySpec, data, str(path)), path=path.resolve())
