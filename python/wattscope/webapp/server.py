"""``wattscope serve``: the web app over a sweep database, on the standard library's threading HTTP server.

Routes: ``/`` the page; ``/api/data`` the payload (JSON; 503 with ``{"error": ...}`` when the database cannot be
read); ``/api/status`` ``{"ok", "version", "error"}`` (the page polls it to say when the file changed or broke);
``/api/table.csv?<filters>`` the filtered rows as CSV, filters as in ``payload.RowFilter.from_query``.

The payload is rebuilt when the database file (or its WAL) changes, so a sweep still writing to the file shows up
on reload; a file that breaks while the server runs gives the page an error panel instead of stale data.
"""

from __future__ import annotations

import hashlib
import socket
import sys
import threading
import traceback
import urllib.parse
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from ..errors import WattscopeError
from . import page
from .payload import RowFilter, build_payload, table_csv


class _Source:
    """The database behind the server and its last payload, rebuilt when the file's stat changes. Thread-safe."""

    def __init__(self, db_path: Path) -> None:
        self.db_path = db_path
        self._lock = threading.Lock()
        self._key: tuple[Any, ...] | None = None
        self._payload: dict[str, Any] | None = None
        self._body = b""
        self._error: WattscopeError | None = None

    def _stat_key(self) -> tuple[Any, ...]:
        key: list[Any] = []
        for path in (self.db_path, self.db_path.with_name(self.db_path.name + "-wal")):
            try:
                st = path.stat()
            except FileNotFoundError:
                key.append(None)
            else:
                key.append((st.st_mtime_ns, st.st_size, st.st_ino))
        return tuple(key)

    def current(self) -> tuple[dict[str, Any] | None, bytes, str | None, str]:
        """(payload, its JSON, error message, version): payload and JSON are None/empty when the database cannot
        be read, and then the error says why. ``version`` changes whenever the file does."""
        with self._lock:
            key = self._stat_key()
            if key != self._key:
                # Any other exception leaves the key unchanged, so that the next request tries again.
                try:
                    payload = build_payload(self.db_path)
                except WattscopeError as e:
                    self._payload, self._body, self._error = None, b"", e
                else:
                    payload["server"] = {"version": _version(key)}
                    self._payload, self._body, self._error = payload, page.payload_json(payload).encode(), None
                self._key = key
            return self._payload, self._body, None if self._error is None else str(self._error), _version(key)

    def check(self) -> None:
        """Read the database now; raise its error (``ResultsError``) when it cannot be read."""
        self.current()
        if self._error is not None:
            raise self._error


def _version(key: tuple[Any, ...]) -> str:
    return hashlib.sha1(repr(key).encode()).hexdigest()[:12]


class WebServer(ThreadingHTTPServer):
    """The HTTP server of ``wattscope serve``; ``url`` is where it listens."""

    daemon_threads = True

    def __init__(self, source: _Source, host: str, port: int) -> None:
        if ":" in host:
            self.address_family = socket.AF_INET6
        self.source = source
        self.page = page.render(None).encode()
        super().__init__((host, port), _Handler)

    @property
    def url(self) -> str:
        host, port = self.socket.getsockname()[:2]
        # A wildcard address is not one a browser can open: this machine's loopback is.
        shown = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
        return f"http://[{shown}]:{port}/" if ":" in shown else f"http://{shown}:{port}/"


def make_server(db_path: str | Path, host: str = "127.0.0.1", port: int = 8050) -> WebServer:
    """A server for ``db_path`` bound to ``host:port`` (port 0: any free port), not yet serving: call
    ``serve_forever()`` (and ``shutdown()``/``server_close()`` to stop). The database is read once first, so a bad
    file raises ``wattscope.analysis.ResultsError`` here; ``OSError`` when the address cannot be bound."""
    source = _Source(Path(db_path))
    source.check()
    return WebServer(source, host, port)


class _Handler(BaseHTTPRequestHandler):
    server: WebServer
    server_version = "wattscope"

    def do_GET(self) -> None:  # noqa: N802 (the http.server API)
        url = urllib.parse.urlsplit(self.path)
        routes = {
            "/": self._page,
            "/index.html": self._page,
            "/api/data": self._data,
            "/api/status": self._status,
            "/api/table.csv": self._table,
        }
        try:
            route = routes.get(url.path)
            if route is None:
                self._send(HTTPStatus.NOT_FOUND, "text/plain; charset=utf-8", f"no such page: {url.path}\n".encode())
            else:
                route(url.query)
        except ConnectionError:
            # The client went away (a reload, a closed tab): nothing is wrong and there is no one to answer.
            self.close_connection = True
        except Exception as e:  # one bad request must not take the server down; the traceback goes to its log
            traceback.print_exc(file=sys.stderr)
            self._json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"internal error: {type(e).__name__}: {e}"})

    def do_HEAD(self) -> None:  # noqa: N802 (the http.server API)
        # GET's status and headers; _send leaves out the body for HEAD.
        self.do_GET()

    def _page(self, query: str) -> None:
        self._send(HTTPStatus.OK, "text/html; charset=utf-8", self.server.page)

    def _data(self, query: str) -> None:
        payload, body, error, _ = self.server.source.current()
        if payload is None:
            self._json(HTTPStatus.SERVICE_UNAVAILABLE, {"error": error})
        else:
            self._send(HTTPStatus.OK, "application/json", body)

    def _status(self, query: str) -> None:
        payload, _, error, version = self.server.source.current()
        self._json(HTTPStatus.OK, {"ok": payload is not None, "version": version, "error": error})

    def _table(self, query: str) -> None:
        try:
            rows_filter = RowFilter.from_query(query)
        except ValueError as e:
            self._send(HTTPStatus.BAD_REQUEST, "text/plain; charset=utf-8", f"{e}\n".encode())
            return
        payload, _, error, _ = self.server.source.current()
        if payload is None:
            self._send(HTTPStatus.SERVICE_UNAVAILABLE, "text/plain; charset=utf-8", f"{error}\n".encode())
            return
        body = table_csv(rows_filter.apply(payload["rows"]), payload["columns"]).encode()
        self._send(HTTPStatus.OK, "text/csv; charset=utf-8", body,
                   {"Content-Disposition": 'attachment; filename="wattscope-table.csv"'})

    def _json(self, status: HTTPStatus, obj: dict[str, Any]) -> None:
        self._send(status, "application/json", page.payload_json(obj).encode())

    def _send(self, status: HTTPStatus, content_type: str, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the http.server API)
        # Only failures: a line per request would bury the URL the command printed.
        if len(args) >= 2 and str(args[1])[:1] in ("4", "5"):
            sys.stderr.write(f"wattscope serve: {self.address_string()} {format % args}\n")
