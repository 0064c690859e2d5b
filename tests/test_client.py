import asyncio
import hashlib
import multiprocessing
import random
import socket
import threading
import time

import msgpack
import numpy as np
import pytest

import qpipe
from qpipe import wire

WAIT = 10.0  # bound on every wait that should end at once
ALL_TRANSPORTS = pytest.mark.parametrize("transport", ["inproc", "ipc", "tcp"])


# -- helpers ------------------------------------------------------------------------------


def rows(ids):
    """float32 rows [i, i + 0.5], one per id: items for a float32[2] queue."""
    v = np.asarray(ids, np.float32)
    return np.stack([v, v + 0.5], axis=1).reshape(-1, 2)


def i32(v):
    return np.array(v, np.int32)


def poll_for(predicate, what, timeout=WAIT):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen within {timeout} s")
        time.sleep(0.002)


async def apoll_for(predicate, what, timeout=WAIT):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen within {timeout} s")
        await asyncio.sleep(0.002)


def waiting(server, name):
    """(waiting enqueues, waiting dequeues) on the host."""
    st = server.stats()["queues"][name]
    return st["waiting_enqueues"], st["waiting_dequeues"]


def wait_waiting(server, name, enqueues=0, dequeues=0):
    poll_for(lambda: waiting(server, name) == (enqueues, dequeues),
             f"queue {name!r} having {enqueues} waiting enqueues and {dequeues} waiting dequeues")


def free_tcp_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fifo2(client, name="q", capacity=10):
    return client.fifo_queue(name, capacity=capacity, dtypes=["float32"], shapes=[[2]])


# -- every op, every kind -------------------------------------------------------------------


@ALL_TRANSPORTS
def test_every_op_on_a_fifo_queue_works_end_to_end(server, flavour):
    client = flavour.connect(server.address)
    q = fifo2(client)
    assert q.size() == 0 and q.is_closed() is False

    q.enqueue(([0.0, 0.5],))  # a float64 list as the one component, converted losslessly
    q.enqueue(rows([1])[0])
    q.enqueue_many(rows([2, 3, 4, 5, 6]))
    assert q.size() == 7

    first = q.dequeue(timeout=WAIT)
    assert first.dtype == np.float32 and first.shape == (2,)
    np.testing.assert_array_equal(first, [0.0, 0.5])
    np.testing.assert_array_equal(q.dequeue_many(2, timeout=WAIT), rows([1, 2]))
    np.testing.assert_array_equal(q.dequeue_up_to(2, timeout=WAIT), rows([3, 4]))
    empty = q.dequeue_many(0, timeout=WAIT)
    assert empty.shape == (0, 2) and empty.dtype == np.float32
    assert q.size() == 2

    q.close()
    assert q.is_closed() is True
    with pytest.raises(qpipe.QueueClosedError):
        q.enqueue(rows([9])[0], timeout=WAIT)
    np.testing.assert_array_equal(q.dequeue_up_to(5, timeout=WAIT), rows([5, 6]))
    with pytest.raises(qpipe.OutOfRangeError):
        q.dequeue(timeout=WAIT)
    with pytest.raises(qpipe.OutOfRangeError):
        q.dequeue_up_to(1, timeout=WAIT)
    assert q.size() == 0


def test_every_op_on_a_shuffle_queue_works_end_to_end_and_keeps_min_after_dequeue(server, flavour):
    client = flavour.connect(server.address)
    s = client.shuffle_queue("s", capacity=50, min_after_dequeue=10, dtypes=["float32", "int32"],
                             shapes=[[2], []], seed=42)
    ids = np.arange(30, dtype=np.int32)
    s.enqueue_many((rows(ids), ids))
    s.enqueue((rows([30])[0], i32(30)))
    assert s.size() == 31

    got = []
    x, i = s.dequeue(timeout=WAIT)
    assert x.shape == (2,) and i.shape == () and i.dtype == np.int32
    np.testing.assert_array_equal(x, rows([i])[0])
    got.append(int(i))
    xs, is_ = s.dequeue_many(15, timeout=WAIT)
    assert xs.shape == (15, 2) and is_.shape == (15,)
    np.testing.assert_array_equal(xs, rows(is_))
    got += is_.tolist()
    assert s.size() == 15

    with pytest.raises(qpipe.DeadlineExceededError):
        s.dequeue_many(6, timeout=0.2)  # would leave fewer than min_after_dequeue
    assert s.size() == 15
    got += s.dequeue_up_to(5, timeout=WAIT)[1].tolist()
    with pytest.raises(qpipe.DeadlineExceededError):
        s.dequeue(timeout=0.1)
    assert s.size() == 10

    s.close()  # now the limit no longer applies
    xs, is_ = s.dequeue_up_to(50, timeout=WAIT)
    np.testing.assert_array_equal(xs, rows(is_))
    got += is_.tolist()
    assert sorted(got) == list(range(31))
    assert got != sorted(got)
    with pytest.raises(qpipe.OutOfRangeError):
        s.dequeue(timeout=WAIT)


def test_every_op_on_a_padding_queue_works_end_to_end_and_pads_batches_with_zeros(server, flavour):
    client = flavour.connect(server.address)
    p = client.padding_queue("p", capacity=50, dtypes=["float32", "int32"], shapes=[[None, None], [None]])
    a = (np.full((1, 2), 1, np.float32), np.arange(1, dtype=np.int32) + 10)
    b = (np.full((3, 1), 2, np.float32), np.arange(3, dtype=np.int32) + 20)
    c = (np.full((2, 2), 3, np.float32), np.arange(2, dtype=np.int32) + 30)
    d = (np.full((1, 1), 4, np.float32), np.arange(0, dtype=np.int32))
    for item in (a, b, c, d):
        p.enqueue(item)
    p.enqueue_many((np.full((2, 2, 3), 5, np.float32), np.full((2, 4), 50, np.int32)))
    assert p.size() == 6

    x, y = p.dequeue(timeout=WAIT)  # a single item is not padded
    np.testing.assert_array_equal(x, a[0])
    np.testing.assert_array_equal(y, a[1])

    xs, ys = p.dequeue_many(2, timeout=WAIT)
    want_x = np.zeros((2, 3, 2), np.float32)
    want_x[0, :3, :1] = 2
    want_x[1, :2, :2] = 3
    np.testing.assert_array_equal(xs, want_x)
    np.testing.assert_array_equal(ys, [[20, 21, 22], [30, 31, 0]])

    p.close()
    xs, ys = p.dequeue_up_to(10, timeout=WAIT)
    want_x = np.zeros((3, 2, 3), np.float32)
    want_x[0, :1, :1] = 4
    want_x[1:] = 5
    np.testing.assert_array_equal(xs, want_x)
    np.testing.assert_array_equal(ys, [[0, 0, 0, 0], [50] * 4, [50] * 4])
    with pytest.raises(qpipe.OutOfRangeError):
        p.dequeue_many(1, timeout=WAIT)


def test_declaring_a_queue_again_with_the_same_spec_joins_the_same_queue(server, flavour):
    one = flavour.connect(server.address)
    two = flavour.connect(server.address)
    decls = [
        lambda c: c.fifo_queue("f", capacity=10, dtypes=["float32"], shapes=[[2]]),
        lambda c: c.shuffle_queue("s", capacity=50, min_after_dequeue=10, dtypes=["float32", "int32"],
                                  shapes=[[2], []], seed=42),
        lambda c: c.padding_queue("p", capacity=50, dtypes=["float32"], shapes=[[None, None]]),
    ]
    for declare in decls:
        a, b, again = declare(one), declare(two), declare(one)
        assert a.spec == b.spec == again.spec
    f1, f2 = decls[0](one), decls[0](two)
    f1.enqueue(rows([1])[0])
    np.testing.assert_array_equal(f2.dequeue(timeout=WAIT), rows([1])[0])
    assert sorted(server.stats()["queues"]) == ["f", "p", "s"]


