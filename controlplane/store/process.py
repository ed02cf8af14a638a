"""SQLite's bulk write transactions in a process of their own.

A row that SQLite inserts is C work: B-trees, pages, the WAL. On the gateway's event loop the
rows a hot path gathers (a stream negotiation's history row) were the largest part of what it
cost that the control plane itself owned, and a thread did not help, because the thread and
the loop contend for the GIL. A child process has a GIL of its own: the loop only pickles the
rows and reads the answer, and SQLite runs on the other core.

The child runs one transaction at a time, in the order they come, on a connection of its own:
SQLite has one write lock, and the store's one writer (``Writer``) never runs two write
transactions at once anyway. Reads stay in the gateway's process (WAL lets them run beside the
child's writes).

What crosses the pipe is pickled: the store's work is a module-level function and its data.
A call that does not pickle (a lambda, a closure), or that the child cannot load (a function
of a module it cannot import), raises ``NotPortable``, and the caller runs it in its own
process as before. So does every call once the child has exited (or could not start). A
transaction the child was running when it exited fails with ``WriterExited``: it may or may
not have committed.

Frames on the pipe are a 4-byte length and a pickle: ``(fn, args)`` one way, ``(ok, value)``
the other, where ``value`` is the function's result or its exception.
"""

from __future__ import annotations

import asyncio
import os
import pickle
import signal
import sys
from collections import deque
from collections.abc import Callable
from typing import Any, BinaryIO

from controlplane.logs import get_logger

log = get_logger("store.process")

STOP_TIMEOUT_S = 10.0
# The child's answer to work it cannot unpickle: the caller runs it in its own process.
UNPORTABLE = "unportable"
# Not ``-m``: this module is imported with its package before runpy would run it as __main__.
CHILD = "from controlplane.store.process import main; main()"


class NotPortable(Exception):
    """The call cannot go to the child: it does not pickle, the child cannot load it, or the
    child has exited."""


class WriterExited(ConnectionError):
    """The child exited while it ran the transaction; it may or may not have committed."""


