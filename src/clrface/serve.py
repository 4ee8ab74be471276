"""``clrface serve``: a local web page that restores one uploaded photo at a time; this module is its HTTP side
(routes, host and size checks, streaming the answer), around :class:`clrface.serve_app.App`, which does the work.

Stack: the standard library's :class:`http.server.ThreadingHTTPServer` and one static HTML page (``PAGE``, in
clrface/serve_page.py) whose few lines of JavaScript POST the chosen file. Why not Gradio or FastAPI: into a fresh
venv, ``pip install --dry-run`` brings 52 packages for Gradio (huggingface_hub, pandas, httpx, ...) and 15 for
FastAPI + uvicorn + python-multipart (starlette, pydantic, anyio, ...), for one form and two routes. The photo
alone is the raw request body (options in the query string); with reference photos the body is a
``multipart/form-data`` form, read by the standard library's ``email`` parser (the ``cgi`` module is gone from
Python 3.13), so the server needs no dependency beyond the package's own. The cost: no progress bar, and restores
queue behind one lock.

Routes::

    GET  /                  the page
    GET  /api/info          model, its default options, limits (JSON)
    POST /api/restore?fidelity=F&steps=N&seed=S&mode=M&aligned=0|1[&format=png][&reference_all=1]
                                 [&force_reference=1]
                            body: the image file's bytes (any format load_image reads), or a multipart/form-data
                                 form with one "photo" field and up to MAX_REFERENCES "reference" fields (clean
                                 photos of the person: mode full, guided toward their identity)
                            200: JSON {image, input: base64 PNG, size, faces: [{index, box, id_vs_input, id_vs_irn,
                                 crop_in, crop_out[, reference]}], no_face, warnings, sampling, options, aligned,
                                 seconds}, sent in
                                 chunks as it is encoded (format=png: the restored photo as image/png, scores in
                                 X-Clrface-Faces, X-Clrface-No-Face: 0|1, X-Clrface-Warnings: a JSON list)
                            4xx/5xx: JSON {error: "one line"}; the server keeps serving. 413/422 for too much work
                                 also carry {cost, limit, faces, evaluations_per_face}; 408 an upload slower than
                                 60 s + 64 KB/s; 503 while stopping

Safety: binds 127.0.0.1 unless told otherwise; on a loopback address it answers only Host headers naming
loopback (DNS-rebinding) and refuses cross-origin POSTs (Origin must match Host). Uploads are capped in bytes
(Content-Length checked before the body is read; also on ``Expect: 100-continue``) and in pixels (read from the
image header by :func:`clrface.data.io.load_image` before any pixel is decoded, so a decompression bomb costs
nothing). Work per request is bounded and serialised by :mod:`clrface.serve_app`. The answer is streamed in
chunks; a client that does not take it within ``ServeLimits.send_seconds`` is cut off. A client that
disconnects stops its work: the handler checks the socket while waiting for the lock, between batches of faces
and before each denoiser evaluation (:func:`client_gone`).
"""

from __future__ import annotations

import contextlib
import json
import re
import select
import socket
import sys
import threading
import time
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Iterator
from urllib.parse import urlsplit

from clrface.errors import ClrfaceError
from clrface.restorer import Restorer
from clrface.serve_app import App, ClientGone, Reply, RequestError, ServeLimits, acquire_unless
from clrface.serve_page import PAGE

LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "::1"})