def test_declaring_a_queue_again_with_another_spec_raises_invalid_argument_and_leaves_it_alone(server, flavour):
    client = flavour.connect(server.address)
    q = fifo2(client)
    s = client.shuffle_queue("s", capacity=50, min_after_dequeue=10, dtypes=["float32"], shapes=[[2]], seed=42)
    p = client.padding_queue("p", capacity=50, dtypes=["float32"], shapes=[[None, None]])
    q.enqueue(rows([1])[0])
    others = [
        lambda: client.fifo_queue("q", capacity=11, dtypes=["float32"], shapes=[[2]]),
        lambda: client.fifo_queue("q", capacity=10, dtypes=["float64"], shapes=[[2]]),
        lambda: client.fifo_queue("q", capacity=10, dtypes=["float32"], shapes=[[3]]),
        lambda: client.fifo_queue("q", capacity=10, dtypes=["float32", "int32"], shapes=[[2], []]),
        lambda: client.padding_queue("q", capacity=10, dtypes=["float32"], shapes=[[2]]),
        lambda: client.shuffle_queue("s", capacity=50, min_after_dequeue=10, dtypes=["float32"], shapes=[[2]],
                                     seed=43),
        lambda: client.shuffle_queue("s", capacity=50, min_after_dequeue=11, dtypes=["float32"], shapes=[[2]],
                                     seed=42),
        lambda: client.fifo_queue("s", capacity=50, dtypes=["float32"], shapes=[[2]]),
        lambda: client.padding_queue("p", capacity=50, dtypes=["float32"], shapes=[[None, 3]]),
    ]
    for i, declare in enumerate(others):
        with pytest.raises(qpipe.InvalidArgumentError) as ei:
            declare()
        assert isinstance(ei.value, ValueError), i
        assert "already exists" in str(ei.value), str(ei.value)
    assert client.queue("q").spec == q.spec
    assert client.queue("s").spec == s.spec
    assert client.queue("p").spec == p.spec
    assert q.size() == 1


def test_client_queue_fetches_the_spec_of_an_existing_queue_of_every_kind(server, flavour):
    client = flavour.connect(server.address)
    other = flavour.connect(server.address)
    declared = [
        fifo2(client, "f"),
        client.shuffle_queue("s", capacity=50, min_after_dequeue=0, dtypes=["float32"], shapes=[[2]], seed=1),
        client.padding_queue("p", capacity=50, dtypes=["float32"], shapes=[[None, 2]]),
    ]
    for q in declared:
        h = other.queue(q.name)
        assert h.spec == q.spec and h.name == q.name
        assert h.dtypes == ("float32",)
        item = rows([7]) if q.spec.kind == "padding" else rows([7])[0]
        h.enqueue(item)
        np.testing.assert_array_equal(q.dequeue(timeout=WAIT), item)
    assert sorted(client.list_queues()) == ["f", "p", "s"]


def test_an_unknown_queue_raises_not_found_naming_it(server, flavour):
    client = flavour.connect(server.address)
    fifo2(client, "known")
    with pytest.raises(qpipe.NotFoundError) as ei:
        client.queue("nope")
    assert isinstance(ei.value, qpipe.QueueError) and isinstance(ei.value, LookupError)
    assert "'nope'" in str(ei.value) and "known" in str(ei.value)


# -- blocking -------------------------------------------------------------------------------


def test_a_dequeue_on_an_empty_queue_blocks_until_an_item_arrives(server, flavour):
    client = flavour.connect(server.address)
    q = fifo2(client)
    fut = flavour.start(q.dequeue, timeout=WAIT)
    wait_waiting(server, "q", dequeues=1)
    assert not fut.done()
    q.enqueue(rows([7])[0])
    np.testing.assert_array_equal(fut.result(WAIT), rows([7])[0])
    assert q.size() == 0 and waiting(server, "q") == (0, 0)


def test_an_enqueue_on_a_full_queue_blocks_until_a_dequeue_makes_room(server, flavour):
    client = flavour.connect(server.address)
    q = fifo2(client, capacity=2)
    q.enqueue_many(rows([0, 1]))
    fut = flavour.start(q.enqueue, rows([2])[0], timeout=WAIT)
    wait_waiting(server, "q", enqueues=1)
    assert not fut.done()
    assert q.size() == 2
    np.testing.assert_array_equal(q.dequeue(timeout=WAIT), rows([0])[0])
    assert fut.result(WAIT) is None
    np.testing.assert_array_equal(q.dequeue_many(2, timeout=WAIT), rows([1, 2]))


def test_dequeue_many_waits_for_n_items_and_n_may_exceed_the_capacity(server, flavour):
    client = flavour.connect(server.address)
    q = fifo2(client, capacity=3)
    fut = flavour.start(q.dequeue_many, 7, timeout=WAIT)
    wait_waiting(server, "q", dequeues=1)
    q.enqueue_many(rows([0, 1, 2]))
    assert q.size() == 0  # the waiting dequeue holds them
    assert not fut.done()
    q.enqueue_many(rows([3, 4, 5, 6]))
    np.testing.assert_array_equal(fut.result(WAIT), rows(range(7)))


def test_enqueue_many_larger_than_the_capacity_completes_as_consumers_make_room(server, flavour):
    client = flavour.connect(server.address)
    q = fifo2(client, capacity=3)
    fut = flavour.start(q.enqueue_many, rows(range(8)), timeout=WAIT)
    wait_waiting(server, "q", enqueues=1)
    assert q.size() == 3 and not fut.done()
    np.testing.assert_array_equal(q.dequeue_many(8, timeout=WAIT), rows(range(8)))
    assert fut.result(WAIT) is None


def test_blocked_dequeues_are_served_in_arrival_order(server, flavour):
    client = flavour.connect(server.address)
    q = fifo2(client)
    futs = []
    for k in range(3):
        futs.append(flavour.start(q.dequeue, timeout=WAIT))
        wait_waiting(server, "q", dequeues=k + 1)
    q.enqueue_many(rows([0, 1, 2]))
    for k, fut in enumerate(futs):
        np.testing.assert_array_equal(fut.result(WAIT), rows([k])[0])


# -- timeouts -------------------------------------------------------------------------------


def test_a_dequeue_on_an_empty_queue_times_out_after_about_its_timeout_and_changes_nothing(server, flavour):
    client = flavour.connect(server.address)
    q = fifo2(client)
    t0 = time.monotonic()
    with pytest.raises(qpipe.DeadlineExceededError) as ei:
        q.dequeue(timeout=0.3)
    elapsed = time.monotonic() - t0
    assert 0.25 <= elapsed < 1.3, elapsed
    assert isinstance(ei.value, TimeoutError)
    assert not isinstance(ei.value, qpipe.UnavailableError)  # the host answered
    assert "'q'" in str(ei.value)
    assert q.size() == 0 and waiting(server, "q") == (0, 0)
    q.enqueue(rows([1])[0])
    np.testing.assert_array_equal(q.dequeue(timeout=WAIT), rows([1])[0])


def test_a_timed_out_dequeue_many_leaves_the_rows_it_had_collected_in_the_queue_in_order(server, flavour):
    client = flavour.connect(server.address)
    q = fifo2(client)
    q.enqueue_many(rows([0, 1]))
    with pytest.raises(qpipe.DeadlineExceededError):
        q.dequeue_many(3, timeout=0.1)
    assert q.size() == 2

    fut = flavour.start(q.dequeue_many, 5, timeout=1.0)
    wait_waiting(server, "q", dequeues=1)
    q.enqueue(rows([2])[0])
    assert server.stats()["queues"]["q"]["size"] == 0  # held by the waiting dequeue_many
    with pytest.raises(qpipe.DeadlineExceededError):
        fut.result(WAIT)
    assert q.size() == 3
    q.enqueue(rows([3])[0])
    np.testing.assert_array_equal(q.dequeue_many(4, timeout=WAIT), rows([0, 1, 2, 3]))
    st = server.stats()["queues"]["q"]
    assert st["enqueued"] == st["dequeued"] == 4