class WriterProcess:
    """The child that runs a SQLite database's bulk write transactions (``main`` with the
    database's URL), started on the first call."""

    def __init__(self, url: str) -> None:
        self._url = url
        self._proc: asyncio.subprocess.Process | None = None
        self._reading: asyncio.Task[None] | None = None
        self._waiting: deque[asyncio.Future[Any]] = deque()
        self._starting: asyncio.Lock | None = None
        self._stopping = False
        self.exited = False

    async def run(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
        """``fn(conn, *args)`` in a transaction of the child; its result, or its exception."""
        if self.exited:
            raise NotPortable("the writer process has exited")
        try:
            payload = pickle.dumps((fn, args), protocol=pickle.HIGHEST_PROTOCOL)
        except (pickle.PicklingError, AttributeError, TypeError) as exc:
            raise NotPortable(f"{fn!r} does not pickle: {exc}") from None
        proc = await self._started()
        answer: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting.append(answer)
        assert proc.stdin is not None
        proc.stdin.write(len(payload).to_bytes(4, "big") + payload)  # buffered by the transport: never blocks
        return await answer

    async def _started(self) -> asyncio.subprocess.Process:
        if self._proc is not None:
            return self._proc
        self._starting = self._starting or asyncio.Lock()
        async with self._starting:
            if self._proc is None:
                try:
                    proc = await asyncio.create_subprocess_exec(
                        sys.executable, "-c", CHILD, self._url, stdin=asyncio.subprocess.PIPE,
                        stdout=asyncio.subprocess.PIPE)
                except OSError as exc:
                    self.exited = True
                    log.warning("the store's writer process could not start; bulk writes run on a thread",
                                error=repr(exc))
                    raise NotPortable("the writer process could not start") from exc
                assert proc.stdout is not None
                self._reading = asyncio.create_task(self._read(proc.stdout), name="store-writer-process")
                self._proc = proc
        return self._proc

    async def _read(self, stdout: asyncio.StreamReader) -> None:
        try:
            while True:
                size = int.from_bytes(await stdout.readexactly(4), "big")
                ok, value = pickle.loads(await stdout.readexactly(size))
                answer = self._waiting.popleft()
                if answer.done():  # its caller gave up waiting
                    continue
                if ok == UNPORTABLE:
                    answer.set_exception(NotPortable(f"the writer process cannot load the work: {value}"))
                elif ok:
                    answer.set_result(value)
                else:
                    answer.set_exception(value)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the child exited
        except Exception as exc:  # an answer that does not unpickle: nothing after it can be trusted
            log.warning("the store's writer process sent an unreadable answer", error=repr(exc))
        finally:
            self.exited = True
            if not self._stopping:
                log.warning("the store's writer process exited; bulk writes run on a thread from now on",
                            in_flight=len(self._waiting))
            while self._waiting:
                answer = self._waiting.popleft()
                if not answer.done():
                    answer.set_exception(WriterExited("the store's writer process exited during the transaction"))

    async def stop(self) -> None:
        """Let the child finish what it was sent, then end it (its stdin closes)."""
        proc, self._proc = self._proc, None
        self._stopping = self.exited = True
        if proc is None:
            return
        assert proc.stdin is not None
        proc.stdin.close()
        try:
            async with asyncio.timeout(STOP_TIMEOUT_S):
                await proc.wait()
        except TimeoutError:
            log.warning("the store's writer process did not stop; killing it")
            proc.kill()
            await proc.wait()
        if self._reading is not None:
            await asyncio.gather(self._reading, return_exceptions=True)


# --- the child ---------------------------------------------------------------------------------


def _portable(result: tuple[bool, Any]) -> bytes:
    """The answer pickled; an exception that does not pickle becomes a RuntimeError naming it
    (also inside a list of ``(ok, value)``, the shape of the writer's batches)."""
    try:
        return pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:
        pass

    def plain(value: Any) -> Any:
        if isinstance(value, BaseException):
            try:
                pickle.dumps(value)
            except Exception:
                return RuntimeError(repr(value))
        return value

    ok, value = result
    if isinstance(value, list):
        value = [(item[0], plain(item[1])) if isinstance(item, tuple) and len(item) == 2 else item for item in value]
    try:
        return pickle.dumps((ok, plain(value)), protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:
        return pickle.dumps((False, RuntimeError(f"the store's answer does not pickle: {exc!r}")))


def _read_frame(stream: BinaryIO) -> bytes | None:
    head = stream.read(4)
    if len(head) < 4:
        return None  # the gateway closed the pipe: stop
    size = int.from_bytes(head, "big")
    body = stream.read(size)
    if len(body) < size:
        return None
    return body


def serve(url: str, requests: BinaryIO, answers: BinaryIO) -> None:
    """Run each transaction that comes on ``requests`` and answer it on ``answers``."""
    from controlplane.store.engine import make_sqlite_engine, parse_url

    engine = make_sqlite_engine(parse_url(url))
    conn = engine.connect()
    try:
        while (frame := _read_frame(requests)) is not None:
            try:
                fn, args = pickle.loads(frame)
            except Exception as exc:  # e.g. a function of a module this process cannot import
                payload = pickle.dumps((UNPORTABLE, repr(exc)))
            else:
                try:
                    with conn.begin():
                        result: tuple[bool, Any] = (True, fn(conn, *args))
                except Exception as exc:
                    result = (False, exc)
                    if conn.invalidated or conn.closed:
                        conn = engine.connect()
                payload = _portable(result)
            answers.write(len(payload).to_bytes(4, "big") + payload)
            answers.flush()
    finally:
        conn.close()
        engine.dispose()


def main() -> None:
    # A Ctrl-C reaches the whole process group: the gateway stops its writer, then closes the
    # pipe, and that is when this process ends, with nothing it was sent left undone.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # The answers get stdout's file of their own; what else writes to stdout goes to stderr.
    answers = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    serve(sys.argv[1], sys.stdin.buffer, answers)
