"""`luafcgid serve`: the same responder and state pool behind a small HTTP server, so a
page can be seen without installing nginx (like `php -S`). For development only: it
serves static files too, runs a thread per connection and speaks HTTP/1.0."""

import logging
import os
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

from . import __version__
from .request.connection import ClientGone
from .request.parser import Request
from .request.responder import Responder
from .shared.dictionaries import Dictionaries
from .states import vm
from .states.closer import Closer
from .states.deadline import Watcher
from .states.heartbeat import Heartbeat
from .states.worker import Workers

log = logging.getLogger("luafcgid")

_request = threading.local()   # the worker.Worker of the thread serving a request


class _HttpOutput:
    """Turns the CGI response (Status and other headers, blank line, body) into HTTP."""

    def __init__(self, handler):
        self.handler = handler
        self.head = bytearray()
        self.started = False
        self.ended = False
        self.broken = False

    def write(self, data):
        if self.ended or not data:
            return
        if not self.started:
            self.head += data
            split = self.head.find(b"\r\n\r\n")
            if split < 0:
                return
            data = bytes(self.head[split + 4:])
            self._start(bytes(self.head[:split]))
        if data and self.handler.command != "HEAD":
            try:
                self.handler.wfile.write(data)
            except OSError:
                self.broken = True
                raise ClientGone("the client went away") from None

    def end(self, data=b""):
        self.write(data)
        if not self.started:
            self._start(b"Status: 502 Bad Gateway")
        self.ended = True

    def _start(self, head):
        self.started = True
        status, headers = "200 OK", []
        for line in head.decode("latin-1").split("\r\n"):
            name, _, value = line.partition(":")
            if name.lower() == "status":
                status = value.strip()
            elif name:
                headers.append((name, value.strip()))
        code, _, reason = status.partition(" ")
        self.handler.send_response(int(code), reason)
        for name, value in headers:
            self.handler.send_header(name, value)
        self.handler.end_headers()


class _Handler(SimpleHTTPRequestHandler):
    server_version = f"luafcgid-dev/{__version__}"
    responder = None   # set per server by serve()

    def _script(self):
        """The .lua file this URL names (index.lua for a directory), or None."""
        path = self.translate_path(self.path)
        if os.path.isdir(path):
            path = os.path.join(path, "index.lua")
        return path if path.endswith(".lua") else None

    def _run(self):
        script = self._script()
        if script is None:
            if self.command in ("GET", "HEAD"):
                return super().do_GET() if self.command == "GET" else super().do_HEAD()
            return self.send_error(405)
        length = int(self.headers.get("Content-Length") or 0)
        maxpost = self.responder.config.maxpost
        too_large = length > maxpost
        body = b"" if too_large else self.rfile.read(length)
        self.close_connection = True
        self.responder.respond(Request.of(self._params(script, length), body, too_large),
                               _HttpOutput(self), _request.worker)

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = _run

    def _params(self, script, length):
        url = urlsplit(self.path)
        root = self.directory
        host, port = self.server.server_address[:2]
        params = {
            "SCRIPT_FILENAME": script, "SCRIPT_NAME": unquote(url.path),
            "DOCUMENT_URI": unquote(url.path), "REQUEST_URI": self.path,
            "QUERY_STRING": url.query, "REQUEST_METHOD": self.command,
            "CONTENT_TYPE": self.headers.get("Content-Type", ""),
            "CONTENT_LENGTH": str(length) if length else "", "DOCUMENT_ROOT": root,
            "SERVER_PROTOCOL": self.request_version, "GATEWAY_INTERFACE": "CGI/1.1",
            "SERVER_SOFTWARE": self.server_version, "REMOTE_ADDR": self.client_address[0],
            "REMOTE_PORT": str(self.client_address[1]), "SERVER_ADDR": host,
            "SERVER_PORT": str(port), "SERVER_NAME": host,
        }
        for name, value in self.headers.items():
            key = "HTTP_" + name.upper().replace("-", "_")
            if key not in ("HTTP_CONTENT_TYPE", "HTTP_CONTENT_LENGTH"):
                params[key] = value
        return {k.encode(): v.encode("latin-1", "replace") for k, v in params.items()}

    def log_message(self, format, *args):
        log.info("%s %s", self.address_string(), format % args)


def serve(config, root, address):
    """Serve `root` over HTTP on (host, port) until interrupted."""
    vm.load(config.lua)   # the process's VM, before any thread reads a request with it
    heartbeat = Heartbeat(config.sweep)
    closer = Closer(config.lua, config.request_timeout)
    responder = Responder(config, closer=closer, on_load=heartbeat.watch,
                          dictionaries=Dictionaries(config.shared))
    workers = Workers(lambda number: f"request-{number}")
    watcher = Watcher(workers, lambda: config)
    handler = type("Handler", (_Handler,), {"responder": responder})
    root = os.path.abspath(root)

    class Server(ThreadingHTTPServer):
        daemon_threads = True

        def process_request(self, request, client_address):
            vm.start_thread(config.lua, self.process_request_thread, "request",
                            (request, client_address))

        def finish_request(self, request, client_address):
            _request.worker = workers.add()
            try:
                handler(request, client_address, self, directory=root)
            finally:
                workers.remove(_request.worker)

    httpd = Server(address, handler)
    heartbeat.start(responder.pool, responder.forget_locations)
    watcher.start()
    log.info("development server: http://%s:%d/ serving %s (not for production)",
             *httpd.server_address[:2], root)
    try:
        httpd.serve_forever()
    finally:
        httpd.server_close()
        heartbeat.stop()
        watcher.stop()
        responder.pool.close()
        closer.drain(time.monotonic() + config.shutdown_timeout)
