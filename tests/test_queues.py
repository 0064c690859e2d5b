"""The queue state machines, the spec checks and the wire format, driven directly (no I/O).

A step returns the requests it completed as ``(request, outcome)`` pairs; a
request absent from that list is still waiting.
"""

import random
import re
from collections import Counter

import msgpack
import numpy as np
import pytest

from qpipe import wire
from qpipe.errors import (
    CODES,
    DeadlineExceededError,
    InvalidArgumentError,
    MessageTooLargeError,
    OutOfRangeError,
    ProtocolError,
    QueueClosedError,
    QueueError,
    error_from_code,
)
from qpipe.queues import DequeueRequest, EnqueueRequest, make_queue
from qpipe.spec import ItemChecker, QueueSpec, pad_stack

# --------------------------------------------------------------------------- helpers


def new_queue(kind="fifo", capacity=10, dtypes=("int64",), shapes=((),), name="q", **kw):
    spec = QueueSpec.make(kind, capacity, list(dtypes), None if shapes is None else list(shapes),
                          queue=name, **kw)
    return make_queue(name, spec)


def done(completions):
    """Completions as a dict request -> outcome; a request completes at most once per step."""
    out = {}
    for req, outcome in completions:
        assert req not in out, f"{req.op} completed twice in one step"
        out[req] = outcome
    return out


def enqueue(q, *values):
    """enqueue_many of one int64 component; returns (request, completions)."""
    req = EnqueueRequest([np.asarray(values, dtype=np.int64)])
    return req, done(q.enqueue(req))


def enqueue_block(q, *arrays):
    req = EnqueueRequest([np.asarray(a) for a in arrays])
    return req, done(q.enqueue(req))


def dequeue(q, n=None, up_to=False):
    req = DequeueRequest(n, up_to=up_to)
    return req, done(q.dequeue(req))


def ints(outcome):
    """Component 0 of a dequeue outcome as a list of ints (a single row gives a 1-list)."""
    a = np.asarray(outcome[0])
    return [int(a)] if a.ndim == 0 else [int(x) for x in a]


def take_all(q):
    """Close the queue if needed and dequeue row by row until it is empty."""
    if not q.closed:
        done(q.close())
    got = []
    while True:
        req, c = dequeue(q)
        outcome = c[req]
        if isinstance(outcome, OutOfRangeError):
            return got
        assert not isinstance(outcome, QueueError), outcome
        got.extend(ints(outcome))


# --------------------------------------------------------------------------- FIFO basics


def test_fifo_dequeues_rows_in_the_order_they_were_enqueued():
    q = new_queue()
    for v in (10, 20, 30):
        req, c = enqueue(q, v)
        assert c == {req: 1}
    enqueue(q, 40, 50)
    assert q.size() == 5
    got = []
    for _ in range(5):
        req, c = dequeue(q)
        got.extend(ints(c[req]))
    assert got == [10, 20, 30, 40, 50]
    assert q.size() == 0


def test_fifo_keeps_the_components_of_a_row_together():
    q = new_queue(dtypes=("float32", "int32"), shapes=((), (2,)))
    floats = np.array([1.0, 2.0, 3.0, 4.0], dtype=np.float32)
    pairs = np.array([[1, 2], [3, 4], [5, 6], [7, 8]], dtype=np.int32)
    enqueue_block(q, floats, pairs)
    req, c = dequeue(q, 2)
    f, i = c[req]
    assert f.dtype == np.float32 and i.dtype == np.int32
    np.testing.assert_array_equal(f, floats[:2])
    np.testing.assert_array_equal(i, pairs[:2])
    req, c = dequeue(q)
    f, i = c[req]
    assert f.shape == () and i.shape == (2,)
    assert float(f) == 3.0
    np.testing.assert_array_equal(i, [5, 6])


def test_high_dimensional_rows_round_trip_through_dequeue_many():
    q = new_queue(dtypes=("int32",), shapes=((4, 4, 4, 4),))
    elems = np.arange(10 * 256, dtype=np.int32).reshape(10, 4, 4, 4, 4)
    enqueue_block(q, elems)
    req, c = dequeue(q, 10)
    np.testing.assert_array_equal(c[req][0], elems)


def test_enqueue_of_an_empty_batch_completes_at_once_and_adds_nothing():
    q = new_queue(dtypes=("float32",), shapes=((2, 3),))
    req, c = enqueue_block(q, np.zeros((0, 2, 3), np.float32))
    assert c == {req: 0}
    assert q.size() == 0


def test_enqueue_blocks_while_the_queue_is_full_and_completes_when_room_appears():
    q = new_queue(capacity=2)
    enqueue(q, 1, 2)
    blocked, c = enqueue(q, 3)
    assert c == {}
    assert q.waiting() == (1, 0)
    assert q.size() == 2
    deq, c = dequeue(q)
    assert ints(c[deq]) == [1]
    assert c[blocked] == 1
    assert q.waiting() == (0, 0)
    assert take_all(q) == [2, 3]


def test_dequeue_blocks_while_the_queue_is_empty_and_completes_when_a_row_arrives():
    q = new_queue()
    deq, c = dequeue(q)
    assert c == {}
    assert q.waiting() == (0, 1)
    enq, c = enqueue(q, 7)
    assert c[enq] == 1
    assert ints(c[deq]) == [7]
    assert q.waiting() == (0, 0)
    assert q.size() == 0


def test_waiting_dequeues_are_served_strictly_in_arrival_order():
    q = new_queue()
    first, _ = dequeue(q, 2)
    second, _ = dequeue(q)
    third, _ = dequeue(q, 1)
    enq, c = enqueue(q, 1, 2, 3, 4)
    assert set(c) == {enq, first, second, third}
    assert ints(c[first]) == [1, 2]
    assert ints(c[second]) == [3]
    assert ints(c[third]) == [4]


def test_a_later_small_dequeue_does_not_overtake_an_earlier_waiting_dequeue_many():
    q = new_queue()
    big, _ = dequeue(q, 3)
    small, _ = dequeue(q)
    _, c = enqueue(q, 1)
    assert big not in c and small not in c
    _, c = enqueue(q, 2)
    assert big not in c and small not in c
    _, c = enqueue(q, 3, 4)
    assert ints(c[big]) == [1, 2, 3]
    assert ints(c[small]) == [4]


def test_waiting_enqueues_are_served_strictly_in_arrival_order():
    q = new_queue(capacity=1)
    enqueue(q, 0)
    e1, c1 = enqueue(q, 1)
    e2, c2 = enqueue(q, 2, 3)
    e3, c3 = enqueue(q, 4)
    assert c1 == c2 == c3 == {}
    assert q.waiting() == (3, 0)
    order = []
    completed = []
    for _ in range(5):
        d, c = dequeue(q)
        order.extend(ints(c[d]))
        completed.extend(r for r in c if r is not d)
    assert order == [0, 1, 2, 3, 4]
    assert completed == [e1, e2, e3]


def test_a_single_enqueue_waits_behind_an_earlier_partly_inserted_enqueue_many():
    q = new_queue(capacity=2)
    big, c = enqueue(q, 1, 2, 3, 4)
    assert c == {} and big.done == 2
    small, c = enqueue(q, 9)
    assert c == {}
    d, c = dequeue(q)
    assert ints(c[d]) == [1]
    assert small not in c and big not in c
    assert big.done == 3
    assert take_all(q) == [2, 3, 4, 9]


def test_enqueue_many_larger_than_the_capacity_inserts_rows_as_room_appears():
    q = new_queue(capacity=3)
    req, c = enqueue(q, *range(7))
    assert c == {}
    assert req.done == 3 and q.size() == 3
    d, c = dequeue(q)
    assert ints(c[d]) == [0]
    assert req.done == 4 and q.size() == 3
    d, c = dequeue(q, 3)
    assert ints(c[d]) == [1, 2, 3]
    assert c[req] == 7
    assert q.size() == 3
    assert take_all(q) == [4, 5, 6]


def test_dequeue_many_larger_than_the_capacity_collects_rows_as_they_arrive():
    q = new_queue(capacity=2)
    d, _ = dequeue(q, 5)
    for v in range(4):
        e, c = enqueue(q, v)
        assert c == {e: 1}, "each row goes straight to the waiting dequeue_many"
        assert q.size() == 0
    e, c = enqueue(q, 4, 5, 6)
    assert ints(c[d]) == [0, 1, 2, 3, 4]
    assert c[e] == 3
    assert take_all(q) == [5, 6]