def client_gone(sock: socket.socket) -> bool:
    """True when the peer has closed the connection (readable, and a peek reads end-of-stream). Bytes of a
    pipelined next request are left in place."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        if not readable:
            return False
        return sock.recv(1, socket.MSG_PEEK | getattr(socket, "MSG_DONTWAIT", 0)) == b""
    except (BlockingIOError, InterruptedError):
        return False
    except (OSError, ValueError):  # reset, or already closed
        return True


def _hostname(host_header: str) -> str:
    """'127.0.0.1:7860' / '[::1]:80' / 'localhost' -> the bare host name, lower case."""
    h = host_header.strip().lower()
    if h.startswith("["):
        return h[1:h.find("]")] if "]" in h else h
    return h.rsplit(":", 1)[0] if h.count(":") == 1 else h


class Handler(BaseHTTPRequestHandler):
    """HTTP glue around App; every refusal is a JSON {error} with a 4xx status."""

    server: "ClrfaceServer"
    protocol_version = "HTTP/1.1"
    timeout = 60  # seconds a client may stall mid-request before its thread gives up
    server_version = "clrface"

    def version_string(self) -> str:
        return self.server_version  # no Python version: it only helps someone matching known flaws

    # --------------------------------------------------------------------------------------- responses

    def _start(self, status: int, ctype: str, headers: dict[str, str], framing: dict[str, str]) -> None:
        """The status line and headers of every answer; ``framing``: Content-Length or Transfer-Encoding."""
        self.send_response(status)
        for k, v in {"Content-Type": ctype, **framing, "Cache-Control": "no-store",
                     "X-Content-Type-Options": "nosniff", **headers}.items():
            self.send_header(k, v)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()

    def _send(self, status: int, ctype: str, body: bytes, headers: dict[str, str] | None = None) -> None:
        self._start(status, ctype, headers or {}, {"Content-Length": str(len(body))})
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, status: int, message: str, headers: dict[str, str] | None = None, **fields: Any) -> None:
        self._send(status, "application/json", json.dumps({"error": message, **fields}).encode(), headers)

    def _refuse(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        """A refusal before the body is read: answered, then the body the client is sending is dropped for a
        moment (bounded), so that a client that writes all of it before reading sees the answer, not a reset."""
        self.close_connection = True
        self._error(status, message, headers)
        with contextlib.suppress(ValueError):
            self._drain(int(self.headers.get("Content-Length", "0")))

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own refusals (a malformed request line, a 414 URL, 431 headers, 501 method) as JSON."""
        self.close_connection = True
        phrase = message or self.responses.get(code, ("error",))[0].lower()
        self._error(code, f"{phrase}{': ' + explain if explain else ''}")

    def _send_reply(self, reply: Reply) -> None:
        """Sends ``reply`` as its pieces are produced: chunked, or to an HTTP/1.0 client (which knows no chunks)
        until the connection closes; one piece known in advance goes out with its Content-Length. A client that
        has spent more than ``send_seconds`` taking it (encoding time not counted) is cut off: its thread holds
        the restore lock meanwhile."""
        if isinstance(reply.chunks, list) and len(reply.chunks) == 1:
            self.connection.settimeout(self.server.app.limits.send_seconds)
            self._send(reply.status, reply.ctype, reply.chunks[0], reply.headers)
            self.connection.settimeout(self.timeout)
            return
        chunked = self.request_version != "HTTP/1.0"
        self.close_connection |= not chunked
        left = self.server.app.limits.send_seconds
        self._start(reply.status, reply.ctype, reply.headers, {"Transfer-Encoding": "chunked"} if chunked else {})
        for piece in reply.chunks:
            if not piece:
                continue
            if left <= 0:
                raise TimeoutError("client did not take its answer in time")
            self.connection.settimeout(left)  # sendall's timeout bounds the whole piece
            t0 = time.monotonic()
            self.wfile.write(b"%x\r\n%b\r\n" % (len(piece), piece) if chunked else piece)
            left -= time.monotonic() - t0
        if chunked:
            self.wfile.write(b"0\r\n\r\n")
        self.connection.settimeout(self.timeout)

    def _check_host(self, post: bool) -> bool:
        """DNS-rebinding and cross-origin guards (see the module docstring); False: refused and answered."""
        host = self.headers.get("Host", "")
        if self.server.loopback_only and _hostname(host) not in LOOPBACK_NAMES:
            self._refuse(403, f"Host {host!r} refused: this server answers only to 127.0.0.1 / localhost")
            return False
        origin = self.headers.get("Origin")
        if post and origin is not None and urlsplit(origin).netloc.lower() != host.lower():
            self._refuse(403, f"cross-origin request from {origin!r} refused")
            return False
        return True

    def _declared_length(self, *, drain: bool = True) -> int | None:
        """Content-Length if acceptable, else answers 411/413 and returns None. An oversized body the client is
        already sending is read and dropped for a moment (bounded), so that it sees the 413 rather than a reset."""
        coding = self.headers.get("Transfer-Encoding", "").strip().lower()
        lengths = set(self.headers.get_all("Content-Length") or [])
        refusal = None
        if coding and coding != "identity":
            refusal = (411, "chunked uploads are not supported; send Content-Length") if "chunked" in coding else \
                (501, f"Transfer-Encoding {coding!r} is not supported; send the bytes with Content-Length")
        elif not lengths:
            refusal = 411, "Content-Length required"
        elif len(lengths) > 1 or not re.fullmatch(r"[0-9]+", lengths.copy().pop().strip()):
            refusal = 400, f"invalid Content-Length: {', '.join(sorted(lengths))}"
        if refusal:
            self.close_connection = True
            self._error(*refusal)
            return None
        n = int(lengths.pop())
        if n > self.server.app.limits.max_bytes:
            self.close_connection = True
            mb = self.server.app.limits.max_bytes / 2**20
            self._error(413, f"upload too large: {n / 2**20:,.1f} MB exceeds the {mb:.0f} MB cap")
            if drain:
                self._drain(n)
            return None
        return n

    def _body_seconds(self, n: int) -> float:
        """How long an upload of n bytes may take: ``timeout`` plus 64 KB/s, so a client that trickles its bytes
        cannot hold one of the upload slots for good."""
        return self.timeout + n / 2**16

    def _read_body(self, n: int) -> bytes | None:
        """The n body bytes (fewer when the client closes early), or None past :meth:`_body_seconds`."""
        end, parts, got = time.monotonic() + self._body_seconds(n), [], 0
        try:
            while got < n:
                left = end - time.monotonic()
                if left <= 0:
                    return None
                self.connection.settimeout(left)
                piece = self.rfile.read1(min(n - got, 1 << 20))
                if not piece:
                    break
                parts.append(piece)
                got += len(piece)
        except TimeoutError:
            return None
        finally:
            self.connection.settimeout(self.timeout)
        return b"".join(parts)

    def _drain(self, n: int, seconds: float = 2.0, chunk: int = 1 << 16) -> None:
        """Reads and drops up to n body bytes for at most ``seconds`` (never kept: memory stays one chunk)."""
        end = time.monotonic() + seconds
        try:
            self.connection.settimeout(0.5)
            while n > 0 and time.monotonic() < end:
                got = self.rfile.read1(min(chunk, n))
                if not got:
                    break
                n -= len(got)
        except OSError:
            pass

    # ----------------------------------------------------------------------------------------- methods

    def parse_request(self) -> bool:
        if not super().parse_request():
            return False
        expect = self.headers.get("Expect", "")
        if expect and expect.lower() != "100-continue":  # http.server would ignore it
            self.send_error(417, f"Expect {expect!r} is not supported")
            return False
        return True

    def handle_expect_100(self) -> bool:
        # Answer an oversized upload before the client sends its body (curl does this above 1 MB).
        if self.path.split("?", 1)[0] == "/api/restore" and self._declared_length(drain=False) is None:
            return False
        return super().handle_expect_100()

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        if not self._check_host(post=False):
            return
        path = urlsplit(self.path).path
        if path in ("/", "/index.html"):
            csp = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data: blob:; "
                   "connect-src 'self' blob:; form-action 'none'; frame-ancestors 'none'")
            self._send(200, "text/html; charset=utf-8", PAGE.encode(), {"Content-Security-Policy": csp})
        elif path == "/api/info":
            self._send(200, "application/json", json.dumps(self.server.app.info()).encode())
        elif path == "/api/restore":
            self._error(405, "method not allowed: POST the photo to /api/restore", {"Allow": "POST"})
        else:
            self._error(404, f"no such page: {path}")

    do_HEAD = do_GET

    def do_POST(self) -> None:  # noqa: N802
        url = urlsplit(self.path)
        if url.path != "/api/restore":
            self._refuse(404, f"no such endpoint: POST {url.path}")
            return
        keep_alive = not self.close_connection
        self.close_connection = True  # until the body is read, the connection cannot be reused
        if not self._check_host(post=True):
            return
        n = self._declared_length()
        if n is None:
            return
        with self.server.upload_slot(lambda: client_gone(self.connection)) as slot:
            if not slot:  # gone while waiting
                return
            data = self._read_body(n)
            if data is None:  # the connection stays marked for closing
                self._error(408, f"upload too slow: {n} bytes not received within {self._body_seconds(n):.0f} s")
                return
            self.close_connection = not keep_alive
            if len(data) != n:
                self.close_connection = True
                self._error(400, f"upload truncated: got {len(data)} of {n} bytes")
                return
            self._restore(url.query, data)

    def _restore(self, query: str, data: bytes) -> None:
        try:
            with self.server.app.restoring(query, data, lambda: client_gone(self.connection),
                                           self.headers.get("Content-Type", "application/octet-stream")) as reply:
                try:
                    self._send_reply(reply)
                except (OSError, TimeoutError):  # gone or stalled mid-answer: drop it, free the lock
                    self.close_connection = True
                except Exception:  # noqa: BLE001  the status line is out: no error answer can follow
                    traceback.print_exc(file=sys.stderr)
                    self.close_connection = True
            return
        except ClientGone:
            self.close_connection = True
            return
        except RequestError as e:
            self._error(e.status, str(e), **e.fields)
            return
        except ClrfaceError as e:  # e.g. mode irn without an irn/ checkpoint
            self._error(400, str(e))
            return
        except Exception as e:  # noqa: BLE001  a bug must not take the server down; the page gets one line
            traceback.print_exc(file=sys.stderr)
            self._error(500, f"internal error: {type(e).__name__}: {e}")

    def do_PUT(self) -> None:  # noqa: N802
        allow = "POST" if urlsplit(self.path).path == "/api/restore" else "GET, HEAD"
        self._refuse(405, f"method {self.command} not allowed", {"Allow": allow})

    do_DELETE = do_PATCH = do_PUT

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        if not self.server.quiet:
            super().log_message(format, *args)


