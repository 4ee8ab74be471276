"""`clrface serve`: a real server on a free loopback port, in a thread, with the shipped default model."""

import base64
import http.client
import io
import json
import resource
import socket
import struct
import tempfile
import threading
import zlib

import numpy as np
import psutil
import pytest
import torch
from PIL import Image

from clrface.cli import build_parser
from clrface.demo import demo_image
from clrface.errors import ClrfaceError
from clrface.restorer import Restorer
from clrface.serve import ServeLimits, make_server, parse_options

MAX_BYTES = 1 << 20  # 1 MiB here, so that an oversized upload is cheap to send


def png_bomb(side: int = 20000) -> bytes:
    """A valid 1-bit greyscale PNG of side x side pixels (~50 KB; 1.2 GB once decoded to RGB)."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    comp, row = zlib.compressobj(9), b"\x00" * (1 + (side + 7) // 8)  # filter byte + packed bits
    idat = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def restorer() -> Restorer:
    torch.set_num_threads(1)
    return Restorer.from_pretrained()  # shipped model; its default mode (irn) restores a face in < 1 s


@pytest.fixture(scope="module")
def server(restorer):
    srv = make_server(restorer, "127.0.0.1", 0, ServeLimits(max_bytes=MAX_BYTES), quiet=True)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def request(srv, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    """-> (status, headers, body bytes)."""
    conn = http.client.HTTPConnection(*srv.server_address[:2], timeout=60)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return r.status, dict(r.getheaders()), r.read()
    finally:
        conn.close()


def post(srv, data: bytes, query: str = "", **kw):
    return request(srv, "POST", "/api/restore" + (f"?{query}" if query else ""), data, **kw)


def b64_image(s: str) -> np.ndarray:
    raw = base64.b64decode(s)
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    return np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"))


def test_page_and_info(server):
    st, hdr, body = request(server, "GET", "/")
    assert st == 200 and hdr["Content-Type"].startswith("text/html")
    page = body.decode()
    for elem in ('id="file" type="file"', 'id="fidelity"', 'id="steps"', 'id="seed"', 'id="mode"', 'id="restore"',
                 'id="before"', 'id="after"', 'id="download"'):
        assert elem in page
    assert "default-src 'none'" in hdr["Content-Security-Policy"]
    st, _, body = request(server, "GET", "/api/info")
    info = json.loads(body)
    assert st == 200 and info["defaults"]["mode"] == "irn" and info["limits"]["max_bytes"] == MAX_BYTES
    assert request(server, "GET", "/nope")[0] == 404


def test_restores_demo_photo(demo_upload, server):
    data = demo_upload
    st, hdr, body = post(server, data, "fidelity=0.5&steps=10&seed=0&mode=irn",
                         headers={"Content-Type": "application/octet-stream"})
    assert st == 200 and hdr["Content-Type"] == "application/json"
    res = json.loads(body)
    out, inp = b64_image(res["image"]), b64_image(res["input"])
    assert out.shape == inp.shape == (256, 256, 3) and res["size"] == [256, 256]
    np.testing.assert_array_equal(inp, np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
    assert len(res["faces"]) == 1 and not res["no_face"]
    face = res["faces"][0]
    x0, y0, x1, y1 = face["box"]
    assert 70 < x0 < x1 < 150 and 20 < y0 < y1 < 100  # the astronaut's face, upper middle
    # IRN output vs the IRN: the same face; vs the degraded input: still that person (0.989 measured)
    assert face["id_vs_irn"] == pytest.approx(1.0, abs=1e-3) and 0.9 < face["id_vs_input"] <= 1.0
    assert b64_image(face["crop_in"]).shape == b64_image(face["crop_out"]).shape == (128, 128, 3)
    # The face changed, the far background did not (paste-back touches only the face's mask).
    diff = np.abs(out.astype(int) - inp)
    inside = diff[int(y0):int(y1), int(x0):int(x1)].mean()
    print(f"mean |restored - input| inside the face box: {inside:.2f} (whole photo {diff.mean():.2f})")
    assert inside > 2.0
    np.testing.assert_array_equal(out[-40:, :40], inp[-40:, :40])
    # format=png: the same restored photo as image/png, the scores in a header
    st, hdr, png = post(server, data, "fidelity=0.5&steps=10&seed=0&mode=irn&format=png")
    assert st == 200 and hdr["Content-Type"] == "image/png"
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png)).convert("RGB")), out)
    assert json.loads(hdr["X-Clrface-Faces"])[0]["id_vs_input"] == face["id_vs_input"]


def _oversize_claim(srv) -> tuple[int, bytes]:
    """Claims a 10 GB body and sends none: the 413 must come from the header alone."""
    with socket.create_connection(srv.server_address[:2], timeout=10) as s:
        s.sendall(b"POST /api/restore HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 10000000000\r\n"
                  b"Expect: 100-continue\r\n\r\n")
        resp = b""
        while b"\r\n\r\n" not in resp or not resp.rstrip().endswith(b"}"):
            got = s.recv(4096)
            if not got:
                break
            resp += got
    head, _, body = resp.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def test_bad_uploads_are_refused_and_server_keeps_serving(demo_upload, server, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the only place the server may write
    good = demo_upload
    png = io.BytesIO()
    Image.fromarray(demo_image()).save(png, "PNG")
    truncated = png.getvalue()[: len(png.getvalue()) // 3]
    bomb = png_bomb()
    assert len(bomb) < MAX_BYTES
    cases = [  # (body, query, status, words in the message)
        (truncated, "", 400, "corrupt"),
        (b"%PDF-1.4 not an image at all" * 10, "", 400, "not an image"),
        (bomb, "", 413, "too large"),  # PIL's own bomb guard fires first at 400 MP
        (png_bomb(5000), "", 413, "25 MP exceeds the 16 MP cap"),  # ours, from the header
        (b"", "", 400, "empty upload"),
        (b"\x00" * (MAX_BYTES + 1), "", 413, "exceeds the 1 MB cap"),
        (good, "fidelity=2", 400, "fidelity must be in [0, 1]"),
        (good, "steps=1000", 400, "steps must be <= 100"),
        (good, "mode=magic", 400, "unknown mode"),
        (good, "seed=abc", 400, "seed must be a number"),
        (good, "path=/etc/passwd", 400, "unknown option"),
    ]
    proc = psutil.Process()
    rss0, now0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, proc.memory_info().rss
    for i in range(50):
        body, query, status, words = cases[i % len(cases)]
        st, _, resp = post(server, body, query)
        assert st == status, (i, resp)
        assert words in json.loads(resp)["error"], (i, resp)
    st, body = _oversize_claim(server)
    assert st == 413 and b"exceeds" in body
    peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    now_mb = (proc.memory_info().rss - now0) / 2**20
    print(f"50 bad uploads: peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB "
          f"(+{peak_mb:.1f} MB), RSS now {proc.memory_info().rss / 2**20:.0f} MB (+{now_mb:.1f} MB)")
    assert peak_mb < 100 and now_mb < 50  # decoding the bomb alone would take 1.2 GB
    st, _, body = post(server, good)
    assert st == 200 and len(json.loads(body)["faces"]) == 1
    assert list(tmp_path.iterdir()) == []  # each upload's temporary folder is gone


def test_host_and_origin_guards(demo_upload, server):
    assert request(server, "GET", "/", headers={"Host": "attacker.example:7860"})[0] == 403
    assert request(server, "GET", "/", headers={"Host": "localhost:7860"})[0] == 200
    st, _, body = post(server, demo_upload, headers={"Origin": "http://attacker.example"})
    assert st == 403 and "cross-origin" in json.loads(body)["error"]
    assert request(server, "POST", "/elsewhere", b"x")[0] == 404
    assert request(server, "PUT", "/api/restore", b"x")[0] == 405


def test_connection_survives_a_refusal(server):
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=60)
    try:
        statuses = []
        for method, path, body in [("POST", "/api/restore", b"not an image"), ("GET", "/api/info", None),
                                   ("POST", "/api/restore?fidelity=9", b"x"), ("GET", "/", None)]:
            conn.request(method, path, body=body)
            r = conn.getresponse()
            r.read()
            statuses.append(r.status)
        assert statuses == [400, 200, 400, 200]
    finally:
        conn.close()


def test_restores_run_one_at_a_time(demo_upload, server, restorer, monkeypatch):
    active, peak, lock = [0], [0], threading.Lock()
    real = restorer.restore_image

    def counting(*a, **kw):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        try:
            return real(*a, **kw)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(restorer, "restore_image", counting)
    crop = io.BytesIO()
    Image.fromarray(np.asarray(Image.open(io.BytesIO(demo_upload)))[20:148, 60:188]).save(crop, "PNG")
    codes: list[int] = []
    threads = [threading.Thread(target=lambda: codes.append(post(server, crop.getvalue(), "aligned=1")[0]))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert codes == [200, 200, 200] and peak[0] == 1


def test_parse_options_uses_model_defaults(restorer):
    lim = ServeLimits()
    o, aligned, fmt = parse_options("", restorer, lim)
    assert (o.mode, o.steps, o.fidelity, o.samples, aligned, fmt) == ("irn", 10, 0.5, 1, False, "json")
    o, aligned, fmt = parse_options("fidelity=0.8&steps=4&seed=7&mode=full&aligned=1&format=png", restorer, lim)
    assert (o.mode, o.steps, o.fidelity, o.seed, aligned, fmt) == ("full", 4, 0.8, 7, True, "png")


def test_cli_defaults_and_busy_port(restorer, server):
    args = build_parser().parse_args(["serve"])
    assert (args.host, args.port, args.model, args.max_upload_mb) == ("127.0.0.1", 7860, "default", 20.0)
    with pytest.raises(ClrfaceError, match="cannot listen"):
        make_server(restorer, "127.0.0.1", server.server_address[1])