def test_enqueue_many_and_dequeue_many_both_larger_than_the_capacity_meet():
    q = new_queue(capacity=2)
    d, _ = dequeue(q, 6)
    e, c = enqueue(q, *range(6))
    assert c[e] == 6
    assert ints(c[d]) == list(range(6))


@pytest.mark.parametrize("kind", ["fifo", "shuffle", "padding"])
def test_dequeue_many_of_zero_returns_an_empty_batch_at_once(kind):
    q = new_queue(kind, dtypes=("float32", "string"), shapes=((3,), ()))
    for up_to in (False, True):
        d, c = dequeue(q, 0, up_to=up_to)
        f, s = c[d]
        assert f.shape == (0, 3) and f.dtype == np.float32
        assert s.shape == (0,) and s.dtype == object
    enqueue_block(q, np.ones((1, 3), np.float32), np.array([b"x"], dtype=object))
    d, c = dequeue(q, 0)
    assert c[d][0].shape == (0, 3)
    assert q.size() == 1


def test_dequeue_many_of_zero_on_a_padding_queue_has_zero_for_every_unknown_dimension():
    q = new_queue("padding", dtypes=("int32",), shapes=((None, 2, None),))
    d, c = dequeue(q, 0)
    assert c[d][0].shape == (0, 0, 2, 0)


def test_dequeue_many_of_a_negative_count_fails_with_an_invalid_argument_naming_the_queue():
    q = new_queue(name="counts")
    d, c = dequeue(q, -1)
    assert isinstance(c[d], InvalidArgumentError)
    assert "'counts'" in str(c[d]) and "-1" in str(c[d])
    assert q.waiting() == (0, 0)


def test_dequeue_up_to_on_an_open_queue_waits_for_n_rows():
    q = new_queue()
    enqueue(q, 1, 2)
    d, c = dequeue(q, 3, up_to=True)
    assert c == {}
    assert q.size() == 0, "collected rows are held by the waiting request"
    _, c = enqueue(q, 3)
    assert ints(c[d]) == [1, 2, 3]


def test_dequeue_up_to_takes_exactly_n_when_more_are_available():
    q = new_queue()
    enqueue(q, *range(10))
    d, c = dequeue(q, 4, up_to=True)
    assert ints(c[d]) == [0, 1, 2, 3]
    d, c = dequeue(q, 4, up_to=True)
    assert ints(c[d]) == [4, 5, 6, 7]


def test_a_dequeue_many_spanning_several_enqueued_blocks_concatenates_them_in_order():
    q = new_queue(dtypes=("int64", "float64"), shapes=((), (2,)))
    enqueue_block(q, [1, 2], [[1.0, 1.5], [2.0, 2.5]])
    enqueue_block(q, [3], [[3.0, 3.5]])
    enqueue_block(q, [4, 5, 6], [[4.0, 4.5], [5.0, 5.5], [6.0, 6.5]])
    d, c = dequeue(q, 5)
    a, b = c[d]
    assert a.tolist() == [1, 2, 3, 4, 5]
    assert b[:, 0].tolist() == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert take_all(q) == [6]


def test_two_queues_do_not_share_rows():
    q1, q2 = new_queue(name="a"), new_queue(name="b")
    enqueue(q1, 1)
    enqueue(q2, 2)
    d, c = dequeue(q2)
    assert ints(c[d]) == [2]
    d, c = dequeue(q1)
    assert ints(c[d]) == [1]


def test_random_mixture_of_dequeue_and_dequeue_many_keeps_fifo_order():
    rng = random.Random(7)
    q = new_queue(capacity=10)
    e, _ = enqueue(q, *range(250))
    got = []
    while len(got) < 250:
        if rng.random() < 0.5:
            d, c = dequeue(q)
        else:
            d, c = dequeue(q, rng.randint(0, min(20, 250 - len(got))))
        got.extend(ints(c[d]) if np.asarray(c[d][0]).size else [])
    assert got == list(range(250))
    assert e.done == 250


# --------------------------------------------------------------------------- close


def test_enqueue_after_close_fails_with_queue_closed_error_naming_the_queue():
    q = new_queue(name="inst")
    enqueue(q, 1)
    done(q.close())
    for values in ((2,), (3, 4), ()):
        e, c = enqueue(q, *values)
        assert isinstance(c[e], QueueClosedError)
        assert "'inst'" in str(c[e]) and "closed" in str(c[e])
    assert q.size() == 1


def test_dequeues_succeed_while_rows_remain_after_close_then_fail_with_out_of_range():
    q = new_queue()
    enqueue(q, 10, 20, 30, 40)
    done(q.close())
    for v in (10, 20, 30, 40):
        d, c = dequeue(q)
        assert ints(c[d]) == [v]
    d, c = dequeue(q)
    assert isinstance(c[d], OutOfRangeError)
    assert "closed" in str(c[d])


def test_close_fails_a_waiting_dequeue_on_an_empty_queue_with_out_of_range():
    q = new_queue()
    d, _ = dequeue(q)
    c = done(q.close())
    assert isinstance(c[d], OutOfRangeError)
    assert q.waiting() == (0, 0)


@pytest.mark.parametrize("up_to", [False, True])
def test_close_fails_a_waiting_batch_dequeue_on_an_empty_queue_with_out_of_range(up_to):
    q = new_queue()
    d, _ = dequeue(q, 4, up_to=up_to)
    c = done(q.close())
    assert isinstance(c[d], OutOfRangeError)


def test_a_second_dequeue_many_waiting_when_the_queue_closes_fails():
    q = new_queue()
    enqueue(q, 10, 20, 30, 40)
    d, c = dequeue(q, 4)
    assert ints(c[d]) == [10, 20, 30, 40]
    d, c = dequeue(q, 4)
    assert c == {}
    c = done(q.close())
    assert isinstance(c[d], OutOfRangeError)


def test_failed_dequeue_many_on_closed_queue_keeps_items_in_order():
    q = new_queue()
    enqueue(q, 10, 20, 30)
    done(q.close())
    d, c = dequeue(q, 4)
    assert isinstance(c[d], OutOfRangeError)
    msg = str(c[d])
    assert "'q'" in msg and "3" in msg and "4" in msg
    assert q.size() == 3
    assert take_all(q) == [10, 20, 30]


def test_dequeue_up_to_on_a_closed_queue_returns_what_is_left():
    q = new_queue()
    enqueue(q, 10, 20, 30, 40)
    done(q.close())
    d, c = dequeue(q, 3, up_to=True)
    assert ints(c[d]) == [10, 20, 30]
    d, c = dequeue(q, 3, up_to=True)
    assert ints(c[d]) == [40]
    d, c = dequeue(q, 3, up_to=True)
    assert isinstance(c[d], OutOfRangeError)


def test_waiting_dequeue_up_to_returns_its_partial_batch_when_the_queue_closes():
    q = new_queue()
    enqueue(q, 1, 2)
    d, c = dequeue(q, 5, up_to=True)
    assert c == {}
    c = done(q.close())
    assert ints(c[d]) == [1, 2]
    assert q.dequeued == 2


def test_waiting_dequeue_many_puts_collected_rows_back_in_order_when_the_queue_closes():
    q = new_queue(capacity=4, dtypes=("float32", "float32"), shapes=((), ()))
    enqueue_block(q, np.array([1, 2, 3], np.float32), np.array([10, 20, 30], np.float32))
    d, c = dequeue(q, 4)
    assert c == {} and q.size() == 0
    c = done(q.close())
    assert isinstance(c[d], OutOfRangeError)
    assert q.size() == 3
    for a, b in [(1, 10), (2, 20), (3, 30)]:
        r, c = dequeue(q)
        assert [float(x) for x in c[r]] == [a, b]
    assert q.size() == 0
    assert q.dequeued == 3


def test_when_close_fails_a_waiting_dequeue_many_the_dequeue_behind_it_gets_the_rows():
    q = new_queue()
    enqueue(q, 1, 2)
    head, _ = dequeue(q, 5)
    behind, c = dequeue(q)
    assert c == {}
    c = done(q.close())
    assert isinstance(c[head], OutOfRangeError)
    assert ints(c[behind]) == [1]
    assert take_all(q) == [2]