def test_an_enqueue_on_a_full_queue_times_out_and_changes_nothing(server, flavour):
    client = flavour.connect(server.address)
    q = fifo2(client, capacity=2)
    q.enqueue_many(rows([0, 1]))
    t0 = time.monotonic()
    with pytest.raises(qpipe.DeadlineExceededError):
        q.enqueue(rows([9])[0], timeout=0.3)
    assert 0.25 <= time.monotonic() - t0 < 1.3
    assert q.size() == 2 and waiting(server, "q") == (0, 0)
    np.testing.assert_array_equal(q.dequeue_many(2, timeout=WAIT), rows([0, 1]))
    assert q.size() == 0


def test_a_timed_out_enqueue_many_keeps_the_rows_it_inserted_and_says_how_many(server, flavour):
    client = flavour.connect(server.address)
    q = fifo2(client, capacity=2)
    q.enqueue(rows([0])[0])
    with pytest.raises(qpipe.DeadlineExceededError) as ei:
        q.enqueue_many(rows([1, 2, 3, 4]), timeout=0.2)
    assert "1 of 4" in str(ei.value)
    np.testing.assert_array_equal(q.dequeue_up_to(2, timeout=WAIT), rows([0, 1]))
    assert q.size() == 0


def test_timeout_zero_fails_at_once_when_a_call_would_block_and_succeeds_when_it_would_not(server, flavour):
    client = flavour.connect(server.address)
    q = fifo2(client, capacity=2)
    for call in (lambda: q.dequeue(timeout=0), lambda: q.dequeue_many(1, timeout=0)):
        t0 = time.monotonic()
        with pytest.raises(qpipe.DeadlineExceededError):
            call()
        assert time.monotonic() - t0 < 0.5
    q.enqueue(rows([0])[0], timeout=0)
    q.enqueue(rows([1])[0], timeout=0)
    with pytest.raises(qpipe.DeadlineExceededError):
        q.enqueue(rows([2])[0], timeout=0)
    with pytest.raises(qpipe.DeadlineExceededError):
        q.dequeue_many(3, timeout=0)
    with pytest.raises(qpipe.DeadlineExceededError):
        q.dequeue_up_to(3, timeout=0)  # an open queue: waits for n like dequeue_many
    assert q.size() == 2 and waiting(server, "q") == (0, 0)
    np.testing.assert_array_equal(q.dequeue(timeout=0), rows([0])[0])
    np.testing.assert_array_equal(q.dequeue_many(1, timeout=0), rows([1]))


def test_a_clients_default_timeout_applies_to_calls_that_pass_none_of_their_own(server, flavour):
    client = flavour.connect(server.address, timeout=0.2)
    q = fifo2(client)
    with pytest.raises(qpipe.DeadlineExceededError):
        q.dequeue()
    with pytest.raises(ValueError):
        q.dequeue(timeout=-1)


# -- close and cancel -----------------------------------------------------------------------


def test_close_wakes_every_waiting_dequeue_with_out_of_range(server, flavour):
    client = flavour.connect(server.address)
    q = fifo2(client)
    futs = [flavour.start(q.dequeue, timeout=WAIT)]
    wait_waiting(server, "q", dequeues=1)
    futs.append(flavour.start(q.dequeue_many, 2, timeout=WAIT))
    wait_waiting(server, "q", dequeues=2)
    q.close()
    for fut in futs:
        with pytest.raises(qpipe.OutOfRangeError):
            fut.result(WAIT)


def test_close_fails_a_waiting_dequeue_many_and_returns_its_rows_while_dequeue_up_to_gets_them(server, flavour):
    client = flavour.connect(server.address)
    q = fifo2(client)
    many = flavour.start(q.dequeue_many, 3, timeout=WAIT)
    wait_waiting(server, "q", dequeues=1)
    q.enqueue_many(rows([0, 1]))
    q.close()
    with pytest.raises(qpipe.OutOfRangeError):
        many.result(WAIT)
    assert q.size() == 2
    with pytest.raises(qpipe.OutOfRangeError):
        q.dequeue_many(3, timeout=WAIT)
    assert q.size() == 2

    up_to_q = fifo2(client, "u")
    up_to = flavour.start(up_to_q.dequeue_up_to, 3, timeout=WAIT)
    wait_waiting(server, "u", dequeues=1)
    up_to_q.enqueue_many(rows([5, 6]))
    assert not up_to.done()
    up_to_q.close()
    np.testing.assert_array_equal(up_to.result(WAIT), rows([5, 6]))

    np.testing.assert_array_equal(q.dequeue_up_to(3, timeout=WAIT), rows([0, 1]))
    with pytest.raises(qpipe.OutOfRangeError):
        q.dequeue_up_to(3, timeout=WAIT)


def test_close_with_cancel_fails_waiting_enqueues_with_queue_closed_and_keeps_the_rows_they_inserted(server, flavour):
    client = flavour.connect(server.address)
    q = fifo2(client, capacity=3)
    q.enqueue_many(rows([0, 1]))
    many = flavour.start(q.enqueue_many, rows([2, 3, 4]), timeout=WAIT)
    wait_waiting(server, "q", enqueues=1)
    one = flavour.start(q.enqueue, rows([5])[0], timeout=WAIT)
    wait_waiting(server, "q", enqueues=2)
    q.close(cancel_pending_enqueues=True)
    with pytest.raises(qpipe.QueueClosedError) as ei:
        many.result(WAIT)
    assert "1 of 3" in str(ei.value)
    with pytest.raises(qpipe.QueueClosedError):
        one.result(WAIT)
    assert q.size() == 3
    np.testing.assert_array_equal(q.dequeue_up_to(10, timeout=WAIT), rows([0, 1, 2]))
    with pytest.raises(qpipe.OutOfRangeError):
        q.dequeue(timeout=WAIT)


def test_close_without_cancel_still_honours_waiting_enqueues_and_refuses_new_ones(server, flavour):
    client = flavour.connect(server.address)
    q = fifo2(client, capacity=2)
    q.enqueue_many(rows([0, 1]))
    fut = flavour.start(q.enqueue, rows([2])[0], timeout=WAIT)
    wait_waiting(server, "q", enqueues=1)
    q.close()
    assert not fut.done() and waiting(server, "q") == (1, 0)
    with pytest.raises(qpipe.QueueClosedError):
        q.enqueue(rows([9])[0], timeout=WAIT)
    with pytest.raises(qpipe.QueueClosedError):
        q.close()  # already closed
    np.testing.assert_array_equal(q.dequeue(timeout=WAIT), rows([0])[0])
    assert fut.result(WAIT) is None
    np.testing.assert_array_equal(q.dequeue_many(2, timeout=WAIT), rows([1, 2]))
    with pytest.raises(qpipe.OutOfRangeError):
        q.dequeue(timeout=WAIT)
    q.close(cancel_pending_enqueues=True)  # allowed on a closed queue
    assert q.is_closed()


# -- bad input --------------------------------------------------------------------------------


