#!/usr/bin/env python3
"""Misbehaving registry front: proxies to a real (plain-HTTP) registry, but answers the manifest
GET/HEAD of one repository badly for the first N requests or the first T seconds, to observe how
real pull clients (docker, podman, skopeo, ctr) react to a slow or "retry later" manifest.

  scripts/slow_registry.py --upstream 127.0.0.1:5000 --port 5100 --repo wait/img \
      --mode 503|429|hold|202|404|convert|ok [--count N | --seconds T] [--retry-after 5] \
      [--code UNAVAILABLE] [--body 0|1] [--hold 30] [--after-hold proxy|close]

--mode convert --seconds C --hold W: a conversion that takes C seconds from the first manifest request;
each manifest request is held until it is done (then answered from upstream) or W seconds pass (then
429 TOOMANYREQUESTS with Retry-After).

Every request is logged on stderr as `+<seconds since start> <peer> <method> <path> -> <what>`.
The misbehaviour counter can be reset without a restart: `GET /_fake/reset?mode=..&count=..`.
"""
import argparse
import http.client
import json
import re
import select
import socket
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

START = time.monotonic()
LOCK = threading.Lock()
STATE = {"n": 0, "first": None}
CFG = None
HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade"}


def log(msg):
    with LOCK:
        sys.stderr.write("+%8.3f %s\n" % (time.monotonic() - START, msg))
        sys.stderr.flush()


