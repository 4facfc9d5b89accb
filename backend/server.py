"""Run the API under uvicorn with every log line in LOG_FORMAT, uvicorn's first ones included.

    cd backend && python -m server --host 127.0.0.1 --port 8000    # what `make run` runs

Logging is set up before uvicorn starts, and uvicorn is told not to install its own, so the
process writes nothing in another format. The socket is bound here first, so that a port in
use is one line naming PORT. (`uvicorn main:app` and gunicorn log in LOG_FORMAT too: the app
sets up logging when `main:app` is created.)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import uvicorn

from config import settings_or_exit
from observability import configure_logging
from ports import PortUnavailableError, listening_socket


def main(argv: Sequence[str] | None = None) -> int:
    """Serve `main:app` on --host/--port until interrupted."""
    parser = argparse.ArgumentParser(prog="python -m server", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    settings = settings_or_exit()
    try:  # bound here, so that a port in use is one line, not uvicorn's traceback
        sock = listening_socket(args.host, args.port)
    except PortUnavailableError as error:
        print(
            f"error: {error}; PORT=<another> make run (python -m server --port <another>) "
            "moves this server",
            file=sys.stderr,
        )
        return 2
    configure_logging(settings.log_format, settings.log_level)
    # Requests are logged by the app itself (with ids, status and duration), not uvicorn.
    config = uvicorn.Config("main:app", log_config=None, access_log=False)
    uvicorn.Server(config).run(sockets=[sock])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
