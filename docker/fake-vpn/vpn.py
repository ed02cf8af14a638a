"""A fake Gluetun VPN container, for the test-suite.

It stands in for Gluetun (which cannot be pulled here and needs a real VPN account and
NET_ADMIN) with the two parts the engine pool reads: its Docker health status and its HTTP
control server (the forwarded port, the public IP). `POST /_fake/health` switches the health
the image's HEALTHCHECK (`vpn.py check`) reports, so tests can take the VPN down and up.
Standard library only.
"""

import http.client
import json
import os
import signal
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PORT = int(os.environ.get("FAKE_CONTROL_PORT") or 8000)
FORWARDED_PORT = int(os.environ.get("FAKE_FORWARDED_PORT") or 12345)  # 0: no port forwarded
STATE = {"healthy": os.environ.get("FAKE_UNHEALTHY") != "1"}


class Control(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        if self.path == "/v1/openvpn/portforwarded":
            return self.send(200, {"port": FORWARDED_PORT})
        if self.path == "/v1/publicip/ip":
            return self.send(200, {"public_ip": "203.0.113.7"})
        if self.path == "/_fake/health":
            return self.send(200 if STATE["healthy"] else 503, STATE)
        self.send(404, {"error": "not found"})

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path != "/_fake/health":
            return self.send(404, {"error": "not found"})
        try:
            healthy = json.loads(body)["healthy"]
            if not isinstance(healthy, bool):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            return self.send(400, {"error": 'expected {"healthy": true|false}'})
        STATE["healthy"] = healthy
        self.send(200, STATE)

    def send(self, code, document):
        body = json.dumps(document).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):
        pass  # quiet: Docker runs the health check every second


def check():
    """The HEALTHCHECK: asks the running server, so a dead server is unhealthy too."""
    try:
        conn = http.client.HTTPConnection("127.0.0.1", PORT, timeout=0.8)
        conn.request("GET", "/_fake/health")
        return 0 if conn.getresponse().status == 200 else 1
    except OSError:
        return 1


def main():
    if sys.argv[1:] == ["check"]:
        sys.exit(check())
    for signum in (signal.SIGTERM, signal.SIGINT):  # PID 1 has no default handlers: exit at once
        signal.signal(signum, lambda *_: sys.exit(0))
    server = ThreadingHTTPServer(("0.0.0.0", PORT), Control)
    print(f"fake-vpn: control server on {PORT}, forwarded port {FORWARDED_PORT}", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
