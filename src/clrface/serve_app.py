"""What one ``clrface serve`` request does, apart from HTTP: parse its options, price its work, decode the upload,
restore it on the worker thread and encode the answer (:class:`App`); :mod:`clrface.serve` puts HTTP around it.

Work per request is bounded: its cost is faces x network evaluations per face (1 for the IRN / VQGAN pass, plus
the sampler's denoiser evaluations in modes full and prior: heun 2 x steps - 1, euler and dpmpp_2m one per step),
at most ``ServeLimits.max_evaluations`` (400 by default: 20 faces at the default 10 heun steps, 2 faces at 100;
one guided evaluation of the default model takes ~0.1-0.5 s on a CPU). A request over it is refused before any
restoring: 422 when one face already costs more, 413 when the photo has too many faces for the options; both
state the cost and the limit. The model is loaded once; one lock serialises decoding and restoring, so memory
stays that of one request whatever the number of clients; that work runs on one worker thread (:class:`Worker`),
so that no connection thread's malloc arena keeps a request's worth of freed memory. The lock is held from
decoding the upload until the answer has gone out, so the answer (streamed in chunks, never built whole) is the
only one in memory. The only files written are the uploaded photos themselves, each into a fresh temporary folder
deleted as soon as it is read (``load_image`` reads paths). A client that disconnects stops its work: ``gone()``
is checked while waiting for the lock, before each batch of faces and before each denoiser evaluation, and the
lock is given up.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import queue
import tempfile
import threading
import time
from concurrent.futures import Future
from dataclasses import asdict, dataclass
from email.parser import BytesParser
from email.policy import HTTP
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence
from urllib.parse import parse_qs

import numpy as np
from PIL import Image
from torch import Tensor

from clrface.data.io import load_image
from clrface.diffusion.sampler import nfe
from clrface.errors import ClrfaceError, ImageError
from clrface.options import DIFFUSION_MODES, MODES, RestoreOptions, mode_for_reference, unused_options
from clrface.photo import RestoreResult, restore_photo
from clrface.reference import ReferencePolicy, load_reference
from clrface.restorer import RestoredFaces, Restorer

OPTION_KEYS = ("fidelity", "steps", "seed", "mode", "aligned", "format", "reference_all", "force_reference")
#: Reference photos one request may carry (each costs one decode and one embedding).
MAX_REFERENCES = 5


@dataclass(frozen=True)
class ServeLimits:
    """max_bytes: upload size; max_pixels: the photo's W*H (below load_image's 120 MP default: a server should
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


def split_upload(data: bytes, content_type: str) -> tuple[bytes, list[bytes]]:
    """The request body -> (photo bytes, reference photos' bytes). A plain body is the photo; a
    ``multipart/form-data`` body holds one ``photo`` field and up to ``MAX_REFERENCES`` ``reference`` fields."""
    if not content_type.lower().startswith("multipart/form-data"):
        return data, []
    msg = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + data)
    if not msg.is_multipart():
        raise RequestError(400, "multipart body without parts (or without its boundary)")
    fields: dict[str, list[bytes]] = {}
    for part in msg.iter_parts():
        name = part.get_param("name", header="content-disposition")
        fields.setdefault(str(name), []).append(part.get_payload(decode=True) or b"")
    unknown = sorted(set(fields) - {"photo", "reference"})
    if unknown or len(fields.get("photo", [])) != 1:
        raise RequestError(400, "a multipart upload holds one 'photo' field and optional 'reference' fields"
                                + (f"; unknown: {', '.join(unknown)}" if unknown else ""))
    refs = [r for r in fields.get("reference", []) if r]
    if len(refs) > MAX_REFERENCES:
        raise RequestError(413, f"{len(refs)} reference photos: at most {MAX_REFERENCES} per request")
    return fields["photo"][0], refs


FLAG_VALUES = {"1": True, "true": True, "on": True, "yes": True, "0": False, "false": False, "off": False,
               "no": False, "": False}


