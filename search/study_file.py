"""Study files (`studies/*.yaml`): what to merge, what to search, how to score, how long.

Validated with pydantic so a mistyped key or a value out of range is one clear
message naming the file and the field, before any model is loaded.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mergetune.errors import MergetuneError

SEARCHABLE_METHODS = ("slerp", "dare_ties", "ties", "task_arithmetic", "linear")
# Where and how long a study runs, not what its trials mean: free to differ between workers and runs.
RUN_SETTINGS = frozenset({"storage", "storage_options", "budget", "device", "backend"})


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Range(_Strict):
    low: float
    high: float

    @model_validator(mode="after")
    def _ordered(self) -> "Range":
        if self.low > self.high:
            raise ValueError(f"low {self.low} is above high {self.high}")
        return self


class SlerpSpace(_Strict):
    """A t-curve of `control_points` values in [0, 1] per filter, plus one for all other tensors."""

    filters: list[str] = Field(default_factory=lambda: ["self_attn", "mlp"])
    control_points: int = Field(5, ge=1, le=64)


class WeightedSpace(_Strict):
    """Weight (and density, for sparsifying methods) per model; optionally a curve across layers."""

    weight: Range = Range(low=0.1, high=1.0)
    density: Range = Range(low=0.1, high=1.0)
    curve_points: Optional[int] = Field(None, ge=2, le=64)

    @field_validator("density")
    @classmethod
    def _density_range(cls, value: Range) -> Range:
        if value.low <= 0 or value.high > 1:
            raise ValueError("density must lie in (0, 1]")
        return value


class Space(_Strict):
    slerp: SlerpSpace = SlerpSpace()
    dare_ties: WeightedSpace = WeightedSpace()
    ties: WeightedSpace = WeightedSpace()
    task_arithmetic: WeightedSpace = WeightedSpace()
    linear: WeightedSpace = WeightedSpace()


class Final(_Strict):
    """The finalists' evaluation: more documents, none of them seen by the search."""

    tasks: list[str] = Field(
        default_factory=list,
        description="tasks the finalists are scored on (e.g. held-out facts or another benchmark); "
        "default: the search tasks' documents the search did not use",
    )
    limit: Optional[int] = Field(200, ge=1)
    finalists: int = Field(3, ge=1)
    seed: int = 1


class Evaluation(_Strict):
    suite: Optional[str] = None
    tasks: list[str] = Field(default_factory=list)
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

    def rungs(self) -> list[int]:
        """Documents per task at which a candidate may be pruned: first_limit × reduction_factor^k, each at
        most half of `limit` (the full evaluation, which follows, adds at least as many again)."""
        size = self.first_limit or max(1, self.limit // self.reduction_factor**2)
        sizes = []
        while size <= self.limit / 2:
            sizes.append(size)
            size *= self.reduction_factor
        return sizes

    @model_validator(mode="after")
    def _something_to_score(self) -> "Evaluation":
        if not self.suite and not self.tasks:
            raise ValueError("give a suite or a list of tasks")
        if self.first_limit is not None and self.first_limit > self.limit / 2:
            raise ValueError(f"first_limit ({self.first_limit}) must be at most half of limit ({self.limit})")
        return self


class StorageOptions(_Strict):
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


class Budget(_Strict):
    n_trials: Optional[int] = Field(30, ge=1, description="completed (or pruned) trials per method")
    timeout: Optional[float] = Field(None, gt=0, description="seconds per method")


class StudySpec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    models: list[str] = Field(min_length=2)
    base_model: Optional[str] = None
    methods: list[Literal["slerp", "dare_ties", "ties", "task_arithmetic", "linear"]] = Field(
        default_factory=lambda: ["slerp", "dare_ties"], min_length=1
    )
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    space: Space = Space()
    evaluation: Evaluation
    backend: Literal["hf", "vllm"] = "hf"
    device: str = "cpu"
    budget: Budget = Budget()
    sampler: Literal["tpe", "cmaes", "gp", "random"] = "tpe"
    pruning: bool = True
    seed: int = 0
    storage: Optional[str] = None
    storage_options: StorageOptions = StorageOptions()
    baselines: bool = True

    @model_validator(mode="after")
    def _methods_fit_models(self) -> "StudySpec":
        if "slerp" in self.methods and len(self.models) != 2:
            raise ValueError(f"slerp merges exactly 2 models; {len(self.models)} are listed")
        needs_base = [m for m in self.methods if m in ("dare_ties", "ties", "task_arithmetic")]
        if needs_base and not self.base_model:
            raise ValueError(f"{', '.join(needs_base)} need a base_model (the models' common ancestor)")
        given = self.evaluation.model_fields_set
        pruning_fields = {f for f in ("first_limit", "reduction_factor") if f in given and getattr(self.evaluation, f) is not None}
        if pruning_fields and not self.pruning:
            raise ValueError(f"evaluation.{min(pruning_fields)} only makes sense with pruning: true")
        return self

    def definition_hash(self) -> str:
        """Identifies what the trials mean (not where they are stored or how long to run)."""
        return hashlib.sha256(json.dumps(self.definition(), sort_keys=True).encode()).hexdigest()[:16]

    def definition(self) -> dict:
        """The fields that define the trials; stored with the study (never the storage URL and its password)."""
        return self.model_dump(mode="json", exclude=set(RUN_SETTINGS))


class Study(BaseModel):
    """A validated study file and where it lives (relative paths resolve against it)."""

    spec: StudySpec
    path: Path

    @property
    def directory(self) -> Path:
        return self.path.parent

    def resolve(self, reference: str) -> str:
        """Model references and data paths relative to the study file's folder; hub ids unchanged."""
        candidate = (self.directory / reference).expanduser()
        return str(candidate.resolve()) if candidate.exists() else reference

    @property
    def storage_display(self) -> str:
        """The storage URL with any password masked: safe for logs, tables, reports and cards."""
        return redact_url(self.storage_url)

    @property
    def storage_url(self) -> str:
        if self.spec.storage:
            return self.spec.storage
        return f"sqlite:///{(self.directory / (self.spec.name + '.db')).resolve()}"


def redact_url(text: str) -> str:
    """postgresql://user:secret@host/db → postgresql://user:***@host/db, anywhere in `text`.

    The password runs to the last '@' of the URL, so one containing '/' or '@' is masked whole;
    `password=...` (a query parameter or a libpq keyword) is masked too.
    """
    text = re.sub(r"(://[^:/@\s'\"]*:)[^\s'\"]*@", r"\1***@", text)
    return re.sub(r"(password=)[^&\s'\"]*", r"\1***", text, flags=re.IGNORECASE)


def load_study(path: str | Path) -> Study:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MergetuneError(f"study file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise MergetuneError(f"cannot read study file {path}: {error}") from None
    except yaml.YAMLError as error:
        raise MergetuneError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise MergetuneError(f"{path}: a study file must be a mapping of fields")
    try:
        spec = StudySpec.model_validate(data)
    except ValidationError as error:
        problems = []
        for item in error.errors():
            location = ".".join(str(part) for part in item["loc"]) or "(top level)"
            message = "unknown field" if item["type"] == "extra_forbidden" else item["msg"]
            problems.append(f"{location}: {message}")
        raise MergetuneError(f"{path}: " + "; ".join(dict.fromkeys(problems))) from None
    return Study(spec=spec, path=path.resolve())
