"""The server's listening socket, bound before the model loads: a port that is taken is one
line at once, not uvicorn's ``[Errno 98]`` after seconds of loading."""

from __future__ import annotations

import errno
import socket


class CannotListen(OSError):
    """The socket cannot be bound; the message names the setting to change."""


def bind_listener(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` (IPv6 when ``host`` holds a colon), as uvicorn binds
    its own, for ``uvicorn.Server.run(sockets=...)``, which starts listening on it.

    Raises ``CannotListen`` naming ``--port``/``SAFL_PORT`` when the port is taken, and
    ``--host``/``--port`` for anything else (no such interface, a privileged port)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        # As uvicorn does: a restart may bind while the previous process's connections linger in TIME_WAIT.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise CannotListen(
                exc.errno, f"port {port} on {host} is already in use: stop what listens there or choose another with --port (SAFL_PORT)"
            ) from None
        raise CannotListen(exc.errno, f"cannot listen on {host}:{port} ({exc.strerror or exc}): check --host and --port (SAFL_HOST, SAFL_PORT)") from None
    sock.set_inheritable(True)
    return sock