def test_a_wrong_arity_dtype_or_shape_raises_invalid_argument_before_anything_is_sent(server, flavour):
    client = flavour.connect(server.address)
    q = client.fifo_queue("q", capacity=10, dtypes=["float32", "int32"], shapes=[[2], []])
    q.enqueue_many((rows([0]), i32([0])))
    x = np.zeros(2, np.float32)
    bad = {
        "a float into int32": lambda: q.enqueue((x, np.array(1.5))),
        "an integral float into int32": lambda: q.enqueue((x, np.array(2.0))),
        "an int64 that does not fit int32": lambda: q.enqueue((x, np.array(2**40))),
        "a float batch into int32": lambda: q.enqueue_many((rows([0]), np.array([1.0]))),
        "strings into float32": lambda: q.enqueue((np.array(["a", "b"]), i32(1))),
        "three components": lambda: q.enqueue((x, i32(1), i32(2))),
        "one component": lambda: q.enqueue((x,)),
        "a bare array": lambda: q.enqueue(x),
        "shape [3]": lambda: q.enqueue((np.zeros(3, np.float32), i32(1))),
        "rank 2": lambda: q.enqueue((np.zeros((1, 2), np.float32), i32(1))),
        "a vector where a scalar goes": lambda: q.enqueue((x, i32([1, 2]))),
        "batch sizes that disagree": lambda: q.enqueue_many((rows([0, 1]), i32([1]))),
        "a batch of the wrong row shape": lambda: q.enqueue_many((np.zeros((2, 3), np.float32), i32([1, 2]))),
        "a float overflowing float32": lambda: q.enqueue((np.array([1e300, 0.0]), i32(1))),
    }
    before = server.stats()["requests"]
    for what, call in bad.items():
        with pytest.raises(qpipe.InvalidArgumentError) as ei:
            call()
        assert isinstance(ei.value, ValueError), what
        assert "'q'" in str(ei.value), (what, str(ei.value))
    assert q.size() == 1  # one round trip: whatever was sent before it has been handled
    assert server.stats()["requests"] == before + 1
    got = q.dequeue(timeout=WAIT)
    np.testing.assert_array_equal(got[0], rows([0])[0])
    assert got[1] == 0


def test_python_and_numpy_scalars_are_accepted_for_scalar_components(server):
    with qpipe.connect(server.address) as client:
        q = client.fifo_queue("q", capacity=10, dtypes=["float32", "int32"], shapes=[[2], []])
        q.enqueue(([1.0, 2.0], 7))
        q.enqueue(([1.0, 2.0], np.int32(8)))
        assert [int(q.dequeue(timeout=WAIT)[1]) for _ in range(2)] == [7, 8]


def test_enqueue_many_refuses_a_scalar_that_has_no_batch_dimension(server):
    with qpipe.connect(server.address) as client:
        q = client.fifo_queue("q", capacity=10, dtypes=["int64"], shapes=[[]])
        try:
            with pytest.raises(qpipe.InvalidArgumentError):
                q.enqueue_many(5)
        finally:
            assert q.size() == 0


# -- raw frames from a peer that is not a qpipe client --------------------------------------


def _h(**fields):
    return msgpack.packb(fields, use_bin_type=True)


GARBAGE = {
    "random bytes": ([b"\xc1" + random.Random(1).randbytes(200)], 9, None),
    "an empty frame": ([b""], 9, None),
    "a msgpack list": ([msgpack.packb([1, 2, 3])], 9, None),
    "a msgpack map with integer keys": ([msgpack.packb({1: 2})], 9, None),
    "an unknown op": ([_h(op="explode", id=5)], 9, 5),
    "no op": ([_h(id=6, queue="q")], 9, 6),
    "an op that is not a string": ([_h(op=3, id=6, queue="q")], 9, 6),
    "a header whose array does not match its frame": (
        [_h(op="enqueue", id=7, queue="q", arrays=[["<f4", [2]]]), b"\0" * 12], 9, 7),
    "more data frames than arrays": (
        [_h(op="enqueue", id=8, queue="q", arrays=[["<f4", [2]]]), b"\0" * 8, b"\0" * 8], 9, 8),
    "fewer data frames than arrays": (
        [_h(op="enqueue", id=9, queue="q", arrays=[["<f4", [2]], ["<f4", [2]]]), b"\0" * 8], 9, 9),
    "data frames and no arrays": ([_h(op="enqueue", id=10, queue="q"), b"\0" * 8], 9, 10),
    "arrays that are not a list": ([_h(op="enqueue", id=11, queue="q", arrays="x")], 9, 11),
    "an object dtype": ([_h(op="enqueue", id=12, queue="q", arrays=[["|O", [1]]]), b"\0" * 8], 9, 12),
    "a dtype that is no dtype": ([_h(op="enqueue", id=13, queue="q", arrays=[["nonsense", [2]]]), b"\0" * 8],
                                 9, 13),
    "a negative dimension": ([_h(op="enqueue", id=14, queue="q", arrays=[["<f4", [-2]]]), b""], 9, 14),
    "string lengths that do not add up": (
        [_h(op="enqueue", id=15, queue="q", arrays=[["string", [2], [1, 1]]]), b"abc"], 9, 15),
    "a queue name that is not a string": ([_h(op="size", id=16, queue=5)], 9, 16),
    "the wrong dtype for the queue": (
        [_h(op="enqueue", id=17, queue="q", arrays=[["<f8", [2]]]), b"\0" * 16], 5, 17),
    "the wrong shape for the queue": (
        [_h(op="enqueue", id=18, queue="q", arrays=[["<f4", [3]]]), b"\0" * 12], 5, 18),
    "two components for a one-component queue": (
        [_h(op="enqueue", id=19, queue="q", arrays=[["<f4", [2]], ["<f4", [2]]]), b"\0" * 8, b"\0" * 8], 5, 19),
    "enqueue_many without a batch dimension": (
        [_h(op="enqueue_many", id=20, queue="q", arrays=[["<f4", []]]), b"\0" * 4], 5, 20),
    "a NaN timeout": ([_h(op="dequeue", id=21, queue="q", timeout=float("nan"))], 5, 21),
    "a timeout that is a string": ([_h(op="dequeue", id=22, queue="q", timeout="soon")], 5, 22),
    "an n that is a string": ([_h(op="dequeue_many", id=23, queue="q", n="3")], 5, 23),
    "a negative n": ([_h(op="dequeue_many", id=24, queue="q", n=-1, timeout=0)], 5, 24),
    "an unknown queue": ([_h(op="dequeue", id=25, queue="nope", timeout=0)], 7, 25),
    "a declaration without a spec": ([_h(op="declare", id=26, queue="new")], 5, 26),
    "a declaration with capacity 0": (
        [_h(op="declare", id=27, queue="new", spec={"kind": "fifo", "capacity": 0, "dtypes": ["float32"]})], 5, 27),
    "a spec with unknown keys": (
        [_h(op="declare", id=28, queue="new",
            spec={"kind": "fifo", "capacity": 1, "dtypes": ["float32"], "evil": 1})], 5, 28),
    "a redeclaration with another spec": (
        [_h(op="declare", id=29, queue="q", spec={"kind": "fifo", "capacity": 3, "dtypes": ["float32"],
                                                 "shapes": [[2]]})], 5, 29),
    "put_back rows of the wrong dtype": (
        [_h(op="put_back", id=30, queue="q", arrays=[["<i4", [1, 2]]]), b"\0" * 8], 5, 30),
}


