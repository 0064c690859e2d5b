"""qpipe: machine-learning pipelines as processes that talk through ZeroMQ-hosted queues.

The queues follow TensorFlow 1.x's semantics (FIFO, random-shuffle and
padding FIFO queues; blocking enqueue/dequeue with timeouts; close and
cancel). A :class:`QueueServer` hosts named queues on one endpoint;
:func:`connect` and :func:`aconnect` return blocking and asyncio clients.
"""

from .client import AsyncClient, AsyncQueue, Client, Queue, aconnect, connect
from .errors import (
    DeadlineExceededError,
    InternalError,
    InvalidArgumentError,
    MessageTooLargeError,
    NoReplyError,
    NotFoundError,
    OutOfRangeError,
    ProtocolError,
    QueueClosedError,
    QueueError,
    UnavailableError,
)
from .host import QueueServer
from .spec import QueueSpec

__version__ = "0.1.0"

__all__ = [
    "AsyncClient",
    "AsyncQueue",
    "Client",
    "DeadlineExceededError",
    "InternalError",
    "InvalidArgumentError",
    "MessageTooLargeError",
    "NoReplyError",
    "NotFoundError",
    "OutOfRangeError",
    "ProtocolError",
    "Queue",
    "QueueClosedError",
    "QueueError",
    "QueueServer",
    "QueueSpec",
    "UnavailableError",
    "aconnect",
    "connect",
]
