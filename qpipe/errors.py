# Leaf module: imports nothing from qpipe. Everything else may import it.
"""The qpipe exception tree, and the stable wire code of each class.

Errors cross the wire as ``(code, message)`` and are rebuilt on the client
from :data:`CODES`; an unknown code becomes the base class. Nothing is ever
pickled.

Tree::

    QueueError                          (code 1)
    ├── OutOfRangeError                 (code 2)
    ├── QueueClosedError                (code 3)
    ├── DeadlineExceededError           (code 4, also TimeoutError)
    ├── InvalidArgumentError            (code 5, also ValueError)
    │   └── MessageTooLargeError        (code 6)
    ├── NotFoundError                   (code 7, also LookupError)
    ├── UnavailableError                (code 8, also ConnectionError)
    │   └── NoReplyError                (code 11, also DeadlineExceededError)
    ├── ProtocolError                   (code 9)
    └── InternalError                   (code 10)
"""

from __future__ import annotations

__all__ = [
    "CODES",
    "DeadlineExceededError",
    "InternalError",
    "InvalidArgumentError",
    "MessageTooLargeError",
    "NoReplyError",
    "NotFoundError",
    "OutOfRangeError",
    "ProtocolError",
    "QueueClosedError",
    "QueueError",
    "UnavailableError",
    "error_from_code",
]


class QueueError(Exception):
    """Base class of every error a queue operation raises.

    Catch this to handle any failure of qpipe's queues at once.
    """

    code = 1


class OutOfRangeError(QueueError):
    """Raised when a dequeue needs more items than a closed queue will ever hold.

    Example: ``q.close(); q.dequeue()`` on an empty queue. A failed
    ``dequeue_many`` leaves the items it saw in the queue.
    """

    code = 2


class QueueClosedError(QueueError):
    """Raised when an enqueue meets a closed queue.

    Example: ``q.close(); q.enqueue(x)``; or an enqueue that was waiting for
    room when ``close(cancel_pending_enqueues=True)`` cancelled it; or closing
    an already closed queue without ``cancel_pending_enqueues``.
    """

    code = 3


class DeadlineExceededError(QueueError, TimeoutError):
    """Raised when a blocking call's timeout expires; the queue is left unchanged.

    Example: ``q.dequeue(timeout=0.1)`` on an empty open queue. The one
    exception is ``enqueue_many``: items it had already inserted stay in the
    queue, and the message says how many.
    """

    code = 4


class InvalidArgumentError(QueueError, ValueError):
    """Raised when an item, a request or a queue declaration is wrong.

    Example: wrong number of components, a dtype that cannot be converted
    without loss, a shape that does not match the queue's, or declaring an
    existing queue name with another spec.
    """

    code = 5


class MessageTooLargeError(InvalidArgumentError):
    """Raised when a message is larger than the queue host accepts.

    Example: enqueueing a 2 GiB item on a host started with
    ``max_message_size=1 << 30``.
    """

    code = 6


class NotFoundError(QueueError, LookupError):
    """Raised when a request names a queue the host does not hold.

    Example: ``client.queue("nope")`` before anyone declared ``"nope"``.
    """

    code = 7


class UnavailableError(QueueError, ConnectionError):
    """Raised when the queue host does not answer: down, unreachable or stopped.

    Example: a dequeue on ``tcp://127.0.0.1:1`` where nothing listens.
    """

    code = 8


class NoReplyError(UnavailableError, DeadlineExceededError):
    """Raised when a call's timeout passed without any reply from the queue host.

    Example: ``q.dequeue(timeout=1)`` against a host that is down or
    unreachable. It is both a :class:`DeadlineExceededError` (the timeout
    expired) and an :class:`UnavailableError` (the host did not answer).
    """

    code = 11


class ProtocolError(QueueError):
    """Raised when a message does not follow qpipe's wire format.

    Example: raw bytes sent to a queue host by something that is not a
    qpipe client.
    """

    code = 9


class InternalError(QueueError):
    """Raised when the queue host failed while serving a request (a bug).

    The message carries the host's exception text.
    """

    code = 10


CODES: dict[int, type[QueueError]] = {
    cls.code: cls
    for cls in (
        QueueError,
        OutOfRangeError,
        QueueClosedError,
        DeadlineExceededError,
        InvalidArgumentError,
        MessageTooLargeError,
        NotFoundError,
        UnavailableError,
        NoReplyError,
        ProtocolError,
        InternalError,
    )
}


def error_from_code(code: object, message: str) -> QueueError:
    """Rebuild an error received as ``(code, message)``; unknown codes give the base class."""
    cls = CODES.get(code, QueueError) if isinstance(code, int) else QueueError
    return cls(message)
