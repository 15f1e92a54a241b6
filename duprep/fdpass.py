"""Control channel between the acceptor and its receiver and sender.

An ``AF_UNIX``/``SOCK_SEQPACKET`` socketpair per child.  Every message is one
fixed 12-byte record ``(op, sid, generation)``; an ``OP_CONN`` record also
carries exactly one descriptor (SCM_RIGHTS): the client socket of that slot.
SEQPACKET keeps records apart, so a descriptor always arrives with its own
record (on SOCK_STREAM sends coalesce and a zero-byte payload never delivers
the descriptor: pitfalls.md).

Receiving checks what ``socket.recv_fds`` does not: ``MSG_CTRUNC`` (the
receiver ran out of descriptors and the kernel dropped it), the record size
and the descriptor count.  Any descriptor received alongside a bad record is
closed before raising, so nothing leaks.
"""

from __future__ import annotations

import array
import errno
import os
import socket
import struct
from typing import Final, NamedTuple

from .errors import BrokenResourceError, ProtocolError, WouldBlock

__all__ = ["Op", "Record", "send", "recv", "pair", "InFlightLimit"]


class InFlightLimit(WouldBlock):
    """The kernel refused a descriptor (ETOOMANYREFS): for a user without CAP_SYS_RESOURCE or
    CAP_SYS_ADMIN, descriptors sent over Unix sockets and not yet received count against the
    sender's RLIMIT_NOFILE.  It passes once the peer takes some; the socket never reports that
    (it is writable all along), so retry on a timer."""

RECORD: Final = struct.Struct("<III")


class Op:
    CONN = 1        # acceptor -> child: new connection (sid, gen) + its socket
    RELEASED = 2    # child -> acceptor: I unregistered and closed (sid, gen)
    READY = 3       # child -> acceptor: booted, serving
    STOP = 4        # acceptor -> child: stop gracefully (receiver: stop reading; sender: drain)
    STOPPED = 5     # child -> acceptor: graceful stop done, about to exit 0
    HANDED = 6      # acceptor -> child: every connection open at your READY is handed to you (CONNs above)
    CLOSE = 7       # acceptor -> sender, before HANDED: the receiver let go of (sid, gen) already; end it
    names: Final = {1: "conn", 2: "released", 3: "ready", 4: "stop", 5: "stopped", 6: "handed", 7: "close"}


class Record(NamedTuple):
    op: int
    sid: int
    generation: int
    fd: int          # -1 unless op == Op.CONN


def pair() -> tuple[socket.socket, socket.socket]:
    """A non-inheritable SEQPACKET socketpair (parent end, child end)."""
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


def send(sock: socket.socket, op: int, sid: int = 0, generation: int = 0, fd: int | None = None) -> None:
    """Send one record, with ``fd`` if given.  Raises BrokenResourceError if the peer is gone."""
    data = RECORD.pack(op, sid, generation)
    try:
        if fd is None:
            sock.send(data)
        else:
            socket.send_fds(sock, [data], [fd])
    except (BrokenPipeError, ConnectionResetError) as e:
        raise BrokenResourceError(f"control channel closed: {e}") from None
    except BlockingIOError:
        raise WouldBlock("control channel full") from None
    except OSError as e:
        if e.errno == errno.ETOOMANYREFS:
            raise InFlightLimit("descriptors handed over and not yet taken exceed RLIMIT_NOFILE "
                                "(ETOOMANYREFS)") from None
        raise


def recv(sock: socket.socket) -> Record:
    """Receive one record.

    Raises WouldBlock (non-blocking socket, nothing there), BrokenResourceError
    (peer closed) or ProtocolError (bad record; received fds are closed).
    """
    fds = array.array("i")
    try:
        data, ancdata, flags, _ = sock.recvmsg(RECORD.size + 1, socket.CMSG_SPACE(fds.itemsize * 2))
    except BlockingIOError:
        raise WouldBlock("no control record") from None
    except ConnectionResetError:
        raise BrokenResourceError("control channel reset") from None
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    received = list(fds)
    try:
        if not data and not received:
            raise BrokenResourceError("control channel closed by peer")
        if flags & socket.MSG_CTRUNC:
            raise ProtocolError("descriptor dropped by the kernel (MSG_CTRUNC): out of file descriptors?")
        if len(data) != RECORD.size:
            raise ProtocolError(f"control record of {len(data)} bytes, expected {RECORD.size}")
        op, sid, gen = RECORD.unpack(data)
        if (op == Op.CONN) != (len(received) == 1) or len(received) > 1:
            raise ProtocolError(f"control record {Op.names.get(op, op)} with {len(received)} descriptors")
    except BaseException:
        for fd in received:
            os.close(fd)
        raise
    return Record(op, sid, gen, received[0] if received else -1)