class ClrfaceServer(ThreadingHTTPServer):
    daemon_threads = True  # Ctrl+C does not wait for stalled clients
    request_queue_size = 16
    #: Uploads held in memory at once: the one restoring and the next; further clients wait with their bytes
    #: unread (in their own send buffers), so memory does not grow with the number of clients.
    upload_slots = 2

    def __init__(self, address: tuple[str, int], app: App | None, *, quiet: bool = False):
        self.app, self.quiet = app, quiet  # app None: bound before the model loads; set it before serving
        self.loopback_only = address[0] in LOOPBACK_NAMES or address[0].startswith("127.")
        if ":" in address[0]:
            self.address_family = socket.AF_INET6  # read by TCPServer.__init__
        self._slots = threading.BoundedSemaphore(self.upload_slots)
        super().__init__(address, Handler)

    @contextlib.contextmanager
    def upload_slot(self, gone: Callable[[], bool]) -> Iterator[bool]:
        """Waits for one of ``upload_slots``; yields False (and holds none) when ``gone()`` turns true first."""
        if not acquire_unless(self._slots, gone):
            yield False
            return
        try:
            yield True
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that hung up mid-response is routine (a closed tab), not a traceback.
        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            return
        super().handle_error(request, client_address)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{'[' + host + ']' if ':' in str(host) else host}:{port}/"


