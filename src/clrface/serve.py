"""``clrface serve``: a local web page that restores one uploaded photo at a time.

Stack: the standard library's :class:`http.server.ThreadingHTTPServer` and one static HTML page (``PAGE``, in
clrface/serve_page.py) whose few lines of JavaScript POST the chosen file's raw bytes. Why not Gradio or FastAPI:
into a fresh venv, ``pip install --dry-run`` brings 52 packages for Gradio (huggingface_hub, pandas, httpx, ...)
and 15 for FastAPI + uvicorn + python-multipart (starlette, pydantic, anyio, ...), for one form and two routes.
Sending the file as the raw request body (options in the query string) means no multipart parsing at all (the
stdlib ``cgi`` module is gone from Python 3.13), so the server needs no dependency beyond the package's own. The
cost: no progress bar, and restores queue behind one lock.

Routes::

    GET  /                  the page
    GET  /api/info          model, its default options, limits (JSON)
    POST /api/restore?fidelity=F&steps=N&seed=S&mode=M&aligned=0|1[&format=png]
                            body: the image file's bytes (any format load_image reads)
                            200: JSON {image, input: base64 PNG, faces: [{index, box, id_vs_input, id_vs_irn,
                                 crop_in, crop_out}], no_face, warnings, sampling, options, seconds}
                                 (format=png: the restored photo as image/png, scores in X-Clrface-Faces)
                            4xx: JSON {error: "one line"}; the server keeps serving

Safety: binds 127.0.0.1 unless told otherwise; on a loopback address it answers only Host headers naming
loopback (DNS-rebinding) and refuses cross-origin POSTs (Origin must match Host). Uploads are capped in bytes
(Content-Length checked before the body is read; also on ``Expect: 100-continue``) and in pixels (read from the
image header by :func:`clrface.data.io.load_image` before any pixel is decoded, so a decompression bomb costs
nothing). The only file written is the upload itself, into a fresh temporary folder that is deleted before the
response goes out (``load_image`` reads paths). The model is loaded once; one lock serialises decoding and
restoring, so memory stays that of one request whatever the number of clients.
"""

from __future__ import annotations

import base64
import io
import json
import socket
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import asdict, dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable
from urllib.parse import parse_qs, urlsplit

import numpy as np
from PIL import Image

from clrface.data.io import load_image
from clrface.errors import ClrfaceError, ImageError
from clrface.options import MODES, RestoreOptions
from clrface.photo import RestoreResult
from clrface.restorer import Restorer
from clrface.serve_page import PAGE

LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "::1"})
OPTION_KEYS = ("fidelity", "steps", "seed", "mode", "aligned", "format")


@dataclass(frozen=True)
class ServeLimits:
    """max_bytes: upload size; max_pixels: the photo's W*H (below load_image's 60 MP default: a server should
    stay small); max_steps: sampler steps a request may ask for."""

    max_bytes: int = 20 * 2**20
    max_pixels: int = 16_000_000
    max_steps: int = 100


