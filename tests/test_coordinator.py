import threading

import pytest

from qpipe.coordinator import Coordinator, QueueRunner

WAIT = 10.0  # bound on every wait that should end at once


class Exhausted(Exception):
    pass


class Cancelled(Exception):
    pass


class Closed(Exception):
    pass


class FakeQueue:
    """A bounded queue with TensorFlow close semantics, enough to drive a QueueRunner."""

    def __init__(self, capacity=2):
        self.capacity = capacity
        self.items = []
        self.close_calls = []
        self.closed = threading.Event()
        self._cancelled = False
        self._cond = threading.Condition()

    def enqueue(self, item):
        with self._cond:
            if self.closed.is_set():
                raise Closed("enqueue on a closed queue")
            if not self._cond.wait_for(lambda: len(self.items) < self.capacity or self._cancelled, WAIT):
                raise TimeoutError("enqueue timed out")
            if self._cancelled:
                raise Cancelled("enqueue cancelled")
            self.items.append(item)
            self._cond.notify_all()

    def dequeue(self):
        with self._cond:
            if not self._cond.wait_for(lambda: self.items or self.closed.is_set(), WAIT):
                raise TimeoutError("dequeue timed out")
            if not self.items:
                raise Exhausted("queue closed and empty")
            item = self.items.pop(0)
            self._cond.notify_all()
            return item

    def close(self, cancel_pending_enqueues=False):
        with self._cond:
            self.close_calls.append(cancel_pending_enqueues)
            self._cancelled = cancel_pending_enqueues
            self.closed.set()
            self._cond.notify_all()


def start_thread(target, *args, name=None):
    thread = threading.Thread(target=target, args=args, name=name, daemon=True)
    thread.start()
    return thread


def wait_for(event):
    assert event.wait(WAIT), "event not set in time"


# --------------------------------------------------------------------------- Coordinator


def test_should_stop_is_false_until_a_stop_is_requested():
    coord = Coordinator()
    assert not coord.should_stop()
    coord.request_stop()
    assert coord.should_stop()


def test_wait_for_stop_times_out_without_a_request_and_returns_true_after_one():
    coord = Coordinator()
    assert coord.wait_for_stop(0.01) is False
    thread = start_thread(coord.request_stop)
    assert coord.wait_for_stop(WAIT) is True
    thread.join(WAIT)


def test_join_reraises_the_exception_reported_with_the_stop_request():
    coord = Coordinator()
    error = ValueError("bad shard")
    thread = start_thread(coord.request_stop, error)
    with pytest.raises(ValueError, match="bad shard") as caught:
        coord.join([thread], stop_grace_period_secs=WAIT)
    assert caught.value is error


def test_only_the_first_stop_request_records_its_exception():
    coord = Coordinator()
    coord.request_stop(ValueError("first"))
    coord.request_stop(KeyError("second"))
    with pytest.raises(ValueError, match="first"):
        coord.join()


def test_an_exception_reported_after_a_plain_stop_request_is_ignored():
    coord = Coordinator()
    coord.request_stop()
    coord.request_stop(Cancelled("enqueue cancelled by the stop"))
    coord.join()
    assert coord.joined


def test_clean_stop_exception_types_request_a_stop_that_join_does_not_raise():
    coord = Coordinator(clean_stop_exception_types=(Exhausted,))
    coord.request_stop(Exhausted("no more files"))
    assert coord.should_stop()
    coord.join()


def test_stop_on_exception_reports_and_swallows_an_exception():
    coord = Coordinator()
    with coord.stop_on_exception():
        raise ValueError("reader failed")
    assert coord.should_stop()
    with pytest.raises(ValueError, match="reader failed"):
        coord.join()


def test_stop_on_exception_reports_and_propagates_system_exit():
    coord = Coordinator()
    with pytest.raises(SystemExit):
        with coord.stop_on_exception():
            raise SystemExit(3)
    with pytest.raises(SystemExit):
        coord.join()


def test_stop_on_exception_requests_nothing_when_the_block_succeeds():
    coord = Coordinator()
    with coord.stop_on_exception():
        pass
    assert not coord.should_stop()


def test_join_returns_when_the_threads_end_without_a_stop_request():
    coord = Coordinator()
    release = threading.Event()
    thread = start_thread(release.wait, WAIT)
    coord.register_thread(thread)
    release.set()
    coord.join()
    assert not thread.is_alive()
    assert not coord.should_stop()