@pytest.mark.parametrize("case", list(GARBAGE))
def test_the_host_answers_a_malformed_request_with_an_error_reply_and_keeps_serving(server, raw_dealer, case):
    frames, code, req_id = GARBAGE[case]
    with qpipe.connect(server.address) as client:
        q = fifo2(client)
        q.enqueue_many(rows([0, 1, 2]))
        bad_before = server.stats()["bad_requests"]

        raw = raw_dealer(server.address)
        raw.send_multipart(frames)
        assert raw.poll(int(WAIT * 1000)), "no reply to a malformed request"
        header, arrays = wire.decode(raw.recv_multipart())
        assert header.get("error") == code, header
        assert qpipe.errors.error_from_code(header["error"], header["message"]).__class__ is qpipe.errors.CODES[code]
        assert header["id"] == req_id and header["message"]
        assert arrays == []
        if case != "a negative n":  # NOTE: the host answers it from the queue, uncounted
            assert server.stats()["bad_requests"] == bad_before + 1

        raw.send_multipart(wire.encode({"op": "ping", "id": 99}))
        assert raw.poll(int(WAIT * 1000)), "the host stopped answering this peer"
        assert wire.decode(raw.recv_multipart())[0]["ok"] is True

        assert q.size() == 3
        np.testing.assert_array_equal(q.dequeue_many(3, timeout=WAIT), rows([0, 1, 2]))
        assert sorted(server.stats()["queues"]) == ["q"]


def test_a_cancel_for_a_request_that_is_not_waiting_is_answered_and_changes_nothing(server, raw_dealer):
    with qpipe.connect(server.address) as client:
        q = fifo2(client)
        q.enqueue(rows([0])[0])
        raw = raw_dealer(server.address)
        raw.send_multipart(wire.encode({"op": "cancel", "id": 1, "target": 12345}))
        assert raw.poll(int(WAIT * 1000))
        header, _ = wire.decode(raw.recv_multipart())
        assert header == {"id": 1, "ok": True, "cancelled": False}
        np.testing.assert_array_equal(q.dequeue(timeout=WAIT), rows([0])[0])


def test_the_host_refuses_put_back_rows_whose_shape_does_not_fit_the_queue(server, raw_dealer):
    with qpipe.connect(server.address) as client:
        q = fifo2(client)
        raw = raw_dealer(server.address)
        raw.send_multipart(wire.encode({"op": "put_back", "id": 1, "queue": "q"}, [np.ones((1, 5), np.float32)]))
        assert raw.poll(int(WAIT * 1000))
        header, _ = wire.decode(raw.recv_multipart())
        assert q.size() == 0, f"a [5] row went into a float32[2] queue; the host answered {header}"
        assert header.get("error") == qpipe.InvalidArgumentError.code, header


def test_a_request_with_an_unhashable_id_is_refused_and_leaves_nothing_waiting(server, raw_dealer):
    with qpipe.connect(server.address) as client:
        q = fifo2(client)
        raw = raw_dealer(server.address)
        raw.send_multipart([msgpack.packb({"op": "dequeue", "id": [1], "queue": "q", "timeout": None})])
        assert raw.poll(int(WAIT * 1000))
        header, _ = wire.decode(raw.recv_multipart())
        assert waiting(server, "q") == (0, 0), f"a ghost dequeue waits; the host answered {header}"
        q.enqueue(rows([1])[0])
        np.testing.assert_array_equal(q.dequeue(timeout=WAIT), rows([1])[0])
        assert header.get("error") in (qpipe.ProtocolError.code, qpipe.InvalidArgumentError.code), header


# -- message size ---------------------------------------------------------------------------


def test_an_item_larger_than_the_hosts_max_message_size_raises_message_too_large_and_the_host_keeps_serving(
        make_server, flavour):
    server = make_server("tcp", max_message_size=64 << 10)
    client = flavour.connect(server.address)
    q = client.fifo_queue("q", capacity=10, dtypes=["uint8"], shapes=[[None]])
    small = np.arange(100, dtype=np.uint8)
    q.enqueue(small)
    with pytest.raises(qpipe.MessageTooLargeError) as ei:
        q.enqueue(np.zeros(100 << 10, np.uint8))
    assert isinstance(ei.value, qpipe.InvalidArgumentError)
    assert str(64 << 10) in str(ei.value)
    with pytest.raises(qpipe.MessageTooLargeError):
        q.enqueue_many(np.zeros((2, 40 << 10), np.uint8))
    q.enqueue(np.ones(1000, np.uint8))
    assert q.size() == 2
    np.testing.assert_array_equal(q.dequeue(timeout=WAIT), small)
    np.testing.assert_array_equal(q.dequeue(timeout=WAIT), np.ones(1000, np.uint8))


def test_the_host_refuses_an_oversized_request_from_any_peer_and_keeps_serving(make_server, raw_dealer):
    server = make_server("tcp", max_message_size=64 << 10)
    with qpipe.connect(server.address) as client:
        q = client.fifo_queue("q", capacity=10, dtypes=["uint8"], shapes=[[None]])
        q.enqueue(np.arange(10, dtype=np.uint8))
        raw = raw_dealer(server.address)
        # Under ZeroMQ's cap (twice the limit): the host answers with the error.
        raw.send_multipart(wire.encode({"op": "enqueue", "id": 1, "queue": "q"}, [np.zeros(100 << 10, np.uint8)]))
        assert raw.poll(int(WAIT * 1000))
        header, _ = wire.decode(raw.recv_multipart())
        assert header["error"] == qpipe.MessageTooLargeError.code and header["id"] == 1
        # Over ZeroMQ's cap: the connection is dropped; the host goes on serving everyone else.
        huge = raw_dealer(server.address)
        huge.send_multipart(wire.encode({"op": "enqueue", "id": 1, "queue": "q"}, [np.zeros(200 << 10, np.uint8)]))
        assert client.ping(timeout=WAIT) >= 0
        assert q.size() == 1
        np.testing.assert_array_equal(q.dequeue(timeout=WAIT), np.arange(10, dtype=np.uint8))
        assert server.stats()["queues"]["q"]["enqueued"] == 1


def test_a_64_mib_item_round_trips_intact(server, flavour):
    assert server.max_message_size >= (64 << 20) + 4096
    client = flavour.connect(server.address)
    q = client.fifo_queue("big", capacity=2, dtypes=["uint8"], shapes=[[64 << 20]])
    item = np.random.default_rng(0).integers(0, 256, 64 << 20, dtype=np.uint8)
    digest = hashlib.sha256(item).hexdigest()
    q.enqueue(item, timeout=WAIT)
    got = q.dequeue(timeout=WAIT)
    assert got.shape == item.shape and got.dtype == np.uint8
    assert hashlib.sha256(got).hexdigest() == digest


@pytest.mark.parametrize("transport", [
    pytest.param("inproc"),
    "ipc", "tcp"])
def test_a_queued_item_is_independent_of_the_producers_and_the_consumers_arrays(server, flavour):
    client = flavour.connect(server.address)
    q = client.fifo_queue("q", capacity=10, dtypes=["float32"], shapes=[[None]])
    buf = np.zeros(100_000, np.float32)  # above the client's zero-copy threshold
    q.enqueue(buf)
    q.enqueue_many(buf[None, :])
    buf[:] = 7  # a producer refilling its buffer for the next item
    first = q.dequeue(timeout=WAIT)
    second = q.dequeue(timeout=WAIT)
    assert first.max() == 0 and second.max() == 0, "the queued items changed with the producer's array"
    buf[:] = 0
    if second.flags.writeable:
        second[:] = 5
    assert buf.max() == 0, "the consumer's array is the producer's memory"


def test_an_item_too_large_for_the_dequeuing_client_stays_in_the_queue(server, run_async):
    with qpipe.connect(server.address) as producer:
        q = producer.fifo_queue("big", capacity=2, dtypes=["uint8"], shapes=[[None]])
        q.enqueue(np.ones(1 << 20, np.uint8))

        async def main():
            async with await qpipe.aconnect(server.address, max_message_size=64 << 10) as small:
                sq = await small.queue("big")
                with pytest.raises(qpipe.QueueError) as ei:
                    await sq.dequeue(timeout=1)
                return ei.value

        error = run_async(main)
        assert q.size() == 1, f"the item is gone; the dequeue raised {error!r}"
        assert isinstance(error, qpipe.MessageTooLargeError)


