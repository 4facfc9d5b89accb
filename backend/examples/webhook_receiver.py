"""A webhook receiver to try deliveries on one machine: checks each signature, prints the event.

Run from backend/, with the server's secret:
    WEBHOOK_SECRET=whsec_... ../.venv/bin/python examples/webhook_receiver.py 9000
Answers 204 to a delivery whose signature verifies, 401 to any other.
"""

import json
import os
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `services` from any directory

from services.webhooks import verify_webhook

SECRET = os.environ["WEBHOOK_SECRET"]


class Receiver(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        verified = verify_webhook(SECRET, dict(self.headers.items()), body)
        self.send_response(204 if verified else 401)
        self.end_headers()
        event = json.loads(body) if verified else {"type": "?", "data": {}}
        generation = event["data"].get("generation_id")
        print("verified" if verified else "REFUSED", event["type"], generation, flush=True)

    def log_message(self, format: str, *args: object) -> None:
        pass  # one line per delivery, printed above


HTTPServer(("127.0.0.1", int(sys.argv[1])), Receiver).serve_forever()
