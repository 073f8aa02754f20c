"""The only place that touches Optuna's private API.

Several workers sharing one storage must act on trials by their storage id (fail a
dead worker's trial, record a heartbeat, read it back), and Optuna exposes neither
the id nor the storage of a study publicly. Everything that needs them goes
through these functions, so an Optuna release that moves them breaks here — and
`tests/test_layout.py` says so — not in the middle of a study.

Checked against Optuna 4.0 – 5.1 (`Study._storage`, `Study._study_id`,
`FrozenTrial._trial_id`, `Trial._trial_id`, `BaseHeartbeat._get_stale_trial_ids`).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from typing import Union

import optuna
from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial

log = logging.getLogger(__name__)

CHECKED_VERSIONS = ((4, 0), (5, 1))  # oldest and newest major.minor this adapter was checked against


def _major_minor(version: str) -> tuple[int, int]:
    major, minor = (int(part) for part in version.split(".")[:2])
    return major, minor


@contextlib.contextmanager
def experimental() -> Iterator[None]:
    """Optuna's experimental features that mergetune relies on (heartbeats and their retry callback, the
    multivariate TPE, the heartbeat storage options), used without a warning at every trial."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


if not CHECKED_VERSIONS[0] <= _major_minor(optuna.__version__) <= CHECKED_VERSIONS[1]:
    log.warning(
        "Optuna %s is outside the versions mergetune's Optuna adapter was checked against (%s – %s)",
        optuna.__version__,
        ".".join(map(str, CHECKED_VERSIONS[0])),
        ".".join(map(str, CHECKED_VERSIONS[1])),
    )


def storage_of(study: optuna.Study) -> BaseStorage:
    """The storage a study reads and writes."""
    return study._storage


def trial_id(trial: Union[optuna.Trial, FrozenTrial]) -> int:
    """A trial's id in its storage (unique across studies, unlike its number)."""
    return trial._trial_id


def stale_trial_ids(study: optuna.Study) -> set[int]:
    """Running trials whose heartbeat stopped longer than the grace period ago, by the database's clock.

    Part of Optuna's heartbeat interface (`BaseHeartbeat`), which `fail_stale_trials`
    uses too; called directly so the reason can be recorded before the trial is failed.
    """
    return set(study._storage._get_stale_trial_ids(study._study_id))


def was_enqueued(trial: FrozenTrial) -> bool:
    """Whether the trial's parameters were fixed in advance (`enqueue_trial`), not yet sampled."""
    return "fixed_params" in trial.system_attrs