def _dequeue_too_large(address, started):
    with qpipe.connect(address, max_message_size=64 << 10) as client:
        q = client.queue("big", timeout=WAIT)
        started.set()
        try:
            q.dequeue(timeout=1)
        except qpipe.QueueError:
            pass


def test_a_sync_dequeue_of_an_item_too_large_for_the_client_returns_within_its_timeout(server, processes):
    with qpipe.connect(server.address) as producer:
        q = producer.fifo_queue("big", capacity=2, dtypes=["uint8"], shapes=[[None]])
        q.enqueue(np.ones(1 << 20, np.uint8))
    ctx = multiprocessing.get_context("spawn")
    started = ctx.Event()
    p = ctx.Process(target=_dequeue_too_large, args=(server.address, started), daemon=True)
    processes.append(p)
    p.start()
    assert started.wait(30), "the child did not start"
    p.join(1 + 2.0)
    assert p.exitcode == 0, "dequeue(timeout=1) did not return within 3 s"


# -- a host that is not there, or goes away -------------------------------------------------


def test_calls_with_a_timeout_to_a_host_that_is_not_there_raise_no_reply_within_the_timeout_and_a_grace(flavour):
    address = f"tcp://127.0.0.1:{free_tcp_port()}"
    client = flavour.connect(address)
    spec = qpipe.QueueSpec.make("fifo", 10, ["float32"], [[2]])
    q = flavour.queue_handle(client, "q", spec)
    t0 = time.monotonic()
    futs = [
        flavour.start(q.dequeue, timeout=1),
        flavour.start(q.enqueue, rows([0])[0], timeout=1),
        flavour.start(client.fifo_queue, "q", capacity=10, dtypes=["float32"], shapes=[[2]], timeout=1),
    ]
    for fut in futs:
        with pytest.raises(qpipe.NoReplyError) as ei:
            fut.result(WAIT)
        elapsed = time.monotonic() - t0
        assert 0.95 <= elapsed < 1.6, elapsed
        e = ei.value
        assert isinstance(e, qpipe.DeadlineExceededError) and isinstance(e, qpipe.UnavailableError)
        assert isinstance(e, TimeoutError) and isinstance(e, ConnectionError) and isinstance(e, qpipe.QueueError)
        assert address in str(e)


def test_a_call_without_a_timeout_to_a_host_that_is_not_there_raises_unavailable_after_the_liveness(flavour):
    address = f"tcp://127.0.0.1:{free_tcp_port()}"
    client = flavour.connect(address, liveness=1.0)
    q = flavour.queue_handle(client, "q", qpipe.QueueSpec.make("fifo", 10, ["float32"], [[2]]))
    t0 = time.monotonic()
    with pytest.raises(qpipe.UnavailableError) as ei:
        q.dequeue(timeout=None)
    assert 0.9 <= time.monotonic() - t0 < 1.6
    assert not isinstance(ei.value, qpipe.DeadlineExceededError)
    assert address in str(ei.value) and "'q'" in str(ei.value)


def test_calls_waiting_when_the_host_stops_get_an_unavailable_reply(make_server, flavour):
    server = make_server("tcp")
    client = flavour.connect(server.address)
    q = fifo2(client)
    full = fifo2(client, "full", capacity=1)
    full.enqueue(rows([0])[0])
    deq = flavour.start(q.dequeue, timeout=WAIT)
    enq = flavour.start(full.enqueue, rows([1])[0], timeout=WAIT)
    wait_waiting(server, "q", dequeues=1)
    wait_waiting(server, "full", enqueues=1)
    t0 = time.monotonic()
    server.stop()
    for fut in (deq, enq):
        with pytest.raises(qpipe.UnavailableError) as ei:
            fut.result(WAIT)
        assert not isinstance(ei.value, qpipe.NoReplyError)  # the host said so
        assert "shutting down" in str(ei.value)
    assert time.monotonic() - t0 < 2
    with pytest.raises(qpipe.NoReplyError):
        q.size(timeout=0.3)


def test_a_call_waiting_longer_than_the_liveness_on_a_live_host_keeps_waiting(server, flavour):
    client = flavour.connect(server.address, liveness=0.3)
    q = fifo2(client)
    before = server.stats()["requests"]
    fut = flavour.start(q.dequeue, timeout=WAIT)
    # Every ping is a request: six of them span twice the liveness.
    poll_for(lambda: server.stats()["requests"] >= before + 1 + 6, "six pings from the waiting client")
    assert not fut.done(), fut.exception()
    q.enqueue(rows([3])[0])
    np.testing.assert_array_equal(fut.result(WAIT), rows([3])[0])


def _wait_for_one(address):
    with qpipe.connect(address) as client:
        client.queue("ids").dequeue(timeout=None)


@pytest.mark.parametrize("transport", ["ipc", "tcp"])
def test_an_item_for_a_consumer_process_killed_while_waiting_goes_to_another_consumer(server, processes):
    with qpipe.connect(server.address) as client:
        q = _declare_ids(client, "fifo")
        p = multiprocessing.get_context("spawn").Process(target=_wait_for_one, args=(server.address,), daemon=True)
        processes.append(p)
        p.start()
        poll_for(lambda: waiting(server, "ids") == (0, 1), "the child's dequeue waiting", timeout=3 * WAIT)
        p.kill()
        p.join(WAIT)
        assert p.exitcode is not None
        q.enqueue(np.array(42, np.int64))
        assert int(q.dequeue(timeout=WAIT)) == 42
        assert server.stats()["undeliverable"] == 1


def test_closing_an_async_client_with_a_waiting_dequeue_loses_no_later_item(server, run_async):
    rounds = 150

    async def main():
        async with await qpipe.aconnect(server.address) as b:
            queues = []
            for i in range(rounds):
                qb = await b.fifo_queue(f"r{i}", capacity=1, dtypes=["int64"], shapes=[[]])
                queues.append(qb)
                a = await qpipe.aconnect(server.address)
                try:
                    qa = await a.queue(qb.name)
                    task = asyncio.create_task(qa.dequeue())
                    await apoll_for(lambda: waiting(server, qb.name) == (0, 1), "a waiting dequeue")
                finally:
                    a.close()
                with pytest.raises(RuntimeError):
                    await task
                await qb.enqueue(np.array(i, np.int64))
            await b.ping()
            sizes = [await qb.size() for qb in queues]
            lost = [i for i, n in enumerate(sizes) if n != 1]
            assert lost == [], f"the items of rounds {lost} went to closed clients and are gone"

    run_async(main)


# -- concurrency and conservation -----------------------------------------------------------


def _declare_ids(client, kind):
    if kind == "shuffle":
        return client.shuffle_queue("ids", capacity=16, min_after_dequeue=4, dtypes=["int64"], shapes=[[]], seed=1)
    return client.fifo_queue("ids", capacity=8, dtypes=["int64"], shapes=[[]])