def make_server(restorer: Restorer | None, host: str = "127.0.0.1", port: int = 7860,
                limits: ServeLimits = ServeLimits(), *, quiet: bool = False) -> ClrfaceServer:
    """A bound, not yet serving server (port 0: a free port; see ``.url``). Call ``serve_forever()``; with
    ``restorer`` None, set ``.app`` first (the port is taken before a model takes seconds to load)."""
    try:
        return ClrfaceServer((host, port), None if restorer is None else App(restorer, limits), quiet=quiet)
    except (OSError, OverflowError) as e:  # OverflowError: a port outside 0..65535
        raise ClrfaceError(f"cannot listen on {host}:{port} ({getattr(e, 'strerror', None) or e})") from None


def serve(server: ClrfaceServer, *, log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True)
          ) -> None:
    """Serves ``server`` (from :func:`make_server`, its app set; the caller closes it) until Ctrl+C. A restore
    under way is stopped and waited for: a process that exits while torch computes on another thread aborts."""
    app = server.app
    log(f"clrface: serving {app.restorer.source} on {server.url} (one restore at a time; Ctrl+C to stop)")
    if not server.loopback_only:
        host = server.server_address[0]
        log(f"clrface: warning: listening on {host}, reachable from other machines; there is no authentication")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        app.stop()
        log("clrface: stopped")
