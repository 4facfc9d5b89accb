"""A local S3 to try the backend against: moto's server on 127.0.0.1, port MOTO_PORT (5000).

    cd backend && ../.venv/bin/python -m tools.moto_server

moto's own `python -m moto.server` answers a port already in use with a traceback; this says
so in one line naming the setting that moves it, and exits with 2.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from ports import PortUnavailableError, check_port_free

HOST = "127.0.0.1"
DEFAULT_PORT = 5000


def main(argv: Sequence[str] | None = None) -> int:
    """Serve moto's S3 until Ctrl-C; the exit status."""
    del argv  # no options: MOTO_PORT is moto's own setting
    raw_port = os.environ.get("MOTO_PORT", str(DEFAULT_PORT))
    if not raw_port.isdigit() or not 0 < int(raw_port) < 65_536:
        print(f"error: MOTO_PORT={raw_port!r} is not a port (1-65535)", file=sys.stderr)
        return 2
    port = int(raw_port)
    try:
        check_port_free(HOST, port)
    except PortUnavailableError as error:
        print(
            f"error: {error}; MOTO_PORT=<another> moves moto "
            "(and AWS_ENDPOINT_URL=http://127.0.0.1:<another> points the API at it)",
            file=sys.stderr,
        )
        return 2
    from moto.server import main as serve_moto

    serve_moto(["-H", HOST, "-p", str(port)])
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
