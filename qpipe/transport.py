# ZeroMQ sockets and addresses; knows nothing about queues. Imports zmq and qpipe.errors only.
"""Sockets for the queue host (ROUTER) and its clients (DEALER).

The host binds one ROUTER socket; every client thread or event loop owns one
DEALER socket. Options set here, and why:

* ``LINGER 0``: closing never blocks on unsent messages (a client that
  gives up must not hang at exit).
* ``MAXMSGSIZE``: ZeroMQ drops a peer that sends a larger frame before it is
  buffered, so a hostile peer cannot make the host allocate without bound.
  qpipe's own size check (:func:`qpipe.wire.decode`) answers with an error
  for messages under this cap.
* ``ROUTER_MANDATORY`` on the host: a reply to a client that has gone raises
  instead of vanishing, so the host can put the rows back in the queue.
* ``SNDHWM 0`` on the host: replies are never dropped; they are bounded by the
  requests clients have outstanding.
"""

from __future__ import annotations

import os
import re
from typing import Any

import zmq

from .errors import InvalidArgumentError

__all__ = ["bind_router", "check_address", "connect_dealer", "default_context", "recv_frames", "send_frames"]

# NOTE: plain ints, not zmq's enum flags: pyzmq's send_multipart/recv_multipart
# combine enum flags and query RCVMORE for every frame, which costs more than
# the frame itself for small messages.
_NOBLOCK = int(zmq.NOBLOCK)
_SNDMORE = int(zmq.SNDMORE)


def send_frames(sock: zmq.Socket, frames: list[Any], copy: bool = True, block: bool = True) -> None:
    """Send a multipart message; ``copy=False`` sends large buffers without copying.

    Raises ``zmq.Again`` when ``block`` is false and the message cannot be queued.
    """
    flags = 0 if block else _NOBLOCK
    send = sock.send
    last = len(frames) - 1
    for i, f in enumerate(frames):
        send(f, flags | _SNDMORE if i < last else flags, copy=copy)


def recv_frames(sock: zmq.Socket, block: bool = True) -> list[Any]:
    """Receive a multipart message as ``zmq.Frame`` objects (no copy).

    Raises ``zmq.Again`` when ``block`` is false and no message is waiting.
    """
    flags = 0 if block else _NOBLOCK
    f = sock.recv(flags, copy=False)
    frames = [f]
    while f.more:
        f = sock.recv(flags, copy=False)
        frames.append(f)
    return frames

_ADDRESS = re.compile(r"^(tcp|ipc|inproc)://(.+)$")
_IPC_MAX = 107  # sizeof(sockaddr_un.sun_path) - 1 on Linux


def default_context() -> zmq.Context:
    """The process's shared ZeroMQ context (``inproc://`` needs one context on both ends)."""
    return zmq.Context.instance()


def check_address(address: str) -> str:
    """Return ``address`` if it is a tcp://, ipc:// or inproc:// endpoint, else raise.

    Raises :class:`InvalidArgumentError` naming the address and the fix.
    """
    if not isinstance(address, str):
        raise InvalidArgumentError(f"address must be a string like 'tcp://127.0.0.1:5555', got {address!r}")
    m = _ADDRESS.match(address)
    if not m:
        raise InvalidArgumentError(
            f"address {address!r} is not a ZeroMQ endpoint; use tcp://HOST:PORT, ipc://PATH or inproc://NAME"
        )
    scheme, rest = m.groups()
    if scheme == "tcp":
        host, sep, port = rest.rpartition(":")
        if not sep or not host or not (port == "*" or port.isdigit()) or (port.isdigit() and int(port) > 65535):
            raise InvalidArgumentError(f"address {address!r}: expected tcp://HOST:PORT with PORT in 0..65535")
    if scheme == "ipc" and len(rest) > _IPC_MAX:
        raise InvalidArgumentError(
            f"address {address!r}: ipc paths are limited to {_IPC_MAX} bytes; use a shorter path"
        )
    return address


def bind_router(ctx: zmq.Context, address: str, max_message_size: int) -> tuple[zmq.Socket, str]:
    """Bind a host socket; return it and the address clients should connect to.

    ``tcp://HOST:0`` picks a free port; the returned address names it.
    """
    check_address(address)
    bind_to = address
    if address.startswith("tcp://") and address.endswith(":0"):
        bind_to = address[:-2] + ":*"
    sock = ctx.socket(zmq.ROUTER)
    try:
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, max_message_size)
        if address.startswith("ipc://"):
            parent = os.path.dirname(address[len("ipc://") :])
            if parent and not os.path.isdir(parent):
                raise InvalidArgumentError(f"cannot bind {address!r}: directory {parent!r} does not exist")
        try:
            sock.bind(bind_to)
        except zmq.ZMQError as e:
            raise InvalidArgumentError(f"cannot bind {address!r}: {e.strerror}") from None
        bound = sock.getsockopt(zmq.LAST_ENDPOINT).decode()
    except BaseException:
        sock.close(0)
        raise
    if bound.startswith("tcp://0.0.0.0:") and not address.startswith("tcp://0.0.0.0"):
        bound = address.rsplit(":", 1)[0] + ":" + bound.rsplit(":", 1)[1]
    return sock, bound


def connect_dealer(ctx: zmq.Context | Any, address: str, max_message_size: int) -> zmq.Socket:
    """A client socket connected to a host; connecting never blocks (ZeroMQ connects lazily)."""
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, max_message_size)
    sock.connect(address)
    return sock