def misbehaves(path, method):
    """Whether this request is one of the manifest requests to spoil (and which number it is)."""
    m = re.match(r"^/v2/(.+)/manifests/([^/]+)$", path.split("?")[0])
    if not m or m.group(1) != CFG.repo or method not in ("GET", "HEAD") or CFG.mode == "ok":
        return None
    with LOCK:
        STATE["n"] += 1
        n = STATE["n"]
        now = time.monotonic()
        if STATE["first"] is None:
            STATE["first"] = now
        if CFG.seconds is not None:
            bad = now - STATE["first"] < CFG.seconds
        else:
            bad = n <= CFG.count
    return n if bad else -n


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):  # the per-request log line is written by log()
        pass

    def peer(self):
        return "%s:%d" % self.client_address

    def do_any(self):
        if self.path.startswith("/_fake/reset"):
            q = urllib.parse.parse_qs(urllib.parse.urlparse(self.path).query)
            with LOCK:
                STATE["n"], STATE["first"] = 0, None
                for k in ("mode", "code", "after_hold"):
                    if k in q:
                        setattr(CFG, k, q[k][0])
                for k in ("count", "retry_after", "body"):
                    if k in q:
                        setattr(CFG, k, int(q[k][0]))
                for k in ("seconds", "hold"):
                    if k in q:
                        setattr(CFG, k, float(q[k][0]) if q[k][0] != "none" else None)
            log("RESET %s" % vars(CFG))
            return self.reply(200, b"ok\n", {"Content-Type": "text/plain"})
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        n = misbehaves(self.path, self.command)
        ua = self.headers.get("User-Agent", "-")
        accept = ",".join(self.headers.get_all("Accept") or ["-"])
        if n is not None and n > 0:
            return self.spoil(n, ua, accept)
        self.proxy(body, ua, accept, n)

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_any

    def reply(self, status, body, headers):
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def spoil(self, n, ua, accept):
        mode = CFG.mode
        tag = "%s %s %s #%d [%s] accept=%s" % (self.peer(), self.command, self.path, n, ua, accept)
        if mode in ("503", "429"):
            body = json.dumps({"errors": [{"code": CFG.code, "message": "converting", "detail": None}]}).encode()
            h = {"Content-Type": "application/json", "Docker-Distribution-API-Version": "registry/2.0"}
            if not CFG.body:
                body, h = b"", {"Docker-Distribution-API-Version": "registry/2.0"}
            if CFG.retry_after >= 0:
                h["Retry-After"] = str(CFG.retry_after)
            log("%s -> %s %s Retry-After=%s" % (tag, mode, CFG.code, CFG.retry_after))
            return self.reply(int(mode), body, h)
        if mode == "202":
            log("%s -> 202" % tag)
            return self.reply(202, b"", {"Docker-Distribution-API-Version": "registry/2.0"})
        if mode == "404":
            body = json.dumps({"errors": [{"code": "MANIFEST_UNKNOWN", "message": "manifest unknown"}]}).encode()
            log("%s -> 404" % tag)
            return self.reply(404, body, {"Content-Type": "application/json"})
        if mode == "convert":
            # What a registry view could do: a "conversion" finishes --seconds after the first manifest
            # request; each request is held until it finishes or --hold passes, then 429.
            done_at = STATE["first"] + CFG.seconds
            t0 = time.monotonic()
            deadline = min(done_at, t0 + CFG.hold)
            log("%s -> HOLD until conversion (%.1fs) or bound (%.1fs)" % (tag, done_at - t0, CFG.hold))
            while time.monotonic() < deadline:
                time.sleep(0.2)
            if time.monotonic() >= done_at:
                log("%s #%d conversion done after %.1fs held" % (self.peer(), n, time.monotonic() - t0))
                return self.proxy(None, ua, accept, n, held=True)
            body = json.dumps({"errors": [{"code": "TOOMANYREQUESTS", "message": "image is being converted, retry in %ds" % CFG.retry_after}]}).encode()
            log("%s #%d bound reached after %.1fs -> 429 Retry-After=%d" % (self.peer(), n, time.monotonic() - t0, CFG.retry_after))
            return self.reply(429, body, {"Content-Type": "application/json", "Retry-After": str(CFG.retry_after),
                                          "Docker-Distribution-API-Version": "registry/2.0"})
        if mode == "hold":
            log("%s -> HOLD %ss" % (tag, CFG.hold))
            t0 = time.monotonic()
            sock = self.connection
            while time.monotonic() - t0 < CFG.hold:
                r, _, _ = select.select([sock], [], [], 0.5)
                if r:
                    try:
                        peek = sock.recv(1, socket.MSG_PEEK)
                    except OSError:
                        peek = b""
                    if not peek:
                        log("%s #%d CLIENT GAVE UP after %.1fs" % (self.peer(), n, time.monotonic() - t0))
                        self.close_connection = True
                        return
                    time.sleep(0.5)  # a pipelined request: keep holding
            log("%s #%d hold over (%.1fs), %s" % (self.peer(), n, time.monotonic() - t0, CFG.after_hold))
            if CFG.after_hold == "close":
                self.close_connection = True
                return
            return self.proxy(None, ua, accept, n, held=True)
        raise ValueError(mode)

    def proxy(self, body, ua, accept, n, held=False):
        conn = http.client.HTTPConnection(CFG.upstream, timeout=300)
        t0 = time.monotonic()
        try:
            # putheader, not a dict: containers/image sends one Accept header per media type, and
            # collapsing them would make distribution serve a schema 1 manifest.
            conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            conn.putheader("Host", CFG.upstream)
            for k, v in self.headers.items():
                if k.lower() not in HOP and k.lower() not in ("host", "content-length"):
                    conn.putheader(k, v)
            if body is not None:
                conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body)
            resp = conn.getresponse()
            self.send_response(resp.status)
            data_len = resp.getheader("Content-Length")
            for k, v in resp.getheaders():
                if k.lower() in HOP or k.lower() == "content-length":
                    continue
                if k.lower() == "location":
                    v = v.replace("http://" + CFG.upstream, "http://" + self.headers.get("Host", ""))
                self.send_header(k, v)
            if self.command == "HEAD" or resp.status in (204, 304):
                if data_len is not None:
                    self.send_header("Content-Length", data_len)
                self.end_headers()
                sent = 0
            elif data_len is not None:
                self.send_header("Content-Length", data_len)
                self.end_headers()
                sent = 0
                while True:
                    chunk = resp.read(65536)
                    if not chunk:
                        break
                    self.wfile.write(chunk)
                    sent += len(chunk)
            else:
                data = resp.read()
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                sent = len(data)
            extra = "" if n is None else " (manifest #%d, %s)" % (abs(n), "answered after the hold" if held else "passed")
            log("%s %s %s -> %d %dB %.3fs [%s]%s" % (self.peer(), self.command, self.path, resp.status,
                                                     sent, time.monotonic() - t0, ua, extra))
        except (BrokenPipeError, ConnectionResetError) as e:
            log("%s %s %s -> client went away: %s" % (self.peer(), self.command, self.path, e))
            self.close_connection = True
        finally:
            conn.close()


def main():
    global CFG
    p = argparse.ArgumentParser()
    p.add_argument("--upstream", required=True)
    p.add_argument("--port", type=int, default=5100)
    p.add_argument("--repo", required=True)
    p.add_argument("--mode", default="ok", choices=["ok", "503", "429", "hold", "202", "404", "convert"])
    p.add_argument("--count", type=int, default=1)
    p.add_argument("--seconds", type=float, default=None)
    p.add_argument("--retry-after", type=int, default=5, help="-1: no header")
    p.add_argument("--code", default="UNAVAILABLE")
    p.add_argument("--body", type=int, default=1, help="0: 429/503 without the JSON error body")
    p.add_argument("--hold", type=float, default=30)
    p.add_argument("--after-hold", default="proxy", choices=["proxy", "close"])
    CFG = p.parse_args()
    srv = ThreadingHTTPServer(("127.0.0.1", CFG.port), Handler)
    srv.daemon_threads = True
    log("listening on 127.0.0.1:%d -> %s, %s" % (CFG.port, CFG.upstream, vars(CFG)))
    srv.serve_forever()


if __name__ == "__main__":
    main()