def test_join_gives_the_threads_the_grace_period_to_end_after_a_stop():
    coord = Coordinator()
    threads = [start_thread(coord.wait_for_stop, WAIT) for _ in range(3)]
    coord.request_stop()
    coord.join(threads, stop_grace_period_secs=WAIT)
    assert not any(thread.is_alive() for thread in threads)


def test_join_names_the_threads_still_running_after_the_grace_period():
    coord = Coordinator()
    release = threading.Event()
    stuck = start_thread(release.wait, WAIT, name="stuck-reader")
    coord.request_stop()
    try:
        with pytest.raises(RuntimeError, match=r"1 thread\(s\) still running .* stuck-reader"):
            coord.join([stuck], stop_grace_period_secs=0.01)
    finally:
        release.set()
        stuck.join(WAIT)


def test_join_prefers_the_recorded_exception_to_live_threads():
    coord = Coordinator()
    release = threading.Event()
    stuck = start_thread(release.wait, WAIT)
    coord.request_stop(ValueError("root cause"))
    try:
        with pytest.raises(ValueError, match="root cause"):
            coord.join([stuck], stop_grace_period_secs=0.01)
    finally:
        release.set()
        stuck.join(WAIT)


def test_join_with_ignore_live_threads_returns_despite_live_threads():
    coord = Coordinator()
    release = threading.Event()
    stuck = start_thread(release.wait, WAIT)
    coord.request_stop()
    try:
        coord.join([stuck], stop_grace_period_secs=0.01, ignore_live_threads=True)
    finally:
        release.set()
        stuck.join(WAIT)


def test_a_stop_request_with_an_exception_after_join_raises_it_in_the_caller():
    coord = Coordinator()
    coord.request_stop()
    coord.join()
    with pytest.raises(KeyError):
        coord.request_stop(KeyError("late"))


def test_clear_stop_makes_the_coordinator_reusable():
    coord = Coordinator()
    coord.request_stop(ValueError("first run"))
    with pytest.raises(ValueError):
        coord.join()
    coord.clear_stop()
    assert not coord.should_stop() and not coord.joined
    coord.raise_requested_exception()
    coord.request_stop(KeyError("second run"))
    with pytest.raises(KeyError):
        coord.raise_requested_exception()


def test_request_stop_rejects_something_that_is_not_an_exception():
    with pytest.raises(TypeError, match="not str"):
        Coordinator().request_stop("oops")


def test_join_skips_the_calling_thread_when_it_is_registered():
    coord = Coordinator()
    coord.register_thread(threading.current_thread())
    coord.join()


# --------------------------------------------------------------------------- QueueRunner


def test_queue_runner_closes_the_target_once_after_the_last_loop_returns():
    queue = FakeQueue()
    releases = [threading.Event(), threading.Event()]
    runner = QueueRunner(queue, [lambda: releases[0].wait(WAIT), lambda: releases[1].wait(WAIT)])
    coord = Coordinator()
    threads = runner.start(coord)

    releases[0].set()
    threads[0].join(WAIT)
    assert not threads[0].is_alive()
    assert queue.close_calls == []

    releases[1].set()
    runner.join(WAIT)
    assert queue.close_calls == [False]
    coord.join(stop_grace_period_secs=WAIT)


def test_queue_runner_gives_the_coordinator_to_loops_that_take_one_argument():
    seen = []
    runner = QueueRunner(FakeQueue(), [seen.append, lambda: seen.append("no argument")])
    coord = Coordinator()
    runner.start(coord)
    runner.join(WAIT)
    assert sorted(seen, key=str) == sorted([coord, "no argument"], key=str)


def test_consumers_drain_every_item_and_stop_once_the_last_loop_ends():
    queue = FakeQueue(capacity=2)

    def produce(coord, first):
        for item in range(first, first + 50):
            if coord.should_stop():
                return
            queue.enqueue(item)

    runner = QueueRunner(queue, [lambda coord: produce(coord, 0), lambda coord: produce(coord, 100)])
    coord = Coordinator()
    runner.start(coord)
    received = []
    with pytest.raises(Exhausted):
        while True:
            received.append(queue.dequeue())
    runner.join(WAIT)
    coord.join(stop_grace_period_secs=WAIT)
    assert sorted(received) == list(range(50)) + list(range(100, 150))
    assert queue.close_calls == [False]


