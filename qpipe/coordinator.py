# Leaf module: imports only the standard library, never another qpipe module.
"""Stop a group of threads together, and close a queue when its last feeding loop ends.

`Coordinator` is TensorFlow 1.x's ``tf.train.Coordinator``: threads check
`Coordinator.should_stop`, any thread may call `Coordinator.request_stop` (with
the exception that made it give up, if any), and the main thread calls
`Coordinator.join`, which waits for the threads, gives them a grace period once a
stop was requested, and re-raises the first reported exception::

    coord = Coordinator()
    threads = [threading.Thread(target=loop, args=(coord,)) for loop in loops]
    for t in threads:
        t.start()
    coord.join(threads)          # re-raises what a loop reported

    def loop(coord):
        with coord.stop_on_exception():
            while not coord.should_stop():
                ...

`QueueRunner` is ``tf.train.QueueRunner`` for loops rather than single enqueue ops:
it runs several enqueue loops in threads under a coordinator and closes their
target queue exactly once, so that consumers drain it and stop instead of waiting
forever::

    runner = QueueRunner(instance_queue, [read_shards] * 4,
                         queue_closed_exception_types=(qpipe.OutOfRangeError,))
    coord = Coordinator()
    runner.start(coord)
    coord.join()                 # loops and the closer are registered with coord

Both classes are thread-safe. Nothing here knows about sockets or queues; the
target of a `QueueRunner` is anything with ``close(cancel_pending_enqueues=...)``.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Protocol

__all__ = ["Closable", "Coordinator", "QueueRunner"]

_log = logging.getLogger(__name__)

# NOTE: a thread gives no signal when it ends, so `Coordinator.join` polls for a stop
# request at this interval while it waits on the threads themselves.
_JOIN_POLL_SECS = 0.05


class Coordinator:
    """Lets a group of threads stop together and reports the first error among them.

    Same semantics as TensorFlow's ``tf.train.Coordinator``:

    - A stop is requested at most once until `clear_stop`. The exception passed
      with that first request (if any) is recorded; exceptions reported after the
      stop was already requested are ignored (logged at INFO), because they are
      usually consequences of the stop, such as a blocked enqueue cancelled by a
      queue close.
    - `join` re-raises the recorded exception. After `join` has returned or raised,
      a new ``request_stop(exc)`` raises ``exc`` in the caller's thread, since nobody
      would see it otherwise.

    Parameters
    ----------
    clean_stop_exception_types : iterable of exception types, optional
        Exceptions that mean "the input is exhausted", not "something broke". Reporting
        one requests a stop without recording it, so `join` does not raise. TensorFlow
        uses ``OutOfRangeError`` here; pass ``(qpipe.OutOfRangeError,)`` to get the same.
        Empty by default.

    Notes
    -----
    All methods are thread-safe. Only `join` and `wait_for_stop` block.
    """

    def __init__(self, clean_stop_exception_types: Iterable[type[BaseException]] = ()) -> None:
        self._clean_stop_exception_types = tuple(clean_stop_exception_types)
        self._lock = threading.Lock()
        self._stop_event = threading.Event()
        self._exception: BaseException | None = None
        self._joined = False
        # dicts, not sets: keep registration order so error messages list threads stably.
        self._threads: dict[threading.Thread, None] = {}
        self._stop_listeners: dict[threading.Event, None] = {}

    def request_stop(self, exc: BaseException | None = None) -> None:
        """Ask every thread to stop, optionally reporting the exception that caused it.

        Never blocks. Only the first call between `clear_stop` calls takes effect.

        Parameters
        ----------
        exc : BaseException, optional
            The error that made the caller give up. Recorded, and later re-raised by
            `join`, if this call is the one that requests the stop and ``exc`` is not
            one of the ``clean_stop_exception_types``.

        Raises
        ------
        TypeError
            If ``exc`` is neither None nor an exception instance.
        BaseException
            ``exc`` itself, if `join` has already returned or raised: the report would
            otherwise be lost.
        """
        if exc is not None and not isinstance(exc, BaseException):
            raise TypeError(f"request_stop() takes an exception instance or None, not {type(exc).__name__}")
        if isinstance(exc, self._clean_stop_exception_types):
            exc = None
        with self._lock:
            if exc is not None and self._joined:
                raise exc
            if self._stop_event.is_set():
                if exc is not None:
                    _log.info("Ignored an error reported after the stop request: %r", exc)
                return
            if exc is not None:
                _log.info("Error reported to Coordinator: %r", exc)
            self._exception = exc
            self._stop_event.set()
            for listener in self._stop_listeners:
                listener.set()

    def should_stop(self) -> bool:
        """Return True once a stop has been requested. Never blocks."""
        return self._stop_event.is_set()

    def wait_for_stop(self, timeout: float | None = None) -> bool:
        """Block until a stop is requested or ``timeout`` seconds pass.

        Parameters
        ----------
        timeout : float, optional
            Seconds to wait; None waits for as long as it takes.

        Returns
        -------
        bool
            True if a stop was requested, False if the timeout expired first.
        """
        return self._stop_event.wait(timeout)

    @contextlib.contextmanager
    def stop_on_exception(self) -> Iterator[None]:
        """Context manager that reports an escaping exception with `request_stop`.

        An `Exception` raised in the block is reported and swallowed, as TensorFlow
        does, so a worker thread ends quietly and `join` re-raises the error in the
        main thread. A `BaseException` that is not an `Exception` (KeyboardInterrupt,
        SystemExit) is reported and then propagates.

        Examples
        --------
        >>> def loop(coord):
        ...     with coord.stop_on_exception():
        ...         while not coord.should_stop():
        ...             step()
        """
        try:
            yield
        except Exception as exc:
            self.request_stop(exc)
        except BaseException as exc:
            self.request_stop(exc)
            raise

    def register_thread(self, thread: threading.Thread) -> None:
        """Add ``thread`` to the threads that a later `join` waits for. Never blocks."""
        with self._lock:
            self._threads[thread] = None

    def join(
        self,
        threads: Iterable[threading.Thread] | None = None,
        stop_grace_period_secs: float = 120,
        ignore_live_threads: bool = False,
    ) -> None:
        """Wait for the threads to end; after a stop request, wait at most a grace period.

        Blocks until every thread has ended, or until a stop is requested and then
        either every thread has ended or ``stop_grace_period_secs`` have passed. With
        no stop request and threads that never end, it blocks forever, as in
        TensorFlow. Afterwards the registered threads are forgotten and the coordinator
        counts as joined (see `request_stop`).

        Parameters
        ----------
        threads : iterable of threading.Thread, optional
            Threads to wait for, on top of those passed to `register_thread`. The
            calling thread is left out if it is among them.
        stop_grace_period_secs : float
            Seconds the threads get to end once a stop was requested.
        ignore_live_threads : bool
            If True, threads still alive after the grace period are only logged.

        Raises
        ------
        BaseException
            The exception recorded by `request_stop`, if any. It takes precedence over
            threads still running, which are then logged.
        RuntimeError
            If threads are still alive after the grace period and
            ``ignore_live_threads`` is False; the message names them.
        """
        with self._lock:
            waiting = dict(self._threads)
        waiting.update(dict.fromkeys(threads or ()))
        waiting.pop(threading.current_thread(), None)
        pending = list(waiting)

        for thread in pending:
            while thread.is_alive() and not self._stop_event.is_set():
                thread.join(_JOIN_POLL_SECS)
        if self._stop_event.is_set():
            deadline = time.monotonic() + max(stop_grace_period_secs, 0.0)
            for thread in pending:
                thread.join(max(deadline - time.monotonic(), 0.0))
        stragglers = [thread.name for thread in pending if thread.is_alive()]

        with self._lock:
            self._joined = True
            self._threads.clear()
            exception = self._exception
        message = (
            f"Coordinator stopped with {len(stragglers)} thread(s) still running after a "
            f"{stop_grace_period_secs:g} s grace period: {', '.join(stragglers)}"
        )
        if exception is not None:
            if stragglers:
                _log.warning("%s", message)
            raise exception
        if stragglers:
            if ignore_live_threads:
                _log.info("%s", message)
            else:
                raise RuntimeError(
                    f"{message}; make them check should_stop() or pass a longer stop_grace_period_secs"
                )

    @property
    def joined(self) -> bool:
        """True once `join` has returned or raised, until `clear_stop`."""
        return self._joined

    def raise_requested_exception(self) -> None:
        """Raise the exception recorded by `request_stop`, if there is one. Never blocks."""
        with self._lock:
            exception = self._exception
        if exception is not None:
            raise exception

    def clear_stop(self) -> None:
        """Forget the stop request, the recorded exception and the joined state.

        Lets the coordinator be reused for a new group of threads. Never blocks.
        """
        with self._lock:
            self._joined = False
            self._exception = None
            self._stop_event.clear()

    def _add_stop_listener(self, event: threading.Event) -> None:
        # Lets QueueRunner wake its closer thread on a stop request without polling.
        with self._lock:
            self._stop_listeners[event] = None
            if self._stop_event.is_set():
                event.set()

    def _remove_stop_listener(self, event: threading.Event) -> None:
        with self._lock:
            self._stop_listeners.pop(event, None)


class Closable(Protocol):
    """What `QueueRunner` needs from its target: a TensorFlow-style ``close``."""

    def close(self, cancel_pending_enqueues: bool = False) -> Any: ...


class QueueRunner:
    """Runs enqueue loops in threads and closes their target queue exactly once.

    Each loop is a callable that feeds the target until its input runs out and then
    returns, for example "dequeue a file name, read the file, enqueue its records,
    repeat". A loop that takes one argument is given the coordinator and should
    check `Coordinator.should_stop` between items; a loop that takes none is called
    without arguments.

    The target is closed exactly once, by a dedicated closer thread:

    - when the last loop ends and no stop was requested:
      ``close(cancel_pending_enqueues=False)``. Items already enqueued stay, so the
      consumers drain them and then get the queue's out-of-range error; or
    - as soon as a stop is requested while loops still run, whether by a failing
      loop or by anyone else: ``close(cancel_pending_enqueues=True)``. Loops blocked
      in an enqueue then fail at once instead of holding up `Coordinator.join`;
      their errors come after the stop request, so the coordinator ignores them.

    A loop that raises reports the exception with ``coord.request_stop(exc)``, so
    `Coordinator.join` re-raises it; a loop that raises one of the
    ``queue_closed_exception_types`` counts as having ended normally. If ``close``
    itself raises, that is reported the same way.

    This follows TensorFlow's QueueRunner (close on the last thread, cancel on a
    stop request), except that a loop here is a whole loop, not one enqueue op.

    Parameters
    ----------
    target : Closable
        The queue the loops feed; anything with ``close(cancel_pending_enqueues=...)``.
    loops : sequence of callables
        ``loop(coord)`` or ``loop()``; one thread each. The same callable may appear
        several times to run several copies.
    queue_closed_exception_types : iterable of exception types, optional
        Exceptions that mean "my input is exhausted", such as ``qpipe.OutOfRangeError``
        from a dequeue on a closed, drained file-name queue.
    name : str
        Prefix of the thread names (``name-0``, ..., ``name-close``), which appear in
        the coordinator's error messages.
    daemon : bool
        Whether the threads are daemon threads, so that a loop stuck for good does not
        keep the process alive after the main thread has given up on it.

    Raises
    ------
    ValueError
        If ``loops`` is empty.
    TypeError
        If ``target`` has no ``close`` method, or a loop is not callable or needs more
        than one argument.
    """

    def __init__(
        self,
        target: Closable,
        loops: Sequence[Callable[..., Any]],
        *,
        queue_closed_exception_types: Iterable[type[BaseException]] = (),
        name: str = "queue-runner",
        daemon: bool = True,
    ) -> None:
        if not callable(getattr(target, "close", None)):
            raise TypeError(f"QueueRunner target {target!r} has no close() method")
        if not loops:
            raise ValueError("QueueRunner needs at least one loop")
        self._target = target
        self._loops = [(loop, _takes_coordinator(loop, index)) for index, loop in enumerate(loops)]
        self._queue_closed_exception_types = tuple(queue_closed_exception_types)
        self._name = name
        self._daemon = daemon
        self._lock = threading.Lock()
        self._running = 0
        self._wake_closer = threading.Event()
        self._threads: list[threading.Thread] = []

    @property
    def name(self) -> str:
        """The prefix of this runner's thread names."""
        return self._name

    def start(self, coord: Coordinator) -> list[threading.Thread]:
        """Start one thread per loop plus the closer thread, registered with ``coord``.

        Never blocks. A runner runs its loops once; make a new runner to run them again.

        Parameters
        ----------
        coord : Coordinator
            Receives the loops' errors and the stop requests that cancel the queue.

        Returns
        -------
        list of threading.Thread
            The started threads, loops first, the closer last.

        Raises
        ------
        RuntimeError
            If this runner was already started.
        """
        with self._lock:
            if self._threads:
                raise RuntimeError(
                    f"QueueRunner {self._name!r} was already started with {len(self._loops)} loop(s); "
                    "a runner runs once, so create a new one"
                )
            self._running = len(self._loops)
            self._threads = [
                threading.Thread(
                    target=self._run_loop,
                    args=(coord, loop, takes_coord),
                    name=f"{self._name}-{index}",
                    daemon=self._daemon,
                )
                for index, (loop, takes_coord) in enumerate(self._loops)
            ]
            self._threads.append(
                threading.Thread(
                    target=self._close_when_done, args=(coord,), name=f"{self._name}-close", daemon=self._daemon
                )
            )
            threads = list(self._threads)
        coord._add_stop_listener(self._wake_closer)
        for thread in threads:
            coord.register_thread(thread)
            thread.start()
        return threads

    def join(self, timeout: float | None = None) -> None:
        """Wait until every loop has ended and the target has been closed.

        Blocks for at most ``timeout`` seconds in total. Loop errors are not raised
        here: they go to the coordinator, whose `Coordinator.join` raises them.

        Parameters
        ----------
        timeout : float, optional
            Seconds to wait in total; None waits for as long as it takes.

        Raises
        ------
        RuntimeError
            If the runner was never started.
        TimeoutError
            If threads are still running when the timeout expires; the message names them.
        """
        with self._lock:
            threads = list(self._threads)
        if not threads:
            raise RuntimeError(f"QueueRunner {self._name!r} was never started; call start(coord) first")
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in threads:
            thread.join(None if deadline is None else max(deadline - time.monotonic(), 0.0))
        alive = [thread.name for thread in threads if thread.is_alive()]
        if alive:
            raise TimeoutError(
                f"QueueRunner {self._name!r} still has {len(alive)} thread(s) running after "
                f"{timeout:g} s: {', '.join(alive)}"
            )

    def _run_loop(self, coord: Coordinator, loop: Callable[..., Any], takes_coord: bool) -> None:
        try:
            if takes_coord:
                loop(coord)
            else:
                loop()
        except self._queue_closed_exception_types:
            pass
        except BaseException as exc:
            coord.request_stop(exc)
        finally:
            with self._lock:
                self._running -= 1
                last = self._running == 0
            if last:
                self._wake_closer.set()

    def _close_when_done(self, coord: Coordinator) -> None:
        # Woken by the last loop ending or by a stop request (via the coordinator's
        # listener), whichever comes first; either way this is the only close call.
        self._wake_closer.wait()
        cancel = coord.should_stop()
        try:
            self._target.close(cancel_pending_enqueues=cancel)
        except BaseException as exc:
            coord.request_stop(exc)
        finally:
            coord._remove_stop_listener(self._wake_closer)


def _takes_coordinator(loop: Callable[..., Any], index: int) -> bool:
    """Return whether ``loop`` is to be called with the coordinator, else with nothing."""
    if not callable(loop):
        raise TypeError(f"QueueRunner loop {index} is not callable: {loop!r}")
    try:
        signature = inspect.signature(loop)
    except (TypeError, ValueError):
        return True  # not introspectable (some builtins): assume the documented form
    for args in ((None,), ()):
        try:
            signature.bind(*args)
        except TypeError:
            continue
        return bool(args)
    raise TypeError(
        f"QueueRunner loop {index} ({loop!r}) must take the coordinator as its only argument, "
        f"or no argument; its signature is {signature}"
    )