def parse_options(query: str, restorer: Restorer, limits: ServeLimits, references: int = 0
                  ) -> tuple[RestoreOptions, bool, str, ReferencePolicy]:
    """Query string -> (RestoreOptions over the model's defaults, aligned, format "json"|"png", the reference
    policy); 400 on bad values. With ``references`` the mode is full unless the query names another (refused)."""
    given = parse_qs(query, keep_blank_values=True)
    unknown = sorted(set(given) - set(OPTION_KEYS))
    if unknown:
        raise RequestError(400, f"unknown option(s) {', '.join(unknown)}; known: {', '.join(OPTION_KEYS)}")
    twice = sorted(k for k, v in given.items() if len(v) > 1)
    if twice:
        raise RequestError(400, f"option(s) given more than once: {', '.join(twice)}")
    q = {k: v[0] for k, v in given.items()}

    def num(key: str, cast: Callable[[str], Any]) -> Any:
        if q.get(key, "") == "":
            return None
        try:
            return cast(q[key])
        except ValueError:
            kind = "an integer" if cast is int else "a number"
            raise RequestError(400, f"{key} must be {kind}, got {q[key]!r}") from None

    steps = num("steps", int)
    if steps is not None and steps > limits.max_steps:
        raise RequestError(400, f"steps must be <= {limits.max_steps} here, got {steps}")
    mode = q.get("mode", "").lower() or None
    if mode is not None and mode not in MODES:
        raise RequestError(400, f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
    fmt = q.get("format", "").lower() or "json"
    if fmt not in ("json", "png"):
        raise RequestError(400, f"format must be json or png, got {fmt!r}")
    try:
        opts = restorer.options(fidelity=num("fidelity", float), steps=steps, seed=num("seed", int),
                                mode=mode_for_reference(mode) if references else mode, samples=1)
    except ClrfaceError as e:
        raise RequestError(400, str(e)) from None

    def flag(key: str) -> bool:
        value = q.get(key, "0").lower()
        if value not in FLAG_VALUES:
            raise RequestError(400, f"{key} must be one of {', '.join(filter(None, FLAG_VALUES))}, got {q[key]!r}")
        return FLAG_VALUES[value]

    return opts, flag("aligned"), fmt, ReferencePolicy(all_faces=flag("reference_all"), force=flag("force_reference"))


def unused_query_options(query: str, options: RestoreOptions) -> list[str]:
    """The warning for options the query sets that the mode does not read (the default model's mode irn ignores
    fidelity, steps and seed), as a one-item list; empty when it reads them all."""
    given = [k for k, v in parse_qs(query, keep_blank_values=True).items() if v[0] != ""]
    unused = unused_options(options.mode, given)
    return [unused] if unused else []


def decode_upload(data: bytes, max_pixels: int, what: str = "upload") -> np.ndarray:
    """Upload bytes -> uint8 [H,W,3] through load_image (same formats, checks and messages as the CLI); the bytes
    sit in a temporary folder only while it reads them. Too many pixels: 413; anything unreadable: 400."""
    with tempfile.TemporaryDirectory(prefix="clrface-serve-") as tmp:
        path = Path(tmp) / "upload"
        path.write_bytes(data)
        try:
            return load_image(path, max_pixels=max_pixels)
        except ImageError as e:
            status = 413 if e.reason.startswith("too large") else 400
            raise RequestError(status, f"{what}: {e.reason}") from None


def png_bytes(img: np.ndarray) -> bytes:
    """uint8 [H,W,3] -> PNG bytes (zlib level 1: the page is local, speed beats size)."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(img)).save(buf, "PNG", compress_level=1)
    return buf.getvalue()


def add_face_crops(summary: dict[str, Any], res: RestoreResult) -> None:
    """Each face's record in ``summary`` gets its input and restored crops as base64 PNGs."""
    for rec, f in zip(summary["faces"], res.faces):
        rec["crop_in"], rec["crop_out"] = (base64.b64encode(png_bytes(c)).decode("ascii")
                                           for c in (f.crop_in, f.crops_out[0]))


class GuardedRestorer:
    """The restorer as :func:`clrface.photo.restore_photo` sees it, with the server's checks around its faces:
    the request's cost once the faces are found, and the client's connection before each batch."""

    def __init__(self, restorer: Restorer, limit: int, gone: Callable[[], bool]):
        self.restorer, self.limit, self.gone = restorer, limit, gone

    def __getattr__(self, name: str) -> Any:
        return getattr(self.restorer, name)

    def check(self) -> None:
        if self.gone():
            raise ClientGone

    def restore_crops(self, crops: np.ndarray, options: RestoreOptions, reference: Tensor | None = None
                      ) -> RestoredFaces:
        """Restorer.restore_crops, refused over the limit and stopped before each batch and each denoiser
        evaluation when the client is gone."""
        check_cost(self.restorer, options, len(crops), self.limit)
        return self.restorer.restore_crops(crops, options, reference, interrupt=self.check)


def restore_upload(restorer: Restorer, data: bytes, options: RestoreOptions, aligned: bool, limits: ServeLimits,
                   gone: Callable[[], bool] = lambda: False, references: Sequence[bytes] = (),
                   policy: ReferencePolicy = ReferencePolicy()) -> tuple[np.ndarray, RestoreResult, dict[str, Any]]:
    """Decodes and restores one upload -> (photo as read, result, JSON-able summary without images). Raises
    RequestError when the faces found cost more than ``limits.max_evaluations``, ClientGone when ``gone()``.
    ``references``: the bytes of reference photos of the person (aligned crops when ``aligned``)."""
    t0 = time.perf_counter()
    photo = decode_upload(data, limits.max_pixels)
    reference = None
    if references:
        arrays = [decode_upload(r, limits.max_pixels, "reference") for r in references]
        try:
            reference = load_reference(restorer, arrays, aligned=aligned)
        except ClrfaceError as e:
            raise RequestError(422, str(e)) from None
    res = restore_photo(GuardedRestorer(restorer, limits.max_evaluations, gone), photo, options, aligned=aligned,
                        reference=reference, reference_policy=policy)
    faces = [{"index": k, "box": [round(float(v), 1) for v in f.box], "id_vs_input": round(f.id_vs_input[0], 4),
              "id_vs_irn": round(f.id_vs_irn[0], 4), **({"reference": f.reference} if f.reference else {})}
             for k, f in enumerate(res.faces)]
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


def acquire_unless(lock: threading.Lock | threading.Semaphore, gone: Callable[[], bool]) -> bool:
    """Waits for ``lock``, checking ``gone()`` every 0.25 s: True once acquired, False (not acquired) when
    ``gone()`` turned true first."""
    while not lock.acquire(timeout=0.25):
        if gone():
            return False
    return True


class Worker:
    """One daemon thread that runs the calls handed to it, one at a time. Decoding, restoring and encoding all
    run there rather than in each connection's thread: glibc gives threads their own malloc arenas and keeps
    what they freed, so a restore in every new connection thread grew the server by one request's working set
    per thread (measured after 10 requests of a 9 MP photo: RSS +304 MB that way, +11 MB on this one thread).
    Daemon: Ctrl+C does not wait for a restore."""

    def __init__(self) -> None:
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.closed = False  # set on the worker thread itself: the calls handed over after close() are refused
        threading.Thread(target=self._loop, name="clrface-restore", daemon=True).start()

    def _loop(self) -> None:
        while True:
            fn, args, fut = self.jobs.get()
            try:
                if self.closed:
                    raise ClientGone
                fut.set_result(fn(*args))
            except BaseException as e:  # noqa: BLE001  handed to the caller, which re-raises it
                fut.set_exception(e)
            del fn, args, fut

    def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """fn(*args) on the worker thread; its result, or its exception raised here."""
        fut: Future = Future()
        self.jobs.put((fn, args, fut))
        return fut.result()

    def close(self, seconds: float) -> None:
        """Returns once the calls handed over so far have run, refusing later ones (ClientGone): a process must
        not exit while torch computes on this thread (it aborts). TimeoutError after ``seconds``."""
        fut: Future = Future()
        self.jobs.put((setattr, (self, "closed", True), fut))
        fut.result(timeout=seconds)

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
        self.stopping = False

    def stop(self, seconds: float = 30.0) -> None:
        """Ends the restore under way (as if its client had gone: within one network evaluation), waits up to
        ``seconds`` for the worker to finish it and closes the worker; later requests are refused."""
        self.stopping = True
        with contextlib.suppress(TimeoutError):
            self.worker.close(seconds)

    def info(self) -> dict[str, Any]:
        return {"model": model_name(self.restorer.source), "device": str(self.restorer.device),
                "defaults": asdict(self.restorer.options()), "modes": list(MODES),
                "has_irn": self.restorer.irn is not None,
                "limits": asdict(self.limits)}

    @contextlib.contextmanager
    def restoring(self, query: str, data: bytes, gone: Callable[[], bool] = lambda: False,
                  content_type: str = "application/octet-stream") -> Iterator[Reply]:
        """Holds the lock and yields the Reply to send (its chunks are encoded as they are read); released once
        the ``with`` body ends. Raises RequestError for refusals, ClientGone when ``gone()`` turns true. The body
        is the photo, or a multipart form with the photo and reference photos (:func:`split_upload`)."""
        if self.stopping:
            raise RequestError(503, "the server is stopping")
        data, references = split_upload(data, content_type)
        options, aligned, fmt, policy = parse_options(query, self.restorer, self.limits, len(references))
        if not data:
            raise RequestError(400, "empty upload: send the image file's bytes as the request body")
        check_cost(self.restorer, options, 1, self.limits.max_evaluations)
        notes = unused_query_options(query, options)
        def ended() -> bool:  # the client gone, or the server stopping: the work stops either way
            return self.stopping or gone()

        if not acquire_unless(self.lock, ended):
            raise ClientGone
        try:
            try:
                photo, res, summary = self.worker.run(restore_upload, self.restorer, data, options, aligned,
                                                      self.limits, ended, references, policy)
                summary["warnings"] = notes + summary["warnings"]
            except MemoryError:
                raise RequestError(507, "out of memory restoring this photo; try a smaller one") from None
            if fmt == "png":
                yield Reply(200, "image/png", [self.worker.run(png_bytes, res.image)],
                            {"X-Clrface-Faces": json.dumps(summary["faces"]),
                             "X-Clrface-No-Face": str(int(summary["no_face"])),
                             "X-Clrface-Warnings": json.dumps(summary["warnings"])})
                return
            self.worker.run(add_face_crops, summary, res)
            chunks = json_chunks(summary, {"image": res.image, "input": photo})
            del photo, res
            yield Reply(200, "application/json", self.worker.pieces(chunks), {})
        finally:
            self.lock.release()


def model_name(source: str | None) -> str:
    """What the page says of the model: its folder's name (an installed model's name), not the server's path."""
    return Path(source).name if source else "model"
