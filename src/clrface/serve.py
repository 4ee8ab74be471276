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
                                 crop_in, crop_out}], no_face, warnings, sampling, options, seconds}, sent in
                                 chunks as it is encoded (format=png: the restored photo as image/png, scores in
                                 X-Clrface-Faces)
                            4xx: JSON {error: "one line"}; the server keeps serving. 413/422 for too much work
                                 also carry {cost, limit, faces, evaluations_per_face}

Safety: binds 127.0.0.1 unless told otherwise; on a loopback address it answers only Host headers naming
loopback (DNS-rebinding) and refuses cross-origin POSTs (Origin must match Host). Uploads are capped in bytes
(Content-Length checked before the body is read; also on ``Expect: 100-continue``) and in pixels (read from the
image header by :func:`clrface.data.io.load_image` before any pixel is decoded, so a decompression bomb costs
nothing). The only file written is the upload itself, into a fresh temporary folder that is deleted before the
response goes out (``load_image`` reads paths). The model is loaded once; one lock serialises decoding and
restoring, so memory stays that of one request whatever the number of clients; that work runs on one worker
thread (:class:`Worker`), so that no connection thread's malloc arena keeps a request's worth of freed memory.

Work per request is bounded: its cost is faces x network evaluations per face (1 for the IRN / VQGAN pass, plus
the sampler's denoiser evaluations in modes full and prior: heun 2 x steps - 1, euler and dpmpp_2m one per step),
at most ``ServeLimits.max_evaluations`` (400 by default: 20 faces at the default 10 heun steps, 2 faces at 100;
one guided evaluation of the default model takes ~0.1-0.5 s on a CPU). A request over it is refused before any
restoring: 422 when one face already costs more, 413 when the photo has too many faces for the options; both
state the cost and the limit. The restore lock is held from decoding the upload until the answer has gone out,
so the answer (streamed in chunks, never built whole) is the only one in memory; a client that does not take it
within ``ServeLimits.send_seconds`` is cut off. A client that disconnects stops its work: the handler checks the
socket while waiting for the lock and between batches of faces, and gives the lock up.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import queue
import select
import socket
import sys
import tempfile
import threading
import time
import traceback
from concurrent.futures import Future
from dataclasses import asdict, dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator
from urllib.parse import parse_qs, urlsplit

import numpy as np
from PIL import Image

from clrface.data.io import load_image, to_model_range
from clrface.diffusion.sampler import nfe
from clrface.errors import ClrfaceError, ImageError
from clrface.options import DIFFUSION_MODES, MODES, RestoreOptions
from clrface.photo import RestoreResult, restore_photo
from clrface.restorer import RestoredFaces, Restorer
from clrface.serve_page import PAGE

LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "::1"})
OPTION_KEYS = ("fidelity", "steps", "seed", "mode", "aligned", "format")


@dataclass(frozen=True)
class ServeLimits:
    """max_bytes: upload size; max_pixels: the photo's W*H (below load_image's 60 MP default: a server should
    stay small); max_steps: sampler steps a request may ask for; max_evaluations: faces x network evaluations per
    face (:func:`evaluations_per_face`) a request may cost; send_seconds: time a client has to take its answer."""

    max_bytes: int = 20 * 2**20
    max_pixels: int = 16_000_000
    max_steps: int = 100
    max_evaluations: int = 400
    send_seconds: float = 120.0


class RequestError(ClrfaceError):
    """A refused request: HTTP status + one-line message for the page."""

    def __init__(self, status: int, message: str, **fields: Any):
        super().__init__(message)
        self.status, self.fields = status, fields


class ClientGone(Exception):
    """The client closed its connection: its restore stops and nothing is answered."""


def evaluations_per_face(restorer: Restorer, options: RestoreOptions) -> int:
    """Network evaluations one face costs: 1 for the IRN / VQGAN pass, plus the sampler's denoiser evaluations
    (each a U-Net pass, with a decode and face-recognition pass when guided) in the diffusion modes."""
    sigma_start, _ = options.resolve(restorer.fidelity_map)
    sampled = options.mode in DIFFUSION_MODES and sigma_start > 0
    return 1 + (nfe(options.sampler, options.steps) if sampled else 0) * options.samples


