"""Scratch PostgreSQL databases: an empty study storage for the scale-out tests and the soak benchmark."""

from __future__ import annotations

import contextlib
import uuid
from typing import Iterator


@contextlib.contextmanager
def scratch_postgres_database(server_url: str, prefix: str) -> Iterator[str]:
    """The URL of a new, uniquely named database on `server_url`'s server, dropped (connections and all)
    afterwards."""
    import psycopg

    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield f"{server_url.rsplit('/', 1)[0]}/{name}"
        finally:
            admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
