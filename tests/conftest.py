"""Fixtures for tests that talk to a queue host over sockets.

* ``transport`` / ``server`` / ``make_server``: queue hosts on inproc, ipc (in a
  short temporary directory) or tcp port 0, stopped under a timeout at teardown.
  ``transport`` is ``"tcp"`` unless a test parametrizes it.
* ``flavour``: the same test body drives the blocking :class:`qpipe.Client` and
  the :class:`qpipe.AsyncClient` (on asyncio's loop and on uvloop). Async calls
  run on a loop in a helper thread behind a blocking proxy, so one body serves
  both; ``flavour.start(q.dequeue, ...)`` runs a call in the background and
  returns a ``concurrent.futures.Future``.
* ``run_async``: run a coroutine on a fresh asyncio or uvloop loop (async-only tests).
* ``raw_dealer``: plain pyzmq DEALER sockets for sending hand-made frames.
* ``processes``: every process a test starts, terminated and joined at teardown.
* ``procs``: ``procs(args, ...)`` starts ``python -m qpipe.cli ARGS`` as a
  :class:`_procs.Proc` (own session, output pumped by threads); at teardown each one's
  process group and every process seen below it are killed by PID.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import os
import shutil
import tempfile
import threading
import uuid
from typing import Any

import pytest
import zmq
from _procs import Proc

import qpipe

WAIT = 10.0  # bound on every wait that should end at once
TEARDOWN = 15.0  # bound on stopping what a test started


def address_for(transport: str, directory: str) -> str:
    if transport == "inproc":
        return f"inproc://qpipe-test-{uuid.uuid4().hex}"
    if transport == "ipc":
        return f"ipc://{directory}/{uuid.uuid4().hex[:8]}.sock"
    if transport == "tcp":
        return "tcp://127.0.0.1:0"
    raise ValueError(f"unknown transport {transport!r}")


@pytest.fixture
def ipc_dir():
    # NOTE: ipc paths are limited to 107 bytes and tmp_path grows with the test name.
    d = tempfile.mkdtemp(prefix="qp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def transport() -> str:
    return "tcp"


@pytest.fixture
def make_server(ipc_dir):
    """``make_server(transport="tcp", **kwargs)`` starts a QueueServer; all are stopped at teardown."""
    servers: list[qpipe.QueueServer] = []

    def make(transport: str = "tcp", address: str | None = None, **kwargs: Any) -> qpipe.QueueServer:
        s = qpipe.QueueServer(address or address_for(transport, ipc_dir), **kwargs)
        s.start(timeout=WAIT)
        servers.append(s)
        return s

    yield make
    for s in servers:
        s.stop(timeout=TEARDOWN)  # raises, failing the teardown, if the host does not stop


@pytest.fixture
def server(make_server, transport) -> qpipe.QueueServer:
    return make_server(transport)


# -- client flavours ----------------------------------------------------------------------


class SyncFlavour:
    """The blocking client as is; background calls run in threads."""

    name = "sync"
    is_async = False

    def __init__(self) -> None:
        self._clients: list[qpipe.Client] = []
        self._threads: list[threading.Thread] = []

    def connect(self, address: str, **kwargs: Any) -> qpipe.Client:
        c = qpipe.connect(address, **kwargs)
        self._clients.append(c)
        return c

    def start(self, fn: Any, *args: Any, **kwargs: Any) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()

        def run() -> None:
            if not fut.set_running_or_notify_cancel():
                return
            try:
                fut.set_result(fn(*args, **kwargs))
            except BaseException as e:
                fut.set_exception(e)

        t = threading.Thread(target=run, name=f"test-call {getattr(fn, '__name__', fn)}", daemon=True)
        t.start()
        self._threads.append(t)
        return fut

    def queue_handle(self, client: qpipe.Client, name: str, spec: qpipe.QueueSpec) -> qpipe.Queue:
        """A handle built without asking the host (for hosts that are not there)."""
        return qpipe.Queue(client, name, spec)

    def teardown(self) -> None:
        stuck = []
        for t in self._threads:
            t.join(TEARDOWN)
            if t.is_alive():
                stuck.append(t.name)
        if stuck:
            # Closing a socket another thread is blocked on is unsafe: leave it and fail.
            pytest.fail(f"background calls still running after {TEARDOWN} s: {stuck}")
        for c in self._clients:
            c.close()


class _Method:
    """A coroutine method of an async client or queue, called as a blocking one."""

    def __init__(self, flavour: AsyncFlavour, fn: Any) -> None:
        self.flavour = flavour
        self.fn = fn
        self.__name__ = fn.__name__

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.flavour.run(self.fn(*args, **kwargs))


class AsyncProxy:
    """Blocking view of an AsyncClient or AsyncQueue whose loop runs in a helper thread."""

    def __init__(self, flavour: AsyncFlavour, target: Any) -> None:
        self._flavour = flavour
        self._target = target

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._target, name)
        if inspect.iscoroutinefunction(attr):
            return _Method(self._flavour, attr)
        if name == "close" and isinstance(self._target, qpipe.AsyncClient):
            return lambda: self._flavour.run(self._target.aclose())
        return attr

    def __repr__(self) -> str:
        return f"<AsyncProxy {self._target!r}>"


class AsyncFlavour:
    """The asyncio client, on an asyncio or uvloop loop in a helper thread."""

    is_async = True

    def __init__(self, loop_name: str) -> None:
        self.name = loop_name
        if loop_name == "uvloop":
            import uvloop

            self.loop = uvloop.new_event_loop()
        else:
            self.loop = asyncio.new_event_loop()
        self._clients: list[qpipe.AsyncClient] = []
        self._futures: list[concurrent.futures.Future] = []
        self._thread = threading.Thread(target=self.loop.run_forever, name=f"test-loop {loop_name}", daemon=True)
        self._thread.start()

    def run(self, coro: Any, timeout: float = 3 * WAIT) -> Any:
        result = asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)
        if isinstance(result, (qpipe.AsyncQueue, qpipe.AsyncClient)):
            return AsyncProxy(self, result)
        return result

    def connect(self, address: str, **kwargs: Any) -> AsyncProxy:
        client = asyncio.run_coroutine_threadsafe(qpipe.aconnect(address, **kwargs), self.loop).result(WAIT)
        self._clients.append(client)
        return AsyncProxy(self, client)

    def start(self, method: _Method, *args: Any, **kwargs: Any) -> concurrent.futures.Future:
        coro = method.fn(*args, **kwargs)

        async def wrapped() -> Any:
            result = await coro
            return AsyncProxy(self, result) if isinstance(result, qpipe.AsyncQueue) else result

        fut = asyncio.run_coroutine_threadsafe(wrapped(), self.loop)
        self._futures.append(fut)
        return fut

    def queue_handle(self, client: AsyncProxy, name: str, spec: qpipe.QueueSpec) -> AsyncProxy:
        """A handle built without asking the host (for hosts that are not there)."""
        return AsyncProxy(self, qpipe.AsyncQueue(client._target, name, spec))

    def teardown(self) -> None:
        async def finish() -> None:
            for f in self._futures:
                f.cancel()
            for c in self._clients:
                c.close()
            others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in others:
                t.cancel()
            await asyncio.wait_for(asyncio.gather(*others, return_exceptions=True), TEARDOWN)

        try:
            asyncio.run_coroutine_threadsafe(finish(), self.loop).result(TEARDOWN + 5)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(TEARDOWN)
            if not self._thread.is_alive():
                self.loop.close()


FLAVOURS = ["sync", "asyncio", "uvloop"]


def make_flavour(name: str) -> SyncFlavour | AsyncFlavour:
    return SyncFlavour() if name == "sync" else AsyncFlavour(name)


@pytest.fixture(params=FLAVOURS)
def flavour(request):
    f = make_flavour(request.param)
    yield f
    f.teardown()


@pytest.fixture
def flavours():
    """``flavours(name)`` builds a flavour by name; all are torn down at the end."""
    made = []

    def make(name: str) -> SyncFlavour | AsyncFlavour:
        f = make_flavour(name)
        made.append(f)
        return f

    yield make
    for f in reversed(made):
        f.teardown()


# -- raw sockets and processes ------------------------------------------------------------


@pytest.fixture
def raw_dealer():
    """``raw_dealer(address)``: a DEALER socket with linger 0, closed at teardown."""
    socks: list[zmq.Socket] = []

    def make(address: str) -> zmq.Socket:
        s = zmq.Context.instance().socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(address)
        socks.append(s)
        return s

    yield make
    for s in socks:
        s.close(0)


@pytest.fixture
def processes():
    """A list to append started processes to; each is terminated, killed if need be, and joined."""
    procs: list[Any] = []
    yield procs
    for p in procs:
        if p.pid is None:
            continue  # never started
        if p.is_alive():
            p.terminate()
            p.join(5)
        if p.is_alive():
            os.kill(p.pid, 9)
            p.join(5)
        p.close()


@pytest.fixture
def procs():
    """``procs(args, ...)`` starts a :class:`_procs.Proc`; all are stopped by PID at teardown."""
    started: list[Proc] = []

    def start(args: list, **kwargs: Any) -> Proc:
        p = Proc(args, **kwargs)
        started.append(p)
        return p

    yield start
    for p in started:
        p.stop()


@pytest.fixture(params=["asyncio", "uvloop"])
def run_async(request):
    """``run_async(coro_fn)`` runs ``coro_fn()`` to completion on a fresh asyncio or uvloop loop."""

    def run(coro_fn: Any, timeout: float = 3 * WAIT) -> Any:
        if request.param == "uvloop":
            import uvloop

            factory = uvloop.new_event_loop
        else:
            factory = asyncio.new_event_loop
        with asyncio.Runner(loop_factory=factory) as runner:
            return runner.run(asyncio.wait_for(coro_fn(), timeout))

    run.loop_name = request.param
    return run