def check_cost(restorer: Restorer, options: RestoreOptions, faces: int, limit: int) -> None:
    """Raises RequestError (422 if one face is over ``limit``, else 413) when faces x evaluations exceeds it."""
    per_face = evaluations_per_face(restorer, options)
    cost = faces * per_face
    if cost <= limit:
        return
    what = (f"{faces} face(s) x {per_face} network evaluations = {cost}" if faces > 1
            else f"{per_face} network evaluations per face")
    status = 422 if per_face > limit else 413
    hint = "fewer steps or mode irn" if status == 422 else "fewer faces (a crop), fewer steps or mode irn"
    raise RequestError(status, f"too much work: {what}, over this server's limit of {limit} per request; "
                               f"try {hint}", cost=cost, limit=limit, faces=faces, evaluations_per_face=per_face)


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


class GuardedRestorer:
    """The restorer as :func:`clrface.photo.restore_photo` sees it, with the server's checks around its faces:
    the request's cost once the faces are found, and the client's connection before each batch."""

    def __init__(self, restorer: Restorer, limit: int, gone: Callable[[], bool]):
        self.restorer, self.limit, self.gone = restorer, limit, gone

    def __getattr__(self, name: str) -> Any:
        return getattr(self.restorer, name)

    def restore_crops(self, crops: np.ndarray, options: RestoreOptions) -> RestoredFaces:
        """Restorer.restore_crops, refused over the limit and stopped between batches when the client is gone."""
        check_cost(self.restorer, options, len(crops), self.limit)
        parts = []
        for i in range(0, len(crops), options.batch_size):
            if self.gone():
                raise ClientGone
            parts.append(self.restorer.restore_faces(to_model_range(crops[i:i + options.batch_size]), options,
                                                     first_index=i))
        return RestoredFaces.concat(parts)


def restore_upload(restorer: Restorer, data: bytes, options: RestoreOptions, aligned: bool, limits: ServeLimits,
                   gone: Callable[[], bool] = lambda: False) -> tuple[np.ndarray, RestoreResult, dict[str, Any]]:
    """Decodes and restores one upload -> (photo as read, result, JSON-able summary without images). Raises
    RequestError when the faces found cost more than ``limits.max_evaluations``, ClientGone when ``gone()``."""
    t0 = time.perf_counter()
    photo = decode_upload(data, limits.max_pixels)
    res = restore_photo(GuardedRestorer(restorer, limits.max_evaluations, gone), photo, options, aligned=aligned)
    faces = [{"index": k, "box": [round(float(v), 1) for v in f.box], "id_vs_input": round(f.id_vs_input[0], 4),
              "id_vs_irn": round(f.id_vs_irn[0], 4)} for k, f in enumerate(res.faces)]
    summary = {"size": [int(photo.shape[1]), int(photo.shape[0])], "faces": faces, "no_face": res.no_face,
               "warnings": res.warnings, "sampling": res.sampling, "options": asdict(options), "aligned": aligned,
               "seconds": round(time.perf_counter() - t0, 3)}
    return photo, res, summary


B64_CHUNK = 3 * 2**18  # PNG bytes per base64 piece: a multiple of 3, so the pieces concatenate to one base64


def json_chunks(summary: dict[str, Any], images: dict[str, np.ndarray]) -> Iterator[bytes]:
    """``summary`` as a JSON object with each of ``images`` added as a base64 PNG string, in pieces of ~1 MB:
    only one PNG and one piece of its base64 exist at a time (a 16 MP photo's answer is ~130 MB whole)."""
    head = json.dumps(summary)
    yield head[:-1].encode()
    for key, img in images.items():
        yield f", {json.dumps(key)}: \"".encode()
        data = png_bytes(img)
        for i in range(0, len(data), B64_CHUNK):
            yield base64.b64encode(data[i:i + B64_CHUNK])
        del data
        yield b'"'
    yield b"}"


class Worker:
    """One daemon thread that runs the calls handed to it, one at a time. Decoding, restoring and encoding all
    run there rather than in each connection's thread: glibc gives threads their own malloc arenas and keeps
    what they freed, so a restore in every new connection thread grew the server by one request's working set
    per thread (measured after 10 requests of a 9 MP photo: RSS +304 MB that way, +11 MB on this one thread).
    Daemon: Ctrl+C does not wait for a restore."""

    def __init__(self) -> None:
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._loop, name="clrface-restore", daemon=True).start()

    def _loop(self) -> None:
        while True:
            fn, args, fut = self.jobs.get()
            try:
                fut.set_result(fn(*args))
            except BaseException as e:  # noqa: BLE001  handed to the caller, which re-raises it
                fut.set_exception(e)
            del fn, args, fut

    def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """fn(*args) on the worker thread; its result, or its exception raised here."""
        fut: Future = Future()
        self.jobs.put((fn, args, fut))
        return fut.result()

    def pieces(self, chunks: Iterator[bytes]) -> Iterator[bytes]:
        """``chunks``, each produced on the worker thread."""
        while (piece := self.run(next, chunks, None)) is not None:
            yield piece