def test_a_failing_loop_stops_the_coordinator_and_cancels_the_blocked_enqueues():
    queue = FakeQueue(capacity=1)
    queue.enqueue("fills the queue")

    def blocked(coord):
        queue.enqueue("waits for room")  # nobody dequeues: only the cancel frees it

    def failing(coord):
        raise ValueError("corrupt shard")

    runner = QueueRunner(queue, [blocked, failing])
    coord = Coordinator()
    runner.start(coord)
    runner.join(WAIT)
    assert queue.close_calls == [True]
    with pytest.raises(ValueError, match="corrupt shard"):
        coord.join(stop_grace_period_secs=WAIT)


def test_a_stop_request_from_outside_closes_the_target_with_cancel():
    queue = FakeQueue()
    runner = QueueRunner(queue, [lambda coord: queue.closed.wait(WAIT)])
    coord = Coordinator()
    runner.start(coord)
    coord.request_stop()
    runner.join(WAIT)
    assert queue.close_calls == [True]
    coord.join(stop_grace_period_secs=WAIT)


def test_a_stop_requested_before_start_closes_the_target_with_cancel():
    queue = FakeQueue()
    coord = Coordinator()
    coord.request_stop()
    runner = QueueRunner(queue, [lambda coord: None])
    runner.start(coord)
    runner.join(WAIT)
    assert queue.close_calls == [True]


def test_a_loop_ending_with_a_queue_closed_exception_counts_as_finished():
    queue = FakeQueue()

    def out_of_files():
        raise Exhausted("file-name queue is closed and empty")

    runner = QueueRunner(queue, [out_of_files], queue_closed_exception_types=(Exhausted,))
    coord = Coordinator()
    runner.start(coord)
    runner.join(WAIT)
    assert queue.close_calls == [False]
    assert not coord.should_stop()
    coord.join()


def test_a_failing_close_is_reported_to_the_coordinator():
    class BrokenQueue:
        def close(self, cancel_pending_enqueues=False):
            raise Closed("queue 'instances' is already closed")

    runner = QueueRunner(BrokenQueue(), [lambda: None])
    coord = Coordinator()
    runner.start(coord)
    runner.join(WAIT)
    with pytest.raises(Closed, match="already closed"):
        coord.join()


def test_coordinator_join_waits_for_the_loops_and_the_closer():
    queue = FakeQueue()
    release = threading.Event()
    runner = QueueRunner(queue, [lambda: release.wait(WAIT)], name="reader")
    coord = Coordinator()
    threads = runner.start(coord)
    assert [thread.name for thread in threads] == ["reader-0", "reader-close"]
    release.set()
    coord.join(stop_grace_period_secs=WAIT)
    assert not any(thread.is_alive() for thread in threads)
    assert queue.close_calls == [False]


def test_queue_runner_join_times_out_naming_the_running_threads():
    queue = FakeQueue()
    release = threading.Event()
    runner = QueueRunner(queue, [lambda: release.wait(WAIT)], name="slow")
    runner.start(Coordinator())
    try:
        with pytest.raises(TimeoutError, match="slow-0, slow-close"):
            runner.join(0.01)
    finally:
        release.set()
        runner.join(WAIT)


def test_queue_runner_can_start_only_once():
    runner = QueueRunner(FakeQueue(), [lambda: None])
    coord = Coordinator()
    runner.start(coord)
    runner.join(WAIT)
    with pytest.raises(RuntimeError, match="already started"):
        runner.start(coord)


def test_queue_runner_join_before_start_is_an_error():
    with pytest.raises(RuntimeError, match="never started"):
        QueueRunner(FakeQueue(), [lambda: None]).join(WAIT)


def test_queue_runner_rejects_a_loop_that_needs_two_arguments():
    with pytest.raises(TypeError, match="loop 1 .* only argument"):
        QueueRunner(FakeQueue(), [lambda: None, lambda coord, queue: None])


def test_queue_runner_rejects_a_target_without_close():
    with pytest.raises(TypeError, match="no close"):
        QueueRunner(object(), [lambda: None])


def test_queue_runner_needs_at_least_one_loop():
    with pytest.raises(ValueError, match="at least one loop"):
        QueueRunner(FakeQueue(), [])
