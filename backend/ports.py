"""Where a server listens: a port that cannot be had is one line naming the setting that moves
it, not a traceback from deep inside the server."""

from __future__ import annotations

import errno
import socket


class PortUnavailableError(Exception):
    """The address cannot be listened on; the message says which and why."""


def listening_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port, as servers bind (SO_REUSEADDR); PortUnavailableError
    when another process holds the port, or it is not this machine's to take."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        if error.errno == errno.EADDRINUSE:
            raise PortUnavailableError(f"{host}:{port} is in use (another server?)") from None
        reason = error.strerror or type(error).__name__
        raise PortUnavailableError(f"cannot listen on {host}:{port}: {reason}") from None
    return sock


def check_port_free(host: str, port: int) -> None:
    """PortUnavailableError unless host:port can be listened on now (for a server that binds
    it itself, later: it could be taken meanwhile, but a clash at start-up is said at once)."""
    listening_socket(host, port).close()