@pytest.mark.parametrize("transport", ["inproc", "tcp"])
@pytest.mark.parametrize("kind", ["fifo", "shuffle"])
def test_producer_and_consumer_threads_sharing_one_client_move_every_item_exactly_once(server, kind):
    producers, per_producer, consumers = 4, 150, 3
    errors, got, lock = [], [], threading.Lock()
    with qpipe.connect(server.address, timeout=WAIT) as client:
        q = _declare_ids(client, kind)

        def produce(pid):
            try:
                ids = pid * 1_000_000 + np.arange(per_producer, dtype=np.int64)
                for k in range(0, per_producer, 10):
                    if k % 20:
                        q.enqueue_many(ids[k:k + 10])
                    else:
                        for v in ids[k:k + 10]:
                            q.enqueue(v)
            except BaseException as e:
                errors.append(e)

        def consume(cid):
            mine = []
            try:
                ops = [lambda: [int(q.dequeue())], lambda: q.dequeue_up_to(4).tolist(),
                       lambda: q.dequeue_many(3).tolist()]
                k = cid
                while True:
                    try:
                        mine += ops[k % 3]()
                    except qpipe.OutOfRangeError:
                        if k % 3 == 2:  # dequeue_many fails with rows left; they stay
                            k += 1
                            continue
                        break
                    k += 1
            except BaseException as e:
                errors.append(e)
            with lock:
                got.extend(mine)

        threads = [threading.Thread(target=produce, args=(p,), daemon=True) for p in range(producers)]
        threads += [threading.Thread(target=consume, args=(c,), daemon=True) for c in range(consumers)]
        for t in threads:
            t.start()
        for t in threads[:producers]:
            t.join(3 * WAIT)
            assert not t.is_alive(), "a producer hung"
        q.close()
        for t in threads[producers:]:
            t.join(3 * WAIT)
            assert not t.is_alive(), "a consumer hung"
    assert errors == []
    want = sorted(p * 1_000_000 + s for p in range(producers) for s in range(per_producer))
    assert len(got) == len(want)
    assert sorted(got) == want
    st = server.stats()["queues"]["ids"]
    assert st["enqueued"] == st["dequeued"] == len(want) and st["size"] == 0


def _produce_ids(address, pid, n):
    with qpipe.connect(address, timeout=WAIT) as client:
        q = client.queue("ids")
        ids = pid * 1_000_000 + np.arange(n, dtype=np.int64)
        for v in ids[:10]:
            q.enqueue(v)
        for chunk in np.array_split(ids[10:], 9):
            q.enqueue_many(chunk)


def _consume_ids(address, out_path):
    got = []
    with qpipe.connect(address, timeout=WAIT) as client:
        q = client.queue("ids")
        while True:
            try:
                got += q.dequeue_up_to(7).tolist()
            except qpipe.OutOfRangeError:
                break
    np.save(out_path, np.array(got, dtype=np.int64))


@pytest.mark.parametrize("transport", ["ipc", "tcp"])
def test_producer_and_consumer_processes_move_every_item_exactly_once(server, processes, tmp_path):
    n_producers, per_producer, n_consumers = 2, 300, 2
    with qpipe.connect(server.address) as client:
        q = _declare_ids(client, "fifo")
        ctx = multiprocessing.get_context("spawn")
        producers = [ctx.Process(target=_produce_ids, args=(server.address, p, per_producer), daemon=True)
                     for p in range(n_producers)]
        consumers = [ctx.Process(target=_consume_ids, args=(server.address, tmp_path / f"c{c}.npy"), daemon=True)
                     for c in range(n_consumers)]
        processes.extend(producers + consumers)
        for p in producers + consumers:
            p.start()
        for p in producers:
            p.join(60)
            assert p.exitcode == 0, f"producer pid {p.pid} ended with {p.exitcode}"
        q.close(timeout=WAIT)
        for p in consumers:
            p.join(60)
            assert p.exitcode == 0, f"consumer pid {p.pid} ended with {p.exitcode}"
    got = np.concatenate([np.load(tmp_path / f"c{c}.npy") for c in range(n_consumers)])
    want = sorted(p * 1_000_000 + s for p in range(n_producers) for s in range(per_producer))
    assert len(got) == len(want)
    assert sorted(got.tolist()) == want
    st = server.stats()["queues"]["ids"]
    assert st["enqueued"] == st["dequeued"] == len(want) and st["size"] == 0


# -- asyncio --------------------------------------------------------------------------------


def test_many_coroutines_waiting_on_one_async_client_each_get_one_item_in_arrival_order(server, run_async):
    n = 50

    async def main():
        async with await qpipe.aconnect(server.address) as client:
            q = await client.fifo_queue("q", capacity=n, dtypes=["int64"], shapes=[[]])
            tasks = []
            for _ in range(n):
                tasks.append(asyncio.create_task(q.dequeue(timeout=WAIT)))
            await apoll_for(lambda: waiting(server, "q") == (0, n), f"{n} waiting dequeues")
            assert not any(t.done() for t in tasks)
            await q.enqueue_many(np.arange(n))
            results = await asyncio.wait_for(asyncio.gather(*tasks), WAIT)
            assert [int(r) for r in results] == list(range(n))

    run_async(main)


def test_cancelling_a_waiting_async_dequeue_withdraws_it_so_a_later_item_goes_to_someone_else(server, run_async):
    async def main():
        async with await qpipe.aconnect(server.address) as a, await qpipe.aconnect(server.address) as b:
            qa = await a.fifo_queue("q", capacity=10, dtypes=["int64"], shapes=[[]])
            qb = await b.queue("q")
            task = asyncio.create_task(qa.dequeue())
            await apoll_for(lambda: waiting(server, "q") == (0, 1), "a waiting dequeue")
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await apoll_for(lambda: waiting(server, "q") == (0, 0), "the host withdrawing the dequeue")
            await qb.enqueue(np.int64(7).reshape(()))
            assert int(await qb.dequeue(timeout=WAIT)) == 7
            st = server.stats()["queues"]["q"]
            assert st["enqueued"] == st["dequeued"] == 1

    run_async(main)


@pytest.mark.parametrize("timeout", [None, WAIT])
def test_cancelling_an_async_dequeue_whose_item_is_already_on_the_way_puts_the_item_back(server, run_async, timeout):
    async def main():
        async with await qpipe.aconnect(server.address) as a:
            qa = await a.fifo_queue("q", capacity=10, dtypes=["int64"], shapes=[[]])
            with qpipe.connect(server.address) as sync:
                sq = sync.queue("q")
                task = asyncio.create_task(qa.dequeue(timeout=timeout))
                await apoll_for(lambda: waiting(server, "q") == (0, 1), "a waiting dequeue")
                # NOTE: blocks the loop on purpose: the host serves the waiting dequeue and
                # sends its reply before the task can read it; then the task is cancelled.
                sq.enqueue(np.array(7, np.int64))
                assert server.stats()["queues"]["q"]["dequeued"] == 1
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
                got = await asyncio.to_thread(sq.dequeue, timeout=WAIT)
                assert int(got) == 7
        st = server.stats()["queues"]["q"]
        assert st["enqueued"] == st["dequeued"] == 1 and st["size"] == 0

    run_async(main)


def test_a_dequeue_abandoned_by_wait_for_does_not_lose_an_item_enqueued_afterwards(server, run_async):
    async def main():
        async with await qpipe.aconnect(server.address) as a, await qpipe.aconnect(server.address) as b:
            qa = await a.fifo_queue("q", capacity=10, dtypes=["int64"], shapes=[[]])
            qb = await b.queue("q")
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(qa.dequeue(), 0.1)
            await apoll_for(lambda: waiting(server, "q") == (0, 0), "the host withdrawing the dequeue")
            await qb.enqueue(np.array(7, np.int64))
            assert int(await qb.dequeue(timeout=WAIT)) == 7

    run_async(main)