def test_enqueues_waiting_at_close_are_still_honoured():
    q = new_queue(capacity=4)
    enqueue(q, 10, 20, 30)
    e, c = enqueue(q, 50, 60)
    assert c == {} and e.done == 1
    assert done(q.close()) == {}
    assert q.waiting() == (1, 0)
    d, c = dequeue(q)
    assert ints(c[d]) == [10]
    assert c[e] == 2
    assert take_all(q) == [20, 30, 50, 60]


def test_a_dequeue_many_on_a_closed_queue_waits_for_rows_of_still_pending_enqueues():
    q = new_queue(capacity=2)
    enqueue(q, 1, 2)
    e, _ = enqueue(q, 3, 4, 5)
    done(q.close())
    d, c = dequeue(q, 5)
    assert ints(c[d]) == [1, 2, 3, 4, 5]
    assert c[e] == 3


def test_a_closed_queue_with_a_pending_enqueue_fails_a_dequeue_many_only_when_rows_run_out():
    q = new_queue(capacity=2)
    enqueue(q, 1, 2)
    e, _ = enqueue(q, 3)
    done(q.close())
    d, c = dequeue(q, 4)
    assert c[e] == 1
    assert isinstance(c[d], OutOfRangeError)
    assert take_all(q) == [1, 2, 3]


def test_enqueue_many_larger_than_capacity_with_concurrent_dequeue_many_and_close():
    q = new_queue(capacity=4)
    e, _ = enqueue(q, 10, 20, 30, 40, 50, 60)
    d, c = dequeue(q, 3)
    assert ints(c[d]) == [10, 20, 30]
    assert c[e] == 6
    done(q.close())
    d, c = dequeue(q, 4)
    assert isinstance(c[d], OutOfRangeError)
    d, c = dequeue(q, 4, up_to=True)
    assert ints(c[d]) == [40, 50, 60]


def test_close_with_cancel_fails_waiting_enqueues_but_keeps_the_rows_they_inserted():
    q = new_queue(capacity=3, name="inst")
    enqueue(q, 1)
    big, _ = enqueue(q, 2, 3, 4, 5)
    single, _ = enqueue(q, 6)
    assert big.done == 2 and q.size() == 3
    c = done(q.close(cancel_pending_enqueues=True))
    assert set(c) == {big, single}
    for r in (big, single):
        assert isinstance(c[r], QueueClosedError)
        assert "'inst'" in str(c[r])
    assert "2 of 4" in str(c[big])
    assert q.waiting() == (0, 0)
    assert take_all(q) == [1, 2, 3]
    assert q.enqueued == 3


def test_close_with_cancel_also_fails_dequeues_that_now_cannot_be_satisfied():
    q = new_queue(capacity=2)
    enqueue(q, 1, 2)
    e, _ = enqueue(q, 3)
    d, c = dequeue(q, 4)
    assert c == {e: 1}, "the dequeue_many made room for the waiting enqueue"
    assert d.got == 3 and q.size() == 0
    c = done(q.close(cancel_pending_enqueues=True))
    assert isinstance(c[d], OutOfRangeError)
    assert take_all(q) == [1, 2, 3]


def test_closing_a_closed_queue_without_cancel_raises_queue_closed_error():
    q = new_queue(name="files")
    done(q.close())
    with pytest.raises(QueueClosedError, match="'files'.*already closed"):
        q.close()
    assert q.closed


def test_closing_a_closed_queue_with_cancel_is_allowed_and_cancels_what_waits():
    q = new_queue(capacity=1)
    enqueue(q, 1)
    e, _ = enqueue(q, 2)
    assert done(q.close()) == {}
    c = done(q.close(cancel_pending_enqueues=True))
    assert isinstance(c[e], QueueClosedError)
    assert done(q.close(cancel_pending_enqueues=True)) == {}
    with pytest.raises(QueueClosedError):
        q.close()
    assert take_all(q) == [1]


# --------------------------------------------------------------------------- cancel (timeouts)


def deadline():
    return DeadlineExceededError("timed out")


def test_a_cancelled_waiting_dequeue_fails_with_the_given_error_and_leaves_the_queue_as_it_was():
    q = new_queue()
    d, _ = dequeue(q)
    exc = deadline()
    c = done(q.cancel(d, exc))
    assert c == {d: exc}
    assert q.waiting() == (0, 0)
    e, c = enqueue(q, 5)
    assert c == {e: 1}, "nobody is waiting any more"
    assert take_all(q) == [5]


def test_a_cancelled_waiting_dequeue_many_puts_collected_rows_back_at_the_front_in_order():
    q = new_queue(capacity=3)
    enqueue(q, 1, 2, 3)
    e, _ = enqueue(q, 4, 5)
    d, c = dequeue(q, 6)
    assert c == {e: 2}
    assert d.got == 5 and q.size() == 0
    c = done(q.cancel(d, deadline()))
    assert set(c) == {d}
    assert q.size() == 5 and q.dequeued == 0
    enqueue(q, 6)
    assert take_all(q) == [1, 2, 3, 4, 5, 6]


def test_a_cancelled_dequeue_many_leaves_the_queue_exactly_as_before():
    q = new_queue(capacity=10, dtypes=("int64", "string"), shapes=((), ()))
    enqueue_block(q, np.array([1, 2, 3]), np.array([b"a", b"b", b"c"], dtype=object))
    before = q.stats()
    d, c = dequeue(q, 5)
    assert c == {}
    done(q.cancel(d, deadline()))
    assert q.stats() == before
    r, c = dequeue(q, 3)
    a, s = c[r]
    assert a.tolist() == [1, 2, 3]
    assert s.tolist() == [b"a", b"b", b"c"]


def test_a_cancelled_dequeue_many_returns_its_rows_even_when_enqueues_refilled_the_queue():
    q = new_queue(capacity=2)
    enqueue(q, 1, 2)
    d, _ = dequeue(q, 10)
    enqueue(q, 3, 4)
    enqueue(q, 5, 6)
    assert d.got == 6 and q.size() == 0
    done(q.cancel(d, deadline()))
    assert q.size() == 6, "nothing is lost, even if the queue is over capacity for a while"
    late, c = enqueue(q, 7)
    assert c == {}, "enqueues wait until the size is below the capacity again"
    assert take_all(q) == [1, 2, 3, 4, 5, 6, 7]
    assert late.done == 1


def test_a_cancelled_enqueue_many_keeps_the_rows_it_had_inserted():
    q = new_queue(capacity=3)
    enqueue(q, 1)
    e, _ = enqueue(q, 2, 3, 4, 5)
    assert e.done == 2
    exc = deadline()
    c = done(q.cancel(e, exc))
    assert c == {e: exc}
    assert q.waiting() == (0, 0)
    assert q.size() == 3
    assert take_all(q) == [1, 2, 3]
    assert q.enqueued == 3


def test_cancelling_a_completed_request_returns_nothing_and_changes_nothing():
    q = new_queue()
    e, _ = enqueue(q, 1, 2)
    d, _ = dequeue(q)
    before = q.stats()
    assert q.cancel(e, deadline()) == []
    assert q.cancel(d, deadline()) == []
    assert q.cancel(DequeueRequest(3), deadline()) == []
    assert q.stats() == before
    assert take_all(q) == [2]


def test_after_cancelling_the_head_waiter_the_next_waiter_is_served():
    q = new_queue()
    enqueue(q, 1, 2)
    head, _ = dequeue(q, 3)
    nxt, c = dequeue(q)
    assert c == {}
    c = done(q.cancel(head, deadline()))
    assert isinstance(c[head], DeadlineExceededError)
    assert ints(c[nxt]) == [1]
    assert take_all(q) == [2]


def test_after_cancelling_the_head_enqueue_the_next_enqueue_is_served():
    q = new_queue(capacity=1)
    enqueue(q, 0)
    head, _ = enqueue(q, 1, 2)
    nxt, _ = enqueue(q, 3)
    assert head.done == 0
    done(q.cancel(head, deadline()))
    d, c = dequeue(q)
    assert ints(c[d]) == [0]
    assert c[nxt] == 1
    assert take_all(q) == [3]


def test_cancelling_a_waiting_enqueue_behind_the_head_leaves_the_head_waiting():
    q = new_queue(capacity=1)
    enqueue(q, 0)
    head, _ = enqueue(q, 1)
    behind, _ = enqueue(q, 2)
    c = done(q.cancel(behind, deadline()))
    assert set(c) == {behind}
    assert q.waiting() == (1, 0)
    assert take_all(q) == [0, 1]


# --------------------------------------------------------------------------- put_back


