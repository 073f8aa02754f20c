"""A study's storage: PostgreSQL (or another SQLAlchemy database) shared by hosts, or a journal file on one host.

Workers agree on a study through its storage alone, so this is where storages are
opened the same way everywhere: RDB storages with heartbeats (a worker on another
host that dies mid-trial goes silent, and the others notice) and a short connect
timeout (a database that doesn't answer is one clear message, not a hang); a journal
file (`journal:///path/study.log`, or any `.log`/`.jsonl` path) for several processes
on one host without a server. Messages that could carry the storage URL pass through
`redact`, so a password never reaches a log, a leaderboard, a report or an export.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import re
import threading
import time
from pathlib import Path
from typing import Iterator, Optional
from urllib.parse import unquote

import optuna
import sqlalchemy.engine
import sqlalchemy.exc
from optuna.storages import BaseStorage, JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend

from mergetune.errors import MergetuneError
from mergetune.search.optuna_adapter import experimental
from mergetune.search.study_file import Study, redact_url

log = logging.getLogger(__name__)

JOURNAL_SCHEME = "journal://"
JOURNAL_SUFFIXES = (".log", ".jsonl")
# SQLAlchemy dialects Optuna's RDB storage runs on ("postgresql+psycopg://…" names a driver too).
SQL_DIALECTS = ("postgresql", "mysql", "mariadb", "sqlite", "oracle", "mssql")
DRIVER_EXTRAS = {"postgresql": "mergetune[postgres]"}  # psycopg 3
CREATE_ATTEMPTS = 5
SHORTEST_MASKED_PASSWORD = 4  # shorter ones would mask ordinary words in messages


def redact(text: str, url: str) -> str:
    """`text` with `url`'s password masked, in URL form and anywhere else it appears verbatim."""
    masked = redact_url(text)
    found = re.search(r"://[^:/@\s]*:(\S*)@", url)
    if found:
        for password in {found.group(1), unquote(found.group(1))}:
            if len(password) >= SHORTEST_MASKED_PASSWORD:
                masked = masked.replace(password, "***")
    return masked


def journal_path(study: Study) -> Optional[Path]:
    """The journal file a study's storage URL names (relative paths from the study file's folder), else None."""
    url = study.storage_url
    if url.startswith(JOURNAL_SCHEME):
        path = url[len(JOURNAL_SCHEME) :]
    elif "://" not in url and url.endswith(JOURNAL_SUFFIXES):
        path = url
    else:
        return None
    return (study.directory / Path(path).expanduser()).resolve()


def local_file(study: Study) -> Optional[Path]:
    """The file on this machine that holds the study's storage (a journal or a SQLite database), else None."""
    path = journal_path(study)
    if path is not None or dialect(study.storage_url) != "sqlite":
        return path
    name = study.storage_url.split("://", 1)[1].removeprefix("/")  # absolute unless ":memory:" (`anchored_sqlite_url`)
    return Path(name).resolve() if name and name != ":memory:" else None


def dialect(url: str) -> str:
    return url.split("://", 1)[0].split("+", 1)[0].lower() if "://" in url else ""


def open_storage(study: Study, create: bool = True) -> BaseStorage:
    """The study's storage, connected and checked: one clear MergetuneError if it can't be used.

    `create=False` (the read-side commands) refuses a storage file that does not exist yet
    instead of creating an empty one: a mistyped path must not leave a new file behind.
    """
    path = local_file(study)
    if path is None and dialect(study.storage_url) == "sqlite":
        raise MergetuneError(
            f"storage {study.storage_display}: an in-memory SQLite database keeps nothing after the run (a crash or "
            "Ctrl-C would lose every trial, and leaderboard and export could not read it); name a file: sqlite:///study.db"
        )
    if path is not None:
        _check_local_file(study, path, create)
    if journal_path(study) is not None:
        return _open_journal(path)
    url = study.storage_url
    if dialect(url) not in SQL_DIALECTS:
        raise MergetuneError(
            f"storage {study.storage_display}: not a storage URL this tool knows; use postgresql://user:password@host/db, "
            "sqlite:///file.db, journal:///path/file.log or a path ending in .log"
        )
    # postgresql:// gets the driver `mergetune[postgres]` installs, whichever SQLAlchemy picks by default.
    engine_url = re.sub(r"^postgresql://", "postgresql+psycopg://", url, flags=re.IGNORECASE)
    options = study.spec.storage_options
    engine_kwargs = {}
    if dialect(url) in ("postgresql", "mysql", "mariadb"):
        engine_kwargs["connect_args"] = {"connect_timeout": options.connect_timeout}
    _parse_url(engine_url, url)
    with storage_errors(url), experimental():
        try:
            for attempt in range(1, CREATE_ATTEMPTS + 1):
                try:
                    return RDBStorage(
                        engine_url,
                        engine_kwargs=engine_kwargs,
                        heartbeat_interval=options.heartbeat_interval,
                        grace_period=options.grace_period,
                    )
                except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
                    # Workers creating the tables of a new database at the same moment collide
                    # ("duplicate key", "already exists"); the tables are there on the next try.
                    if attempt == CREATE_ATTEMPTS:
                        raise
                    time.sleep(random.uniform(0.1, 0.5 * attempt))
        except ImportError:
            extra = DRIVER_EXTRAS.get(dialect(url))
            hint = f" (pip install '{extra}')" if extra else ""
            raise MergetuneError(
                f"storage {study.storage_display}: the {dialect(url)} database driver is not installed{hint}"
            ) from None