@dataclass
class Reply:
    status: int
    ctype: str
    chunks: Iterable[bytes]
    headers: dict[str, str]


class App:
    """The restorer, its lock and the limits; ``restoring`` is the one route that computes."""

    def __init__(self, restorer: Restorer, limits: ServeLimits = ServeLimits()):
        self.restorer, self.limits = restorer, limits
        # One restore at a time, held until its answer has been sent: CPU-bound, and bounds memory to one request
        self.lock = threading.Lock()
        self.worker = Worker()

    def info(self) -> dict[str, Any]:
        return {"model": model_name(self.restorer.source), "device": str(self.restorer.device),
                "defaults": asdict(self.restorer.options()), "modes": list(MODES),
                "has_irn": self.restorer.irn is not None,
                "limits": asdict(self.limits)}

    @contextlib.contextmanager
    def restoring(self, query: str, data: bytes, gone: Callable[[], bool] = lambda: False) -> Iterator[Reply]:
        """Holds the lock and yields the Reply to send (its chunks are encoded as they are read); released once
        the ``with`` body ends. Raises RequestError for refusals, ClientGone when ``gone()`` turns true."""
        options, aligned, fmt = parse_options(query, self.restorer, self.limits)
        if not data:
            raise RequestError(400, "empty upload: send the image file's bytes as the request body")
        check_cost(self.restorer, options, 1, self.limits.max_evaluations)
        while not self.lock.acquire(timeout=0.25):
            if gone():
                raise ClientGone
        try:
            try:
                photo, res, summary = self.worker.run(restore_upload, self.restorer, data, options, aligned,
                                                      self.limits, gone)
            except MemoryError:
                raise RequestError(507, "out of memory restoring this photo; try a smaller one") from None
            if fmt == "png":
                yield Reply(200, "image/png", [self.worker.run(png_bytes, res.image)],
                            {"X-Clrface-Faces": json.dumps(summary["faces"])})
                return
            for rec, f in zip(summary["faces"], res.faces):
                rec["crop_in"], rec["crop_out"] = _b64png(f.crop_in), _b64png(f.crops_out[0])
            chunks = json_chunks(summary, {"image": res.image, "input": photo})
            del photo, res
            yield Reply(200, "application/json", self.worker.pieces(chunks), {})
        finally:
            self.lock.release()

    def handle_restore(self, query: str, data: bytes) -> tuple[int, str, bytes, dict[str, str]]:
        """-> (status, content type, whole body, extra headers): ``restoring`` for callers without a socket."""
        with self.restoring(query, data) as r:
            return r.status, r.ctype, b"".join(r.chunks), r.headers


def model_name(source: str | None) -> str:
    """What the page says of the model: its folder's name (an installed model's name), not the server's path."""
    return Path(source).name if source else "model"


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

    def _error(self, status: int, message: str, **fields: Any) -> None:
        self._send(status, "application/json", json.dumps({"error": message, **fields}).encode())

    def _send_chunked(self, reply: Reply) -> None:
        """Sends ``reply`` with chunked transfer encoding as its pieces are produced. A client that has spent more
        than ``send_seconds`` taking it (encoding time not counted) is cut off: its thread holds the restore lock
        meanwhile."""
        left = self.server.app.limits.send_seconds
        self.send_response(reply.status)
        self.send_header("Content-Type", reply.ctype)
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        for k, v in reply.headers.items():
            self.send_header(k, v)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        for piece in reply.chunks:
            if not piece:
                continue
            if left <= 0:
                raise TimeoutError("client did not take its answer in time")
            self.connection.settimeout(left)  # sendall's timeout bounds the whole piece
            t0 = time.monotonic()
            self.wfile.write(b"%x\r\n%b\r\n" % (len(piece), piece))
            left -= time.monotonic() - t0
        self.wfile.write(b"0\r\n\r\n")
        self.connection.settimeout(self.timeout)

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
            with self.server.app.restoring(url.query, data, lambda: client_gone(self.connection)) as reply:
                try:
                    self._send_chunked(reply)
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