def test_put_back_restores_rows_at_the_front_and_counts_them_in_the_size():
    q = new_queue()
    enqueue(q, 1, 2, 3, 4)
    d, c = dequeue(q, 2)
    rows = c[d]
    assert q.size() == 2 and q.dequeued == 2
    assert done(q.put_back(rows)) == {}
    assert q.dequeued == 0
    assert q.size() == 4
    assert take_all(q) == [1, 2, 3, 4]


def test_put_back_serves_a_waiting_dequeue():
    q = new_queue()
    d, _ = dequeue(q)
    c = done(q.put_back([np.array([42])]))
    assert ints(c[d]) == [42]


def test_put_back_of_an_empty_batch_changes_nothing():
    q = new_queue()
    enqueue(q, 1, 2)
    done(q.put_back([np.zeros(0, np.int64)]))
    assert q.size() == 2
    assert take_all(q) == [1, 2]


# --------------------------------------------------------------------------- shuffle


def shuffle_queue(capacity=10, min_after_dequeue=0, seed=1729, **kw):
    return new_queue("shuffle", capacity=capacity, min_after_dequeue=min_after_dequeue,
                     seed=seed, **kw)


def test_shuffle_queue_dequeue_waits_while_size_is_at_most_min_after_dequeue():
    q = shuffle_queue(min_after_dequeue=2)
    enqueue(q, 10, 20)
    d, c = dequeue(q)
    assert c == {}
    e, c = enqueue(q, 30)
    assert set(c) == {e, d}
    assert q.size() == 2
    d, c = dequeue(q)
    assert c == {}


def test_shuffle_queue_dequeue_many_keeps_min_after_dequeue_rows_until_closed():
    q = shuffle_queue(min_after_dequeue=2)
    enqueue(q, 10, 20, 30, 40)
    d, c = dequeue(q, 3)
    assert c == {}
    assert d.got == 2 and q.size() == 2
    c = done(q.close())
    assert len(ints(c[d])) == 3
    rest = take_all(q)
    assert sorted(ints(c[d]) + rest) == [10, 20, 30, 40]


def test_shuffle_queue_dequeue_up_to_smaller_than_min_after_dequeue_gets_the_rest_after_close():
    q = shuffle_queue(min_after_dequeue=2)
    enqueue(q, 10, 20, 30, 40)
    d, c = dequeue(q, 3, up_to=True)
    assert c == {}
    c = done(q.close())
    first = ints(c[d])
    assert len(first) == 3
    d, c = dequeue(q, 3, up_to=True)
    second = ints(c[d])
    assert sorted(first + second) == [10, 20, 30, 40]


def test_shuffle_queue_drains_completely_after_close():
    q = shuffle_queue(min_after_dequeue=5)
    enqueue(q, *range(8))
    got = []
    for _ in range(3):
        d, c = dequeue(q)
        got.extend(ints(c[d]))
    d, c = dequeue(q)
    assert c == {}
    c = done(q.close())
    got.extend(ints(c[d]))
    got.extend(take_all(q))
    assert sorted(got) == list(range(8))


def test_shuffle_queue_closed_dequeue_many_with_too_few_rows_fails_and_keeps_them():
    q = shuffle_queue(min_after_dequeue=0)
    enqueue(q, 10, 20, 30, 40)
    d, c = dequeue(q, 3)
    first = ints(c[d])
    assert len(first) == 3
    d2, c = dequeue(q, 3)
    assert c == {}
    c = done(q.close())
    assert isinstance(c[d2], OutOfRangeError)
    assert q.size() == 1
    (last,) = take_all(q)
    assert sorted(first + [last]) == [10, 20, 30, 40]


def test_shuffle_queue_with_a_seed_dequeues_in_a_reproducible_order_that_is_not_fifo():
    def order(seed):
        q = shuffle_queue(capacity=40, min_after_dequeue=5, seed=seed)
        enqueue(q, *range(30))
        got = []
        for _ in range(25):
            d, c = dequeue(q)
            got.extend(ints(c[d]))
        return got + take_all(q)

    a, b = order(1729), order(1729)
    assert a == b
    assert sorted(a) == list(range(30))
    assert a != list(range(30))
    assert order(87539319) != a


def test_shuffle_queue_dequeue_many_and_single_dequeues_give_different_orders_per_seed():
    results = []
    for seed in (1729, 87539319):
        q = shuffle_queue(min_after_dequeue=5, seed=seed)
        enqueue(q, 1, 2, 3, 4, 5)
        enqueue(q, 1, 2, 3, 4, 5)
        d, c = dequeue(q, 5)
        results.append(ints(c[d]))
        done(q.close())
        d, c = dequeue(q, 5)
        results.append(ints(c[d]))
    for i in range(len(results)):
        for j in range(i):
            assert results[i] != results[j]


def test_shuffle_queue_big_enqueue_many_fills_to_capacity_then_waits():
    q = shuffle_queue(capacity=5, min_after_dequeue=0)
    e, c = enqueue(q, *range(1, 11))
    assert c == {} and q.size() == 5
    got = []
    for _ in range(4):
        d, c = dequeue(q)
        got.extend(ints(c[d]))
        assert q.size() == 5 and e not in c
    d, c = dequeue(q)
    got.extend(ints(c[d]))
    assert c[e] == 10
    got.extend(take_all(q))
    assert sorted(got) == list(range(1, 11))


def test_shuffle_queue_cancelled_dequeue_many_returns_its_rows():
    q = shuffle_queue(min_after_dequeue=2)
    enqueue(q, *range(6))
    before = q.stats()
    d, c = dequeue(q, 8)
    assert c == {} and d.got == 4
    done(q.cancel(d, deadline()))
    assert q.stats() == before
    assert sorted(take_all(q)) == list(range(6))


# --------------------------------------------------------------------------- conservation