def open_existing_storage(study: Study) -> Optional[BaseStorage]:
    """The study's storage when there is one to open (a database server, or its file exists), else None
    once it is known that its file could be created.

    A first run creates its storage file only after the models have loaded (`open_storage`), so a run
    that fails before (a missing model, a full GPU, Ctrl-C) leaves no empty database behind.
    """
    path = local_file(study)
    if path is not None and not path.exists():
        _check_local_file(study, path, create=True)
        return None
    return open_storage(study)


def _parse_url(engine_url: str, url: str) -> None:
    """Parse a database URL before connecting, so a malformed one (a port that isn't a number) is one message."""
    try:
        sqlalchemy.engine.make_url(engine_url)
    except (sqlalchemy.exc.ArgumentError, ValueError) as error:
        raise MergetuneError(f"study storage {redact_url(url)}: not a valid database URL ({redact(str(error), url)})") from None


def _check_local_file(study: Study, path: Path, create: bool) -> None:
    """A storage file on this machine: its folder exists and, when it is to be written, is writable."""
    where = f"study storage {study.storage_display}"
    if not path.parent.is_dir():
        raise MergetuneError(f"{where}: directory {path.parent} does not exist")
    if path.is_dir():
        raise MergetuneError(f"{where}: {path} is a directory, expected a file")
    if not path.exists():
        if not create:
            raise MergetuneError(f"{where}: {path} does not exist; no trials were stored there (check --storage or the study file's storage)")
        if not os.access(path.parent, os.W_OK):
            raise MergetuneError(
                f"{where}: cannot create {path}: directory {path.parent} is not writable; "
                "set the study file's storage (or --storage) to a writable place"
            )
    elif create and not (os.access(path, os.W_OK) and os.access(path.parent, os.W_OK)):
        # SQLite writes a journal file beside the database, so its folder must be writable too.
        raise MergetuneError(
            f"{where}: {path} or its directory is not writable; "
            "set the study file's storage (or --storage) to a writable place"
        )


def _open_journal(path: Path) -> JournalStorage:
    try:
        return JournalStorage(JournalFileBackend(str(path)))
    except OSError as error:
        raise MergetuneError(f"journal storage {path}: cannot open it: {error.strerror or error}") from None
    except (ValueError, KeyError, TypeError) as error:  # lines that are not journal records
        raise MergetuneError(f"journal storage {path}: not a study journal, or damaged ({error})") from None


@contextlib.contextmanager
def storage_errors(url: str) -> Iterator[None]:
    """Turn a database driver's exception into one MergetuneError naming the storage, its password masked."""
    try:
        yield
    except sqlalchemy.exc.OperationalError as error:
        raise MergetuneError(f"cannot reach the study storage {redact_url(url)}: {_driver_message(error, url)}") from None
    except (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError) as error:
        raise MergetuneError(f"study storage {redact_url(url)}: {_driver_message(error, url)}") from None


def _driver_message(error: BaseException, url: str) -> str:
    """The first line of what the driver said (Optuna wraps it), without SQLAlchemy's links and the password."""
    cause = error.__cause__ if isinstance(error, optuna.exceptions.StorageInternalError) and error.__cause__ else error
    if isinstance(cause, sqlalchemy.exc.DBAPIError) and cause.orig is not None:
        cause = cause.orig
    lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
    return redact(lines[0] if lines else type(cause).__name__, url)


def heartbeat_interval(storage: BaseStorage) -> Optional[int]:
    """Seconds between heartbeats when the storage records them (RDB storages opened here), else None."""
    getter = getattr(storage, "get_heartbeat_interval", None)
    return getter() if getter else None


@contextlib.contextmanager
def heartbeat(storage: BaseStorage, trial_id: int) -> Iterator[None]:
    """Record the trial's heartbeat now and every interval until the block ends (no-op without heartbeats).

    A failed heartbeat is logged, not raised: a database blip must not kill a trial that
    is otherwise fine (if it lasts past the grace period, the trial is retried elsewhere).
    """
    interval = heartbeat_interval(storage)
    if interval is None:
        yield
        return
    storage.record_heartbeat(trial_id)
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(interval):
            try:
                storage.record_heartbeat(trial_id)
            except Exception as error:  # drivers raise their own types
                log.warning("heartbeat of trial id %d not recorded: %s", trial_id, redact_url(f"{error!r}"[:300]))

    thread = threading.Thread(target=beat, name=f"heartbeat-{trial_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def dashboard_target(study: Study) -> str:
    """What to give optuna-dashboard to browse the study (the password masked: the user knows it)."""
    path = journal_path(study)
    return str(path) if path is not None else study.storage_display
