"""Units of store work for the writer process's tests: module-level, so the writer process
can import them, as it imports the store's own."""

from __future__ import annotations

import os
import time

import sqlalchemy as sa
from sqlalchemy.engine import Connection

NOTES = sa.Table("notes", sa.MetaData(), sa.Column("id", sa.Integer, primary_key=True),
                 sa.Column("text", sa.String, nullable=False), sa.Column("pid", sa.Integer, nullable=False))


def create_notes(conn: Connection) -> None:
    NOTES.create(conn)


def add_note(conn: Connection, note_id: int, text: str) -> int:
    """Returns the id of the process the write ran in."""
    conn.execute(sa.insert(NOTES).values(id=note_id, text=text, pid=os.getpid()))
    return os.getpid()


def all_notes(conn: Connection) -> list[tuple[int, str, int]]:
    return [tuple(row) for row in conn.execute(sa.select(NOTES).order_by(NOTES.c.id))]


def sleep(conn: Connection, seconds: float) -> None:
    time.sleep(seconds)