class _Driver:
    """Random enqueues, dequeues, cancels and a close against a model of the rows."""

    def __init__(self, kind, seed, put_back=False):
        self.rng = random.Random(seed)
        self.kind = kind
        self.cap = self.rng.randint(1, 6)
        self.mad = self.rng.randint(0, self.cap - 1) if kind == "shuffle" else 0
        kw = {"min_after_dequeue": self.mad, "seed": seed} if kind == "shuffle" else {}
        self.q = new_queue(kind, capacity=self.cap, **kw)
        self.put_back = put_back
        self.next_id = 0
        self.enqueues = []  # in arrival order
        self.pending = []  # waiting requests, in arrival order
        self.delivered = []  # row ids handed out, in completion order
        self.batches = []  # outcomes that could be put back
        self.reached_floor = False
        self.close_at = None  # step at which to close mid-run, if any

    def step_completions(self, completions, submitted=None):
        c = done(completions)
        for req, outcome in c.items():
            if req is not submitted:
                assert req in self.pending, f"{req.op} completed twice or was never submitted"
                self.pending.remove(req)
            if isinstance(req, EnqueueRequest):
                if isinstance(outcome, QueueError):
                    assert isinstance(outcome, (QueueClosedError, DeadlineExceededError))
                else:
                    assert outcome == req.total == req.done
            elif isinstance(outcome, QueueError):
                assert isinstance(outcome, (OutOfRangeError, DeadlineExceededError)), outcome
                assert req.got == 0
            else:
                got = ints(outcome)
                if req.n == 0:
                    assert got == []
                elif req.op == "dequeue_up_to":
                    assert 1 <= len(got) <= req.n
                    assert len(got) == req.n or self.q.closed
                else:
                    assert len(got) == req.n
                self.delivered.extend(got)
                if req.op != "dequeue" and got:
                    self.batches.append(outcome)
        if submitted is not None and submitted not in c:
            self.pending.append(submitted)

    def inserted(self):
        out = []
        for e in self.enqueues:
            out.extend(int(x) for x in e.block[0][: e.done])
        return out

    def check(self):
        q = self.q
        held = sum(r.got for r in self.pending if isinstance(r, DequeueRequest))
        assert q.size() == len(self.inserted()) - len(self.delivered) - held
        assert q.waiting() == (
            sum(isinstance(r, EnqueueRequest) for r in self.pending),
            sum(isinstance(r, DequeueRequest) for r in self.pending),
        )
        if self.kind == "shuffle" and not q.closed:
            if q.size() >= self.mad:
                self.reached_floor = True
            elif self.reached_floor:
                pytest.fail(f"open shuffle queue went below min_after_dequeue={self.mad}")

    def act(self):
        rng, q = self.rng, self.q
        r = rng.random()
        if r < 0.35:
            k = 1 if rng.random() < 0.5 else rng.randint(0, 2 * self.cap)
            block = [np.arange(self.next_id, self.next_id + k, dtype=np.int64)]
            self.next_id += k
            req = EnqueueRequest(block, op="enqueue" if k == 1 else "enqueue_many")
            self.enqueues.append(req)
            self.step_completions(q.enqueue(req), req)
        elif r < 0.7:
            kind = rng.choice(["dequeue", "many", "up_to"])
            n = None if kind == "dequeue" else rng.randint(0, 2 * self.cap)
            req = DequeueRequest(n, up_to=kind == "up_to")
            self.step_completions(q.dequeue(req), req)
        elif r < 0.88:
            if self.pending:
                req = rng.choice(self.pending)
                self.step_completions(q.cancel(req, deadline()))
        elif r < 0.95:
            if self.put_back and self.batches:
                rows = self.batches.pop(rng.randrange(len(self.batches)))
                for v in ints(rows):
                    self.delivered.remove(v)
                self.step_completions(q.put_back(rows))
        elif self.q.closed and self.rng.random() < 0.5:
            self.step_completions(q.close(cancel_pending_enqueues=True))

    def maybe_close(self, step):
        if step == self.close_at:
            self.step_completions(self.q.close(cancel_pending_enqueues=self.rng.random() < 0.5))

    def run(self, steps):
        # Half the runs close part-way through; all close at the end.
        self.close_at = self.rng.randint(steps // 2, 2 * steps)
        for step in range(steps):
            self.maybe_close(step)
            self.act()
            self.check()
        q = self.q
        self.step_completions(q.close(cancel_pending_enqueues=True))
        self.check()
        assert self.pending == [], [r.op for r in self.pending]
        req = DequeueRequest(q.size() + 1, up_to=True)
        self.step_completions(q.dequeue(req), req)
        assert q.size() == 0 and self.pending == []
        inserted = self.inserted()
        assert len(set(inserted)) == len(inserted)
        assert Counter(self.delivered) == Counter(inserted), "a row was lost or duplicated"
        if self.kind != "shuffle" and not self.put_back:
            assert self.delivered == inserted, "FIFO order was broken"
        assert q.enqueued == len(inserted)
        assert q.dequeued == len(self.delivered)


@pytest.mark.parametrize("kind", ["fifo", "shuffle", "padding"])
def test_random_interleavings_deliver_every_enqueued_row_exactly_once(kind):
    for seed in range(40):
        _Driver(kind, seed).run(150)


@pytest.mark.parametrize("kind", ["fifo", "shuffle"])
def test_random_interleavings_with_put_back_deliver_every_row_exactly_once(kind):
    for seed in range(40):
        _Driver(kind, seed, put_back=True).run(150)


# --------------------------------------------------------------------------- padding


def padding_queue(**kw):
    return new_queue("padding", dtypes=("float32", "string", "int64"),
                     shapes=((None, 2), (None,), ()), **kw)


def test_padding_queue_single_dequeue_returns_the_item_unpadded():
    q = padding_queue()
    enqueue_block(q, np.ones((1, 3, 2), np.float32), np.array([[b"a"]], dtype=object), [7])
    enqueue_block(q, np.ones((1, 1, 2), np.float32), np.array([[b"b", b"cc", b"d"]], dtype=object), [8])
    d, c = dequeue(q)
    f, s, i = c[d]
    assert f.shape == (3, 2) and s.shape == (1,) and int(i) == 7
    d, c = dequeue(q)
    f, s, i = c[d]
    assert f.shape == (1, 2) and s.tolist() == [b"b", b"cc", b"d"]


def test_padding_queue_dequeue_many_pads_every_unknown_dimension_with_zeros_to_the_batch_max():
    q = padding_queue()
    enqueue_block(q, np.full((1, 1, 2), 1, np.float32), np.array([[b"a", b"b"]], dtype=object), [1])
    enqueue_block(q, np.full((1, 3, 2), 2, np.float32), np.array([[b"c"]], dtype=object), [2])
    enqueue_block(q, np.full((1, 2, 2), 3, np.float32), np.array([[b"d", b"e", b"f"]], dtype=object), [3])
    d, c = dequeue(q, 3)
    f, s, i = c[d]
    assert f.shape == (3, 3, 2) and f.dtype == np.float32
    np.testing.assert_array_equal(f[0], [[1, 1], [0, 0], [0, 0]])
    np.testing.assert_array_equal(f[1], [[2, 2], [2, 2], [2, 2]])
    np.testing.assert_array_equal(f[2], [[3, 3], [3, 3], [0, 0]])
    assert s.shape == (3, 3) and s.dtype == object
    assert s.tolist() == [[b"a", b"b", b""], [b"c", b"", b""], [b"d", b"e", b"f"]]
    assert i.tolist() == [1, 2, 3]


def test_padding_queue_pads_several_unknown_dimensions_independently():
    q = new_queue("padding", dtypes=("int32",), shapes=((None, None),))
    enqueue_block(q, np.ones((1, 1, 3), np.int32))
    enqueue_block(q, np.full((1, 2, 1), 2, np.int32))
    d, c = dequeue(q, 2)
    (a,) = c[d]
    assert a.shape == (2, 2, 3)
    np.testing.assert_array_equal(a[0], [[1, 1, 1], [0, 0, 0]])
    np.testing.assert_array_equal(a[1], [[2, 0, 0], [2, 0, 0]])


def test_padding_queue_dequeue_up_to_after_close_pads_the_remainder():
    q = new_queue("padding", dtypes=("int64",), shapes=((None,),))
    enqueue_block(q, [[1]])
    enqueue_block(q, [[2, 2]])
    done(q.close())
    d, c = dequeue(q, 5, up_to=True)
    assert c[d][0].tolist() == [[1, 0], [2, 2]]


def test_padding_queue_batch_of_equal_shapes_is_returned_unpadded():
    q = new_queue("padding", dtypes=("int64",), shapes=((None,),))
    enqueue_block(q, [[1, 2], [3, 4]])
    enqueue_block(q, [[5, 6]])
    d, c = dequeue(q, 3)
    assert c[d][0].tolist() == [[1, 2], [3, 4], [5, 6]]


def test_padding_queue_closed_dequeue_many_with_too_few_rows_keeps_them_unpadded():
    q = new_queue("padding", dtypes=("int64",), shapes=((None,),))
    enqueue_block(q, [[1]])
    enqueue_block(q, [[2, 2]])
    d, _ = dequeue(q, 3)
    c = done(q.close())
    assert isinstance(c[d], OutOfRangeError)
    d, c = dequeue(q)
    assert c[d][0].tolist() == [1]
    d, c = dequeue(q)
    assert c[d][0].tolist() == [2, 2]


# --------------------------------------------------------------------------- unknown shapes, strings


def test_fifo_dequeue_many_of_rows_with_different_shapes_fails_and_the_rows_stay_in_order():
    q = new_queue(dtypes=("float32",), shapes=((None,),), name="ragged")
    enqueue_block(q, np.array([[1.0]], np.float32))
    enqueue_block(q, np.array([[2.0, 2.0]], np.float32))
    enqueue_block(q, np.array([[3.0]], np.float32))
    before = q.stats()
    d, c = dequeue(q, 2)
    assert isinstance(c[d], InvalidArgumentError)
    msg = str(c[d])
    assert "'ragged'" in msg and "[1]" in msg and "[2]" in msg and "padding" in msg
    assert q.stats() == before
    shapes = []
    for _ in range(3):
        r, c = dequeue(q)
        shapes.append(c[r][0].tolist())
    assert shapes == [[1.0], [2.0, 2.0], [3.0]]


def test_fifo_with_unknown_rank_refuses_to_stack_rows_of_different_ranks():
    q = new_queue(dtypes=("int64",), shapes=None)
    enqueue_block(q, np.array([5]))
    enqueue_block(q, np.array([[1, 2]]))
    d, c = dequeue(q, 2)
    assert isinstance(c[d], InvalidArgumentError)
    assert q.size() == 2
    d, c = dequeue(q, 1)
    assert c[d][0].tolist() == [5]


def test_fifo_with_unknown_shapes_stacks_rows_that_agree():
    q = new_queue(dtypes=("int64",), shapes=((None,),))
    enqueue_block(q, [[1, 2]])
    enqueue_block(q, [[3, 4], [5, 6]])
    d, c = dequeue(q, 3)
    assert c[d][0].tolist() == [[1, 2], [3, 4], [5, 6]]


def test_a_failed_dequeue_many_does_not_block_the_waiter_behind_it():
    q = new_queue(dtypes=("int64",), shapes=((None,),))
    first, _ = dequeue(q, 2)
    second, _ = dequeue(q)
    e, c = enqueue_block(q, [[1]])
    assert first not in c
    e, c = enqueue_block(q, [[2, 2]])
    assert isinstance(c[first], InvalidArgumentError)
    assert c[second][0].tolist() == [1]
    assert q.size() == 1
    r, c = dequeue(q)
    assert c[r][0].tolist() == [2, 2]


def test_string_components_round_trip_through_the_queue():
    q = new_queue(dtypes=("string", "int64"), shapes=((2,), ()))
    strings = np.empty((3, 2), dtype=object)
    strings[:] = [[b"", b"a"], [b"\x00\xff", "é".encode()], [b"long" * 100, b"x"]]
    enqueue_block(q, strings, [1, 2, 3])
    d, c = dequeue(q, 2)
    s, i = c[d]
    assert s.dtype == object and s.shape == (2, 2)
    assert s.tolist() == strings[:2].tolist()
    d, c = dequeue(q)
    s, i = c[d]
    assert s.tolist() == [b"long" * 100, b"x"] and int(i) == 3


@pytest.mark.parametrize("dtype", [
    "float32", "int64", "bool", "complex64",
    pytest.param("string"),
])
def test_single_dequeue_of_a_scalar_component_is_an_array_that_wire_can_send(dtype):
    q = new_queue(dtypes=(dtype,), shapes=((),))
    if dtype == "string":
        block = np.array([b"ab", b"c"], dtype=object)
    else:
        block = np.array([1, 0]).astype(dtype)
    enqueue_block(q, block)
    d, c = dequeue(q)
    (value,) = c[d]
    assert getattr(value, "dtype", None) == block.dtype
    assert np.shape(value) == ()
    frames = wire.encode({"id": 1}, list(c[d]))
    _, arrays = wire.decode(to_bytes(frames))
    assert arrays[0].shape == () and arrays[0][()] == block[0]


# --------------------------------------------------------------------------- stats


def test_stats_count_rows_enqueued_and_dequeued_and_waiting_requests():
    q = new_queue(capacity=3, name="s")
    assert q.stats() == {
        "kind": "fifo", "size": 0, "capacity": 3, "closed": False, "enqueued": 0,
        "dequeued": 0, "waiting_enqueues": 0, "waiting_dequeues": 0,
    }
    enqueue(q, 1, 2, 3, 4, 5)
    s = q.stats()
    assert (s["size"], s["enqueued"], s["waiting_enqueues"]) == (3, 3, 1)
    dequeue(q, 2)
    s = q.stats()
    assert (s["size"], s["enqueued"], s["dequeued"], s["waiting_enqueues"]) == (3, 5, 2, 0)
    d, _ = dequeue(q, 5)
    s = q.stats()
    assert (s["size"], s["dequeued"], s["waiting_dequeues"]) == (0, 2, 1), \
        "rows held by a waiting dequeue are not counted as dequeued"
    done(q.close())
    s = q.stats()
    assert s["closed"] and s["size"] == 3 and s["dequeued"] == 2 and s["waiting_dequeues"] == 0
    d, _ = dequeue(q, 3)
    assert q.stats()["dequeued"] == 5 == q.stats()["enqueued"]


# --------------------------------------------------------------------------- QueueSpec.make


@pytest.mark.parametrize("kwargs, fragment", [
    ({"capacity": 0}, "capacity must be an integer >= 1, got 0"),
    ({"capacity": -3}, "capacity must be an integer >= 1"),
    ({"capacity": 2.5}, "capacity must be an integer >= 1"),
    ({"capacity": True}, "capacity must be an integer >= 1"),
    ({"kind": "lifo"}, "kind 'lifo' is not one of fifo, shuffle, padding"),
    ({"kind": "shuffle", "min_after_dequeue": 10}, "min_after_dequeue (10) must be less than capacity (10)"),
    ({"kind": "shuffle", "min_after_dequeue": 11}, "must be less than capacity"),
    ({"kind": "shuffle", "min_after_dequeue": -1}, "min_after_dequeue must be an integer >= 0"),
    ({"min_after_dequeue": 2}, "min_after_dequeue applies to shuffle queues only"),
    ({"kind": "padding"}, "padding queue needs a shape of known rank"),
    ({"kind": "padding", "shapes": [None]}, "padding queue needs a shape of known rank"),
    ({"dtypes": ["bogus"]}, "dtypes[0]: 'bogus' is not a dtype"),
    ({"dtypes": ["float32", "datetime64"]}, "dtypes[1]: 'datetime64' is not supported"),
    ({"dtypes": ["object"]}, "is not supported"),
    ({"dtypes": ["U4"]}, "is not supported"),
    ({"dtypes": []}, "dtypes must be a non-empty list"),
    ({"dtypes": "float32"}, "dtypes must be a non-empty list"),
    ({"shapes": [[], []]}, "1 dtypes but 2 shapes"),
    ({"shapes": [[-2]]}, "shapes[0][0]: expected a dimension >= 0 or None, got -2"),
    ({"shapes": [3]}, "shapes[0]: expected a list of dimensions"),
    ({"shapes": [[True]]}, "shapes[0][0]: expected a dimension >= 0 or None, got True"),
    ({"shapes": [[1] * 33]}, "shapes[0]: rank 33 exceeds the maximum 32"),
    ({"seed": 5}, "seed applies to shuffle queues only"),
    ({"kind": "padding", "shapes": [[None]], "seed": 5}, "seed applies to shuffle queues only"),
    ({"kind": "shuffle", "seed": -1}, "seed must be an integer >= 0"),
    ({"names": ["a", "b"]}, "names must be 1 non-empty strings"),
])
def test_queue_spec_make_rejects_a_bad_declaration_naming_the_queue(kwargs, fragment):
    args = {"kind": "fifo", "capacity": 10, "dtypes": ["float32"], "shapes": None}
    args.update(kwargs)
    with pytest.raises(InvalidArgumentError) as info:
        QueueSpec.make(args.pop("kind"), args.pop("capacity"), args.pop("dtypes"),
                       queue="images", **args)
    assert str(info.value).startswith("queue 'images': ")
    assert fragment in str(info.value)


@pytest.mark.parametrize("dtype", [
    pytest.param(None),
    pytest.param("(-1,)f4"),
    pytest.param("(99999999999999999,)f4"),
])
def test_queue_spec_make_rejects_odd_dtype_values_with_invalid_argument(dtype):
    with pytest.raises(InvalidArgumentError, match="queue 'images'"):
        QueueSpec.make("fifo", 10, [dtype], queue="images")


def test_queue_spec_make_normalises_names_and_compares_equal_for_the_same_declaration():
    a = QueueSpec.make("shuffle", 10, [np.float32, "string", "bytes"], [[2, -1], (), None],
                       min_after_dequeue=3, seed=1)
    b = QueueSpec.make("shuffle", 10, ["float32", "string", "string"], [(2, None), [], None],
                       min_after_dequeue=3, seed=1)
    assert a == b
    assert a.dtypes == ("float32", "string", "string")
    assert a.shapes == ((2, None), (), None)
    assert a != QueueSpec.make("shuffle", 10, ["float32", "string", "string"],
                               [(2, None), [], None], min_after_dequeue=3, seed=2)
    assert QueueSpec.from_wire(a.to_wire()) == a


def test_queue_spec_from_wire_rejects_unknown_keys_and_non_maps():
    with pytest.raises(InvalidArgumentError, match="queue 'x': unknown spec keys"):
        QueueSpec.from_wire({"kind": "fifo", "capacity": 1, "dtypes": ["int8"], "colour": 1}, "x")
    with pytest.raises(InvalidArgumentError, match="queue 'x': spec must be a map"):
        QueueSpec.from_wire([1, 2], "x")


# --------------------------------------------------------------------------- ItemChecker


def checker(dtypes=("float32",), shapes=((),), names=None, queue="items"):
    spec = QueueSpec.make("fifo", 10, list(dtypes), None if shapes is None else list(shapes),
                          names=names, queue=queue)
    return ItemChecker(spec, queue)


def test_item_checker_rejects_the_wrong_number_of_components_naming_both_counts():
    ic = checker(("float32", "int32"), ((), ()))
    with pytest.raises(InvalidArgumentError, match=r"queue 'items': item has 3 components, the queue takes 2"):
        ic.check_item((1.0, 2, 3))
    with pytest.raises(InvalidArgumentError, match=r"batch has 1 components, the queue takes 2"):
        ic.check_batch(([1.0],))
    with pytest.raises(InvalidArgumentError, match="must be a tuple of 2 components"):
        ic.check_item(1.0)


def test_item_checker_rejects_float_to_int_conversion():
    ic = checker(("int32",))
    with pytest.raises(InvalidArgumentError, match=r"component 0 expects int32, got float64.*lose"):
        ic.check_item((1.5,))
    with pytest.raises(InvalidArgumentError, match="expects int32"):
        ic.check_item((np.float32(2.0),))


def test_item_checker_accepts_float64_for_float32_and_converts():
    (a,) = checker(("float32",), ((3,),)).check_item((np.array([1.0, 2.5, np.inf]),))
    assert a.dtype == np.float32
    np.testing.assert_array_equal(a, [1.0, 2.5, np.inf])


def test_item_checker_rejects_a_float64_that_overflows_float32():
    with pytest.raises(InvalidArgumentError, match="component 0 expects float32, and a value overflows it"):
        checker(("float32",)).check_item((1e300,))


def test_item_checker_converts_int64_to_int32_only_when_every_value_fits():
    ic = checker(("int32",), ((None,),))
    (a,) = ic.check_item((np.array([1, -2, 2**31 - 1], np.int64),))
    assert a.dtype == np.int32 and a.tolist() == [1, -2, 2**31 - 1]
    with pytest.raises(InvalidArgumentError, match=f"expects int32, and value {2**40} does not fit"):
        ic.check_item((np.array([1, 2**40]),))
    with pytest.raises(InvalidArgumentError, match="does not fit"):
        ic.check_item((np.array([-(2**31) - 1]),))
    with pytest.raises(InvalidArgumentError, match="does not fit"):
        checker(("uint8",)).check_item((-1,))


def test_item_checker_converts_ints_and_bools_upwards_but_never_ints_to_bool():
    a, b = checker(("float64", "int32"), ((1,), (1,))).check_item(([3], [True]))
    assert a.dtype == np.float64 and b.dtype == np.int32 and b.tolist() == [1]
    with pytest.raises(InvalidArgumentError, match="expects bool"):
        checker(("bool",)).check_item((2,))



@pytest.mark.parametrize("item, dtype", [
    (1.5, "float64"),
    ((1.5,), "float32"),
    (np.float64(2.0), "float64"),
    (np.float32(2.0), "float64"),
    ((7,), "int32"),
    (True, "bool"),
])
def test_item_checker_accepts_python_and_numpy_scalars_for_scalar_components(item, dtype):
    (a,) = checker((dtype,), ((),)).check_item(item)
    assert a.shape == () and a.dtype == np.dtype(dtype)


def test_item_checker_keeps_a_scalar_zero_dimensional_when_the_shape_is_unknown():
    (a,) = checker(("float64",), None).check_item(1.5)
    assert a.shape == ()


def test_item_checker_rejects_a_python_scalar_as_a_batch_component():
    with pytest.raises(InvalidArgumentError, match="needs a leading batch dimension, got a scalar"):
        checker(("int32", "int32"), ((), ())).check_batch((7, [1]))


def test_item_checker_accepts_a_zero_dimensional_array_of_the_queue_dtype():
    (a,) = checker(("float64",), ((),)).check_item(np.asarray(1.5))
    assert a.shape == () and float(a) == 1.5


def test_item_checker_rejects_a_shape_mismatch():
    ic = checker(("float32",), ((2,),))
    with pytest.raises(InvalidArgumentError, match=r"component 0 has shape \[3\], the queue expects \[2\]"):
        ic.check_item((np.zeros(3),))
    with pytest.raises(InvalidArgumentError, match=r"items have shape \[3\], the queue expects \[2\]"):
        ic.check_batch((np.zeros((4, 3)),))
    (a,) = checker(("float32",), ((None, 3),)).check_item((np.zeros((5, 3)),))
    assert a.shape == (5, 3)


def test_item_checker_rejects_batch_components_that_disagree_on_the_batch_size():
    ic = checker(("int32", "int32", "int32"), ((), (), ()))
    with pytest.raises(InvalidArgumentError, match="component 0 has 3, component 1 has 2"):
        ic.check_batch(([1, 2, 3], [1, 2], [1, 2, 3]))
    with pytest.raises(InvalidArgumentError, match="needs a leading batch dimension, got a scalar"):
        ic.check_batch((np.asarray(7, np.int32), [1], [1]))
    comps, n = ic.check_batch(([1, 2], [3, 4], [5, 6]))
    assert n == 2 and [c.tolist() for c in comps] == [[1, 2], [3, 4], [5, 6]]


def test_item_checker_accepts_a_bare_array_for_a_one_component_queue():
    ic = checker(("float32",), ((2,),))
    (a,) = ic.check_item(np.array([1.0, 2.0]))
    assert a.tolist() == [1.0, 2.0]
    comps, n = checker(("int64",), ((),)).check_batch(np.arange(4))
    assert n == 4 and comps[0].tolist() == [0, 1, 2, 3]


def test_item_checker_rejects_a_list_of_two_floats_for_a_one_component_queue_with_the_wrap_hint():
    ic = checker(("float32",), ((2,),))
    with pytest.raises(InvalidArgumentError, match=r"has 2 components, the queue takes 1; .*wrap it"):
        ic.check_item([1.0, 2.0])
    (a,) = ic.check_item(([1.0, 2.0],))
    assert a.tolist() == [1.0, 2.0]


def test_item_checker_takes_dict_items_by_component_name():
    ic = checker(("float32", "int32", "string"), ((1,), (None,), ()), names=("f", "i", "s"))
    f, i, s = ic.check_item({"i": [123], "s": "aa", "f": [10.0]})
    assert f.tolist() == [10.0] and i.tolist() == [123] and s.shape == () and s[()] == b"aa"
    comps, n = ic.check_batch({"f": [[1.0], [2.0]], "i": [[1], [2]], "s": ["x", "y"]})
    assert n == 2 and comps[2].tolist() == [b"x", b"y"]
    with pytest.raises(InvalidArgumentError, match=r"has keys \['f', 'x'\].*\['f', 'i', 's'\]"):
        ic.check_item({"f": 1.0, "x": 2})
    with pytest.raises(InvalidArgumentError, match="is a dict but the queue has no component names"):
        checker().check_item({"a": 12.0})


def test_item_checker_encodes_str_as_utf8_bytes_for_string_components():
    ic = checker(("string",), ((None,),))
    (a,) = ic.check_item((["é", b"raw", np.bytes_(b"np"), bytearray(b"ba")],))
    assert a.dtype == object
    assert a.tolist() == ["é".encode(), b"raw", b"np", b"ba"]
    assert all(type(x) in (bytes, np.bytes_) for x in a)
    with pytest.raises(InvalidArgumentError, match="component 0 holds strings, got a int element"):
        ic.check_item(([b"a", 3],))


def test_item_checker_rejects_strings_for_a_numeric_component():
    with pytest.raises(InvalidArgumentError, match="expects float32, got strings"):
        checker().check_item(("1.0",))


def test_item_checker_returns_contiguous_arrays():
    view = np.arange(12, dtype=np.float32).reshape(3, 4).T
    (a,) = checker(("float32",), ((4, 3),)).check_item((view,))
    assert a.flags.c_contiguous
    np.testing.assert_array_equal(a, view)


def test_item_checker_rejects_a_ragged_list_with_an_invalid_argument_naming_the_queue():
    with pytest.raises(InvalidArgumentError, match="queue 'items'"):
        checker(("float32",), ((None,),)).check_item(([[1.0, 2.0], [3.0]],))


# --------------------------------------------------------------------------- pad_stack


def test_pad_stack_pads_unknown_dimensions_with_zeros_and_leaves_fixed_ones():
    parts = [np.ones((2, 1, 3), np.int16), np.full((1, 2, 3), 5, np.int16)]
    out = pad_stack(parts, (None, 3))
    assert out.shape == (3, 2, 3) and out.dtype == np.int16
    np.testing.assert_array_equal(out[:, 1], [[0, 0, 0], [0, 0, 0], [5, 5, 5]])


def test_pad_stack_pads_strings_with_empty_bytes():
    a = np.empty((1, 1), dtype=object)
    a[0, 0] = b"x"
    b = np.empty((1, 3), dtype=object)
    b[0] = [b"p", b"q", b"r"]
    out = pad_stack([a, b], (None,))
    assert out.tolist() == [[b"x", b"", b""], [b"p", b"q", b"r"]]


def test_pad_stack_returns_a_single_fully_known_part_as_is():
    part = np.arange(6).reshape(3, 2)
    assert pad_stack([part], (2,)) is part


# --------------------------------------------------------------------------- wire


def to_bytes(frames):
    """What the frames look like after crossing a socket."""
    return [f.tobytes() if isinstance(f, np.ndarray) else bytes(f) for f in frames]


NUMERIC = ["bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
           "float16", "float32", "float64", "complex64", "complex128", ">f8", ">i4"]


@pytest.mark.parametrize("dtype", NUMERIC)
@pytest.mark.parametrize("shape", [(), (0,), (3,), (2, 0, 4), (2, 3, 4)])
def test_wire_round_trips_numeric_arrays_of_every_dtype_and_shape(dtype, shape):
    rng = np.random.default_rng(0)
    a = (rng.integers(-10, 10, size=shape) * 1.5).astype(dtype)
    if np.dtype(dtype).kind == "c":
        a = a + 1j * a
    header = {"op": "enqueue", "id": 3, "queue": "q"}
    header_out, arrays = wire.decode(to_bytes(wire.encode(dict(header), [a])))
    assert {k: header_out[k] for k in header} == header
    (b,) = arrays
    assert b.dtype == a.dtype and b.shape == a.shape
    np.testing.assert_array_equal(b, a)


def test_wire_round_trips_several_arrays_in_order_and_non_contiguous_input():
    a = np.arange(12, dtype=np.float32).reshape(3, 4).T
    b = np.array([1, 2], np.int8)
    _, out = wire.decode(to_bytes(wire.encode({"id": 1}, [a, b])))
    np.testing.assert_array_equal(out[0], a)
    assert out[1].tolist() == [1, 2]


def test_wire_round_trips_a_header_without_arrays():
    frames = wire.encode({"id": 9, "ok": True, "size": 4})
    assert len(frames) == 1
    header, arrays = wire.decode(to_bytes(frames))
    assert header == {"id": 9, "ok": True, "size": 4} and arrays == []


@pytest.mark.parametrize("shape", [(), (0,), (3,), (2, 2)])
def test_wire_round_trips_string_arrays(shape):
    values = [b"", b"a", b"\x00\xff", "é".encode(), b"xyz" * 50]
    a = np.empty(shape, dtype=object)
    flat = a.reshape(-1)
    for i in range(flat.size):
        flat[i] = values[i % len(values)]
    _, (b,) = wire.decode(to_bytes(wire.encode({"id": 1}, [a])))
    assert b.dtype == object and b.shape == a.shape
    assert b.tolist() == a.tolist()


def test_wire_decodes_numeric_frames_without_copying():
    frames = to_bytes(wire.encode({"id": 1}, [np.arange(4, dtype=np.int64)]))
    frames[1] = bytearray(frames[1])
    _, (a,) = wire.decode(frames)
    frames[1][0] = 9
    assert a[0] == 9


def test_wire_error_header_carries_the_code_and_message_and_rebuilds_the_class():
    for code, cls in CODES.items():
        header, _ = wire.decode(wire.encode(wire.error_header(5, cls("queue 'q': boom"))))
        err = error_from_code(header["error"], header["message"])
        assert type(err) is cls and err.code == code and str(err) == "queue 'q': boom"
    assert type(error_from_code(999, "x")) is QueueError
    assert type(error_from_code("2", "x")) is QueueError


def header_frame(arrays):
    return msgpack.packb({"id": 1, "arrays": arrays}, use_bin_type=True)


@pytest.mark.parametrize("frames, message", [
    ([], "empty message"),
    ([b"\xc1"], "header frame is not valid msgpack"),
    ([b"\x93\x01\x02"], "header frame is not valid msgpack"),
    ([msgpack.packb({1: 2})], "header frame is not valid msgpack"),
    ([msgpack.packb([1, 2])], "header must be a msgpack map, got list"),
    ([msgpack.packb("op")], "header must be a msgpack map, got str"),
    ([msgpack.packb({"arrays": {"a": 1}})], "header 'arrays' must be a list, got dict"),
    ([header_frame([["<f4", [1]]])], "describes 1 arrays but the message has 0 data frames"),
    ([header_frame([]), b"\0" * 4], "describes 0 arrays but the message has 1 data frames"),
    ([header_frame([["<f4", [3]]]), b"\0" * 8], "float32[3] needs 12 bytes but the frame has 8"),
    ([header_frame([["<f4", []]]), b""], "needs 4 bytes but the frame has 0"),
    ([header_frame([["<f4"]]), b""], "expected [dtype, shape]"),
    ([header_frame(["<f4"]), b""], "expected [dtype, shape]"),
    ([header_frame([["<f4", [1], [4], 0]]), b"\0" * 4], "expected [dtype, shape]"),
    ([header_frame([[4, [1]]]), b"\0" * 4], "dtype must be a string"),
    ([header_frame([["bogus", [1]]]), b"\0" * 4], "'bogus' is not a dtype"),
    ([header_frame([["|O", [1]]]), b"\0" * 8], "dtype '|O' is not supported"),
    ([header_frame([["<U1", [1]]]), b"\0" * 4], "is not supported"),
    ([header_frame([["|S4", [1]]]), b"\0" * 4], "is not supported"),
    ([header_frame([["<M8[ns]", [1]]]), b"\0" * 8], "is not supported"),
    ([header_frame([["(2,)<f4", [1]]]), b"\0" * 8], "is not supported"),
    ([header_frame([["<f4,<i4", [1]]]), b"\0" * 8], "is not supported"),
    ([header_frame([["<f4", [-1]]]), b""], "shape must be a list of at most 32 ints >= 0"),
    ([header_frame([["<f4", [1.5]]]), b""], "shape must be a list"),
    ([header_frame([["<f4", [True]]]), b"\0" * 4], "shape must be a list"),
    ([header_frame([["<f4", 4]]), b""], "shape must be a list"),
    ([header_frame([["<f4", [1] * 33]]), b"\0" * 4], "at most 32"),
    ([header_frame([["<f4", [2**40, 2**40]]]), b"\0" * 4], "needs 4835703278458516698824704 bytes"),
    ([header_frame([["string", [2], [1, 1]]]), b"abc"], "lengths add up to 2 bytes but the frame has 3"),
    ([header_frame([["string", [2], [1]]]), b"a"], "needs one length >= 0 per element"),
    ([header_frame([["string", [1], [-1]]]), b""], "needs one length >= 0 per element"),
    ([header_frame([["string", [1]]]), b"a"], "needs one length >= 0 per element"),
    ([header_frame([["string", [2**40], [1]]]), b"a"], "needs one length >= 0 per element"),
])
def test_wire_decode_rejects_malformed_messages_with_protocol_error(frames, message):
    with pytest.raises(ProtocolError) as info:
        wire.decode(frames)
    assert message in str(info.value)


@pytest.mark.parametrize("dtype", [
    pytest.param("(-1,)f4"),
    pytest.param("(99999999999999999,)f4"),
    pytest.param("a"),
])
def test_wire_decode_rejects_dtype_strings_numpy_refuses_oddly_with_protocol_error(dtype):
    with pytest.raises(ProtocolError):
        wire.decode([header_frame([[dtype, [1]]]), b"\0" * 4])


def test_wire_decode_rejects_a_message_over_the_size_limit():
    frames = to_bytes(wire.encode({"id": 1}, [np.zeros(100, np.uint8)]))
    total = sum(len(f) for f in frames)
    with pytest.raises(MessageTooLargeError, match=f"message of {total} bytes exceeds the maximum "
                                                   "message size of 50 bytes"):
        wire.decode(frames, max_message_size=50)
    header, (a,) = wire.decode(frames, max_message_size=total)
    assert a.size == 100
    wire.decode(frames, max_message_size=None)


def test_wire_decode_rejects_an_oversized_header_before_parsing_it():
    big = b"\x00" * (wire.MAX_HEADER_SIZE + 1)
    with pytest.raises(MessageTooLargeError, match=re.escape(f"header of {len(big)} bytes exceeds")):
        wire.decode([big], max_message_size=None)
