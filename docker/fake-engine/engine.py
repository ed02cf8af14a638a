"""A fake AceStream engine, for the test-suite and the benchmarks.

It stands in for the real engine (a large, closed image that cannot be pulled here and takes
seconds to start) and answers the calls the engine pool makes: the status and network checks
of /server/api, /ace/getstream, the stat and command URLs of a playback session, and a cache
folder to measure and clean. Switches (GET/POST /_fake/mode) make it unhealthy, disconnected,
slow or forgetful, so tests can drive every branch of the pool. Standard library only.
"""

import contextlib
import json
import os
import signal
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit


def configured_port(flag, env, default):
    """The port a CONF line `--flag=N` gives, else the environment variable, else the default."""
    for line in CONF.splitlines():
        name, _, value = line.strip().partition("=")
        if name == flag and value:
            return int(value)
    return int(os.environ[env]) if os.environ.get(env) else default


CONF = os.environ.get("CONF", "")
PORT = configured_port("--http-port", "HTTP_PORT", 6878)
HTTPS_PORT = configured_port("--https-port", "HTTPS_PORT", None)  # reported, not served
CACHE = os.environ.get("FAKE_CACHE_DIR", "/home/appuser/.ACEStream/.acestream_cache")
LOG = os.environ.get("FAKE_LOG") == "1"
SWITCHES = {"healthy": bool, "connected": bool, "delay_s": float, "forget_sessions": bool}
MODE = {
    "healthy": os.environ.get("FAKE_UNHEALTHY") != "1",
    "connected": os.environ.get("FAKE_DISCONNECTED") != "1",
    "delay_s": float(os.environ.get("FAKE_DELAY_S") or 0),
    "forget_sessions": os.environ.get("FAKE_FORGET_SESSIONS") == "1",
}
SESSIONS = {}  # playback session id -> when first seen (any id is known lazily)
STOPPED = set()
LOCK = threading.Lock()


def write_cache(name, size):
    try:
        with open(os.path.join(CACHE, name), "wb") as f:
            f.write(bytes(size))
    except OSError as exc:  # a read-only or missing cache must not stop the engine
        print(f"fake-engine: cannot write {name} in {CACHE}: {exc}", file=sys.stderr, flush=True)


def stat(sid):
    with LOCK:
        if MODE["forget_sessions"] or sid in STOPPED:
            return None
        age = time.monotonic() - SESSIONS.setdefault(sid, time.monotonic())
    return {"status": "dl", "peers": min(3 + int(age / 5), 30), "speed_down": 900, "speed_up": 80,
            "downloaded": int(age * 900 * 1024), "uploaded": int(age * 80 * 1024), "total_progress": 0}


class Engine(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "FakeAceStream/1"

    def do_GET(self):
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        parts = url.path.strip("/").split("/")
        if url.path == "/_fake/mode":
            return self.send(200, self.mode())
        time.sleep(MODE["delay_s"])
        if url.path == "/server/api":
            return self.api(query.get("method"))
        if parts[:2] == ["ace", "getstream"]:
            return self.getstream(query.get("infohash") or query.get("id") or query.get("content_id"))
        if len(parts) == 4 and parts[:2] == ["ace", "stat"]:
            found = stat(parts[3])
            return self.send(200, {"response": found, "error": None if found else "unknown playback session id"})
        if len(parts) == 4 and parts[:2] == ["ace", "cmd"]:
            if query.get("method") != "stop":
                return self.send(200, {"response": None, "error": "unknown method"})
            with LOCK:
                STOPPED.add(parts[3])
            return self.send(200, {"response": "ok", "error": None})
        self.send(404, {"error": "not found"})

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if urlsplit(self.path).path != "/_fake/mode":
            return self.send(404, {"error": "not found"})
        try:
            patch = json.loads(body or b"{}")
            if not isinstance(patch, dict):
                raise TypeError("a JSON object is expected")
            for name, value in patch.items():
                if name not in SWITCHES:
                    raise ValueError(f"unknown switch {name!r}")
                if SWITCHES[name] is bool and not isinstance(value, bool):
                    raise TypeError(f"{name} must be true or false")
                if SWITCHES[name] is float and (type(value) not in (int, float) or value < 0):
                    raise TypeError(f"{name} must be a number >= 0")
        except (ValueError, TypeError) as exc:
            return self.send(400, {"error": str(exc)})
        with LOCK:
            MODE.update({name: SWITCHES[name](value) for name, value in patch.items()})
        self.send(200, self.mode())

    def api(self, method):
        if method == "get_status":
            if not MODE["healthy"]:
                return self.send(500, {"result": None, "error": "engine unhealthy"})
            return self.send(200, {"result": {"status": "ok", "version": "fake-1"}, "error": None})
        if method == "get_network_connection_status":
            return self.send(200, {"result": {"connected": MODE["connected"]}, "error": None})
        self.send(200, {"result": None, "error": "unknown method"})

    def getstream(self, key):
        if not key:
            return self.send(200, {"response": None, "error": "missing infohash"})
        sid = uuid.uuid4().hex
        with LOCK:
            SESSIONS[sid] = time.monotonic()
        write_cache(sid, 64 * 1024)
        base = f"http://{self.headers.get('Host') or f'127.0.0.1:{PORT}'}/ace"
        self.send(200, {"response": {
            "playback_session_id": sid, "stat_url": f"{base}/stat/{key}/{sid}",
            "command_url": f"{base}/cmd/{key}/{sid}", "playback_url": f"{base}/r/{key}/{sid}",
            "is_live": 1, "is_encrypted": 0, "infohash": key}, "error": None})

    def mode(self):
        extra = {k: v for k, v in os.environ.items() if k.startswith("EXTRA_")}
        return {**MODE, "port": PORT, "https_port": HTTPS_PORT, "conf": CONF, "env_extra": extra}

    def send(self, code, document):
        body = json.dumps(document).encode()
        try:
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the caller gave up (a delay, a timeout)
            self.close_connection = True

    def log_message(self, format, *args):
        if LOG:
            print(f"{self.address_string()} {format % args}", flush=True)


def main():
    for signum in (signal.SIGTERM, signal.SIGINT):  # PID 1 has no default handlers: exit at once
        signal.signal(signum, lambda *_: sys.exit(0))
    server = ThreadingHTTPServer(("0.0.0.0", PORT), Engine)  # accepting from here on
    with contextlib.suppress(OSError):
        os.makedirs(CACHE, exist_ok=True)
    write_cache("seed.bin", int(os.environ.get("FAKE_CACHE_BYTES") or 131072))
    print(f"fake-engine: listening on {PORT} (https {HTTPS_PORT}), cache {CACHE}", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