class RequestError(ClrfaceError):
    """A refused request: HTTP status + one-line message for the page."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def parse_options(query: str, restorer: Restorer, limits: ServeLimits) -> tuple[RestoreOptions, bool, str]:
    """Query string -> (RestoreOptions over the model's defaults, aligned, format "json"|"png"); 400 on bad values."""
    q = {k: v[-1] for k, v in parse_qs(query, keep_blank_values=True).items()}
    unknown = sorted(set(q) - set(OPTION_KEYS))
    if unknown:
        raise RequestError(400, f"unknown option(s) {', '.join(unknown)}; known: {', '.join(OPTION_KEYS)}")

    def num(key: str, cast: Callable[[str], Any]) -> Any:
        if q.get(key, "") == "":
            return None
        try:
            return cast(q[key])
        except ValueError:
            raise RequestError(400, f"{key} must be a number, got {q[key]!r}") from None

    steps = num("steps", int)
    if steps is not None and steps > limits.max_steps:
        raise RequestError(400, f"steps must be <= {limits.max_steps} here, got {steps}")
    mode = q.get("mode") or None
    if mode is not None and mode not in MODES:
        raise RequestError(400, f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
    fmt = q.get("format") or "json"
    if fmt not in ("json", "png"):
        raise RequestError(400, f"format must be json or png, got {fmt!r}")
    try:
        opts = restorer.options(fidelity=num("fidelity", float), steps=steps, seed=num("seed", int), mode=mode,
                                samples=1)
    except ClrfaceError as e:
        raise RequestError(400, str(e)) from None
    return opts, q.get("aligned", "0") in ("1", "true", "on"), fmt


def decode_upload(data: bytes, max_pixels: int) -> np.ndarray:
    """Upload bytes -> uint8 [H,W,3] through load_image (same formats, checks and messages as the CLI); the bytes
    sit in a temporary folder only while it reads them. Too many pixels: 413; anything unreadable: 400."""
    with tempfile.TemporaryDirectory(prefix="clrface-serve-") as tmp:
        path = Path(tmp) / "upload"
        path.write_bytes(data)
        try:
            return load_image(path, max_pixels=max_pixels)
        except ImageError as e:
            status = 413 if e.reason.startswith("too large") else 400
            raise RequestError(status, f"upload: {e.reason}") from None


def png_bytes(img: np.ndarray) -> bytes:
    """uint8 [H,W,3] -> PNG bytes (zlib level 1: the page is local, speed beats size)."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(img)).save(buf, "PNG", compress_level=1)
    return buf.getvalue()


def _b64png(img: np.ndarray) -> str:
    return base64.b64encode(png_bytes(img)).decode("ascii")


def restore_upload(restorer: Restorer, data: bytes, options: RestoreOptions, aligned: bool, limits: ServeLimits
                   ) -> tuple[np.ndarray, RestoreResult, dict[str, Any]]:
    """Decodes and restores one upload -> (photo as read, result, JSON-able summary without images)."""
    t0 = time.perf_counter()
    photo = decode_upload(data, limits.max_pixels)
    res = restorer.restore_image(photo, options, aligned=aligned)
    faces = [{"index": k, "box": [round(float(v), 1) for v in f.box], "id_vs_input": round(f.id_vs_input[0], 4),
              "id_vs_irn": round(f.id_vs_irn[0], 4)} for k, f in enumerate(res.faces)]
    summary = {"size": [int(photo.shape[1]), int(photo.shape[0])], "faces": faces, "no_face": res.no_face,
               "warnings": res.warnings, "sampling": res.sampling, "options": asdict(options), "aligned": aligned,
               "seconds": round(time.perf_counter() - t0, 3)}
    return photo, res, summary


class App:
    """The restorer, its lock and the limits; ``handle_restore`` is the one route that computes."""

    def __init__(self, restorer: Restorer, limits: ServeLimits = ServeLimits()):
        self.restorer, self.limits = restorer, limits
        self.lock = threading.Lock()  # one restore at a time: CPU-bound, and bounds memory to one request

    def info(self) -> dict[str, Any]:
        return {"model": self.restorer.source, "device": str(self.restorer.device),
                "defaults": asdict(self.restorer.options()), "modes": list(MODES),
                "has_irn": self.restorer.irn is not None,
                "limits": asdict(self.limits)}

    def handle_restore(self, query: str, data: bytes) -> tuple[int, str, bytes, dict[str, str]]:
        """-> (status, content type, body, extra headers). Raises RequestError for refusals."""
        options, aligned, fmt = parse_options(query, self.restorer, self.limits)
        if not data:
            raise RequestError(400, "empty upload: send the image file's bytes as the request body")
        with self.lock:
            try:
                photo, res, summary = restore_upload(self.restorer, data, options, aligned, self.limits)
            except MemoryError:
                raise RequestError(507, "out of memory restoring this photo; try a smaller one") from None
            if fmt == "png":
                return 200, "image/png", png_bytes(res.image), {"X-Clrface-Faces": json.dumps(summary["faces"])}
            summary["image"], summary["input"] = _b64png(res.image), _b64png(photo)
            for rec, f in zip(summary["faces"], res.faces):
                rec["crop_in"], rec["crop_out"] = _b64png(f.crop_in), _b64png(f.crops_out[0])
        return 200, "application/json", json.dumps(summary).encode(), {}


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

    # --------------------------------------------------------------------------------------- responses

    def _send(self, status: int, ctype: str, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, status: int, message: str) -> None:
        self._send(status, "application/json", json.dumps({"error": message}).encode())

    def _check_host(self, post: bool) -> bool:
        """DNS-rebinding and cross-origin guards (see the module docstring); False: refused and answered."""
        host = self.headers.get("Host", "")
        if self.server.loopback_only and _hostname(host) not in LOOPBACK_NAMES:
            self._error(403, f"Host {host!r} refused: this server answers only to 127.0.0.1 / localhost")
            return False
        origin = self.headers.get("Origin")
        if post and origin is not None and urlsplit(origin).netloc.lower() != host.lower():
            self._error(403, f"cross-origin request from {origin!r} refused")
            return False
        return True

    def _declared_length(self, *, drain: bool = True) -> int | None:
        """Content-Length if acceptable, else answers 411/413 and returns None. An oversized body the client is
        already sending is read and dropped for a moment (bounded), so that it sees the 413 rather than a reset."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            self._error(411, "chunked uploads are not supported; send Content-Length")
            return None
        raw = self.headers.get("Content-Length")
        try:
            n = int(raw) if raw is not None else -1
        except ValueError:
            n = -1
        if n < 0:
            self.close_connection = True
            self._error(411, "Content-Length required")
            return None
        if n > self.server.app.limits.max_bytes:
            self.close_connection = True
            mb = self.server.app.limits.max_bytes / 2**20
            self._error(413, f"upload too large: {n / 2**20:.1f} MB exceeds the {mb:.0f} MB cap")
            if drain:
                self._drain(n)
            return None
        return n

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
        else:
            self._error(404, f"no such page: {path}")

    do_HEAD = do_GET

    def do_POST(self) -> None:  # noqa: N802
        url = urlsplit(self.path)
        if url.path != "/api/restore":
            self.close_connection = True  # the body is not read: the connection cannot be reused
            self._error(404, f"no such endpoint: POST {url.path}")
            return
        keep_alive = not self.close_connection
        self.close_connection = True  # until the body is read, the connection cannot be reused
        if not self._check_host(post=True):
            return
        n = self._declared_length()
        if n is None:
            return
        data = self.rfile.read(n)
        self.close_connection = not keep_alive
        if len(data) != n:
            self.close_connection = True
            self._error(400, f"upload truncated: got {len(data)} of {n} bytes")
            return
        try:
            status, ctype, body, headers = self.server.app.handle_restore(url.query, data)
        except RequestError as e:
            self._error(e.status, str(e))
            return
        except ClrfaceError as e:  # e.g. mode irn without an irn/ checkpoint
            self._error(400, str(e))
            return
        except Exception as e:  # noqa: BLE001  a bug must not take the server down; the page gets one line
            traceback.print_exc(file=sys.stderr)
            self._error(500, f"internal error: {type(e).__name__}: {e}")
            return
        self._send(status, ctype, body, headers)

    def do_PUT(self) -> None:  # noqa: N802
        self.close_connection = True
        self._error(405, "method not allowed")

    do_DELETE = do_PATCH = do_PUT

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        if not self.server.quiet:
            super().log_message(format, *args)


class ClrfaceServer(ThreadingHTTPServer):
    daemon_threads = True  # Ctrl+C does not wait for stalled clients
    request_queue_size = 16

    def __init__(self, address: tuple[str, int], app: App, *, quiet: bool = False):
        self.app, self.quiet = app, quiet
        self.loopback_only = address[0] in LOOPBACK_NAMES or address[0].startswith("127.")
        if ":" in address[0]:
            self.address_family = socket.AF_INET6  # read by TCPServer.__init__
        super().__init__(address, Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that hung up mid-response is routine (a closed tab), not a traceback.
        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            return
        super().handle_error(request, client_address)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{'[' + host + ']' if ':' in str(host) else host}:{port}/"


def make_server(restorer: Restorer, host: str = "127.0.0.1", port: int = 7860, limits: ServeLimits = ServeLimits(),
                *, quiet: bool = False) -> ClrfaceServer:
    """A bound, not yet serving server (port 0: a free port; see ``.url``). Call ``serve_forever()``."""
    try:
        return ClrfaceServer((host, port), App(restorer, limits), quiet=quiet)
    except (OSError, OverflowError) as e:  # OverflowError: a port outside 0..65535
        raise ClrfaceError(f"cannot listen on {host}:{port} ({getattr(e, 'strerror', None) or e})") from None


def serve(restorer: Restorer, host: str = "127.0.0.1", port: int = 7860, limits: ServeLimits = ServeLimits(),
          *, log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True)) -> None:
    """Serves until Ctrl+C."""
    server = make_server(restorer, host, port, limits)
    log(f"clrface: serving {restorer.source} on {server.url} (one restore at a time; Ctrl+C to stop)")
    if not server.loopback_only:
        log(f"clrface: warning: listening on {host}, reachable from other machines; there is no authentication")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        log("clrface: stopped")
    finally:
        server.server_close()