def test_dequeues_abandoned_by_wait_for_at_random_moments_lose_no_item(server, run_async):
    n = 300

    async def main():
        got = []
        async with await qpipe.aconnect(server.address) as a:
            qa = await a.fifo_queue("q", capacity=4, dtypes=["int64"], shapes=[[]])

            def produce():
                with qpipe.connect(server.address, timeout=WAIT) as c:
                    pq = c.queue("q")
                    for i in range(n):
                        pq.enqueue(np.array(i, np.int64))

            producer = asyncio.ensure_future(asyncio.to_thread(produce))
            rng = random.Random(0)
            abandoned = 0
            while not producer.done():
                try:
                    got.append(int(await asyncio.wait_for(qa.dequeue(timeout=WAIT),
                                                          rng.choice([0.0005, 0.001, 0.002, 0.005]))))
                except TimeoutError:
                    abandoned += 1
            await producer
            # Two round trips on `a`: late replies are read and their rows sent back first.
            await qa.size()
            await qa.size()
            await qa.close()
            while True:
                try:
                    got += (await qa.dequeue_up_to(100, timeout=WAIT)).tolist()
                except qpipe.OutOfRangeError:
                    break
        assert abandoned > 0
        assert sorted(got) == list(range(n))
        st = server.stats()["queues"]["q"]
        assert st["enqueued"] == st["dequeued"] == n and st["size"] == 0

    run_async(main)


# -- both flavours fail alike ---------------------------------------------------------------


MISUSES = [
    ("a float into an int32 queue", qpipe.InvalidArgumentError, lambda c, q, iq, cq: iq.enqueue(np.array(1.5))),
    ("too many components", qpipe.InvalidArgumentError, lambda c, q, iq, cq: q.enqueue((rows([0])[0], 1))),
    ("the wrong shape", qpipe.InvalidArgumentError, lambda c, q, iq, cq: q.enqueue(np.zeros(3, np.float32))),
    ("strings into a float queue", qpipe.InvalidArgumentError, lambda c, q, iq, cq: q.enqueue(np.array(["a", "b"]))),
    ("an unknown queue", qpipe.NotFoundError, lambda c, q, iq, cq: c.queue("nope")),
    ("another spec for a name", qpipe.InvalidArgumentError,
     lambda c, q, iq, cq: c.fifo_queue(q.name, capacity=3, dtypes=["float32"], shapes=[[2]])),
    ("capacity 0", qpipe.InvalidArgumentError,
     lambda c, q, iq, cq: c.fifo_queue("zero", capacity=0, dtypes=["float32"])),
    ("min_after_dequeue not below capacity", qpipe.InvalidArgumentError,
     lambda c, q, iq, cq: c.shuffle_queue("shuf", capacity=3, min_after_dequeue=3, dtypes=["float32"])),
    ("a padding queue without shapes", qpipe.InvalidArgumentError,
     lambda c, q, iq, cq: c.padding_queue("pad", capacity=3, dtypes=["float32"], shapes=None)),
    ("a dtype that is no dtype", qpipe.InvalidArgumentError,
     lambda c, q, iq, cq: c.fifo_queue("bad", capacity=3, dtypes=["nonsense"])),
    ("dequeue on a closed empty queue", qpipe.OutOfRangeError, lambda c, q, iq, cq: cq.dequeue(timeout=WAIT)),
    ("dequeue_many on a closed empty queue", qpipe.OutOfRangeError,
     lambda c, q, iq, cq: cq.dequeue_many(2, timeout=WAIT)),
    ("enqueue on a closed queue", qpipe.QueueClosedError, lambda c, q, iq, cq: cq.enqueue(rows([0])[0])),
    ("closing a closed queue", qpipe.QueueClosedError, lambda c, q, iq, cq: cq.close()),
    ("a negative n", qpipe.InvalidArgumentError, lambda c, q, iq, cq: q.dequeue_many(-1)),
    ("an n that is no integer", TypeError, lambda c, q, iq, cq: q.dequeue_up_to(2.0)),
    ("a negative timeout", qpipe.InvalidArgumentError, lambda c, q, iq, cq: q.dequeue(timeout=-1)),
    ("a NaN timeout", qpipe.InvalidArgumentError, lambda c, q, iq, cq: q.dequeue(timeout=float("nan"))),
    ("an expired timeout", qpipe.DeadlineExceededError, lambda c, q, iq, cq: q.dequeue(timeout=0)),
]


def test_the_sync_and_async_clients_raise_the_same_error_classes_for_the_same_misuse(server, flavours):
    outcomes = {}
    for name in ("sync", "asyncio"):
        f = flavours(name)
        client = f.connect(server.address)
        q = fifo2(client, f"q-{name}")
        iq = client.fifo_queue(f"i-{name}", capacity=2, dtypes=["int32"], shapes=[[]])
        cq = fifo2(client, f"c-{name}")
        cq.close()
        seen = {}
        for what, _, misuse in MISUSES:
            try:
                misuse(client, q, iq, cq)
                seen[what] = None
            except Exception as e:
                seen[what] = type(e)
        client.close()
        try:
            q.size()
            seen["a call after close"] = None
        except Exception as e:
            seen["a call after close"] = type(e)
        outcomes[name] = seen
    want = {what: cls for what, cls, _ in MISUSES} | {"a call after close": RuntimeError}
    assert outcomes["sync"] == outcomes["asyncio"]
    assert {w: c for w, c in outcomes["sync"].items() if c is not want[w]} == {}


# -- strings, padding, shuffle ---------------------------------------------------------------


def test_string_components_round_trip_byte_for_byte(server, flavour):
    client = flavour.connect(server.address)
    q = client.fifo_queue("s", capacity=10, dtypes=["string", "int32"], shapes=[[2], []])
    q.enqueue(([b"", "h\u00e9llo"], i32(3)))
    q.enqueue_many(([[b"a\x00b", b"\xff" * 1000], [b"x", b""]], i32([4, 5])))
    s, n = q.dequeue(timeout=WAIT)
    assert s.dtype == object and s.shape == (2,) and int(n) == 3
    assert s.tolist() == [b"", "h\u00e9llo".encode()]
    ss, ns = q.dequeue_many(2, timeout=WAIT)
    assert ss.shape == (2, 2) and ss.tolist() == [[b"a\x00b", b"\xff" * 1000], [b"x", b""]]
    assert ns.tolist() == [4, 5]

    p = client.padding_queue("ps", capacity=10, dtypes=["string"], shapes=[[None]])
    p.enqueue((["a"],))
    p.enqueue(([b"b", b"c"],))
    assert p.dequeue_many(2, timeout=WAIT).tolist() == [[b"a", b""], [b"b", b"c"]]

    with pytest.raises(qpipe.InvalidArgumentError):
        q.enqueue(([1, 2], i32(0)))  # not strings


def test_a_scalar_string_component_can_be_dequeued_one_item_at_a_time(server):
    with qpipe.connect(server.address) as client:
        q = client.fifo_queue("s", capacity=10, dtypes=["string"], shapes=[[]])
        q.enqueue(b"hello")
        try:
            got = q.dequeue(timeout=WAIT)
        finally:
            st = server.stats()["queues"]["s"]
            assert st["size"] + st["dequeued"] == 1
        assert got.shape == () and got[()] == b"hello"


def test_a_seeded_shuffle_queue_dequeues_in_the_same_order_on_two_fresh_servers(make_server, flavour):
    def order(seed):
        server = make_server("tcp")
        client = flavour.connect(server.address)
        s = client.shuffle_queue("s", capacity=50, min_after_dequeue=10, dtypes=["float32", "int32"],
                                 shapes=[[2], []], seed=seed)
        ids = np.arange(40, dtype=np.int32)
        s.enqueue_many((rows(ids), ids))
        out = [int(s.dequeue(timeout=WAIT)[1]) for _ in range(10)]
        out += s.dequeue_many(10, timeout=WAIT)[1].tolist()
        s.close()
        out += s.dequeue_up_to(50, timeout=WAIT)[1].tolist()
        client.close()
        server.stop()
        return out

    first, second, other = order(42), order(42), order(7)
    assert first == second
    assert sorted(first) == list(range(40)) and first != sorted(first)
    assert other != first
