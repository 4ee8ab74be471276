"""Before/after figures of the tool's features for the README: writes docs/features/*.jpg.

    python benchmarks/feature_figures.py --out docs/features [--only api bg video onnx batch webui]
        [--video-dir runs/video-flicker]

api     Restorer.restore on the demo upload (the astronaut portrait, 256 px JPEG q30): input | restored photo.
bg      --bg-upscale 2 on a real low-quality photo: input (nearest x2) | lanczos background + restored faces.
video   frames of the flicker clip from ``python benchmarks/video_flicker.py --out runs/video-flicker``, face
        region: input / irn unstabilised / irn stabilised, 4 frames each and |frame - previous frame|
        (motion undone; x16) on the right: the flicker the stabilisation removes.
onnx    the demo face through torch and through the torch-free onnxruntime path, and their difference x100.
batch   `clrface restore FOLDER` on 6 real crops: each input above its restored face.
webui   a headless-Chromium screenshot of `clrface serve` after restoring the demo upload (needs chromium,
        chromium-driver and selenium; skipped with a message otherwise).
Every panel is labelled; every figure uses the shipped default model and fixed seeds.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from clrface.bench import hstack, labelled, undo_camera_motion, vstack
from clrface.data.io import data_root, load_image, to_model_range
from clrface.demo import demo_image
from clrface.export import export_restorer
from clrface.faces.align import align_faces
from clrface.onnx_runtime import OnnxRestorer, to_uint8
from clrface.restorer import Restorer, face_noise
from clrface.serve import make_server
from clrface.video_io import read_video

DATA = data_root()
MAX_WIDTH = 1400


def demo_upload() -> np.ndarray:
    """The demo portrait as a phone would send it: 512 -> 256 px bicubic, JPEG q30."""
    buf = io.BytesIO()
    Image.fromarray(demo_image()).resize((256, 256), Image.Resampling.BICUBIC).save(buf, "JPEG", quality=30)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


def fig_api(r: Restorer) -> Image.Image:
    photo = demo_upload()
    res = r.restore(photo, seed=0)
    f = res.faces[0]
    return hstack([labelled(photo, "input (256 px, JPEG q30)"),
                   labelled(res.image, f"Restorer.restore: ID cos vs input {f.id_vs_input[0]:.3f}")])


def fig_bg(r: Restorer) -> Image.Image:
    """Around the first face (its box grown by 0.4x each side), so the figure stays small."""
    photo = load_image(DATA / "real_lq" / "whole" / "gfpgan_00.jpg")
    res = r.restore(photo, upscale=2, seed=0)
    h, w = photo.shape[:2]
    x0, y0, x1, y1 = res.faces[0].box
    m = 0.4 * max(x1 - x0, y1 - y0)
    box = [int(max(0, x0 - m)), int(max(0, y0 - m)), int(min(w, x1 + m)), int(min(h, y1 + m))]
    near = Image.fromarray(photo).crop(box).resize((2 * (box[2] - box[0]), 2 * (box[3] - box[1])),
                                                   Image.Resampling.NEAREST)
    out = Image.fromarray(res.image).crop([2 * v for v in box])
    return hstack([labelled(np.asarray(near), "input (nearest x2)"),
                   labelled(np.asarray(out), "--bg-upscale 2: lanczos background + restored face")])


def video_frames(path: Path, n: int) -> list[np.ndarray]:
    _, it = read_video(path)
    return [f for _, f in zip(range(n), it)]


def fig_video(r: Restorer, video_dir: Path) -> Image.Image:
    rows = []
    clip = video_frames(video_dir / "clip.mp4", 5)
    _, info = align_faces(clip[0], 128, max_faces=1)[0]
    x0, y0 = np.floor(info.quad.min(0)).astype(int).clip(0)
    x1, y1 = np.ceil(info.quad.max(0)).astype(int)
    for name, label in (("clip.mp4", "input"), ("irn-nostab.mp4", "irn, no stabilisation"),
                        ("irn-stab.mp4", "irn, stabilised (default)")):
        frames = undo_camera_motion(video_frames(video_dir / name, 5))
        crops = [np.clip(np.rint(f[y0:y1, x0:x1]), 0, 255).astype(np.uint8) for f in frames]
        diff = np.clip(16 * np.abs(frames[4] - frames[3])[y0:y1, x0:x1], 0, 255).astype(np.uint8)
        rows.append(hstack([labelled(c, f"{label}, t={t}" if t == 1 else f"t={t}") for t, c in enumerate(crops[1:5], 1)]
                           + [labelled(diff, "|t4 - t3| x16")]))
    return vstack(rows)


def fig_onnx(r: Restorer, work: Path) -> Image.Image:
    crop = align_faces(demo_upload(), r.resolution, max_faces=1)[0][0]
    # the ONNX path has no identity guidance: compare the full pipeline with guidance 0 (IRN -> prior -> decode),
    # from the same start noise (the ONNX runtime draws its own with numpy otherwise)
    x = to_model_range(crop[None])
    o = r.options(mode="full", guidance_scale=0.0, seed=0)
    torch_out = to_uint8(r.restore_faces(x, o).restored[0, 0].numpy())
    unet = r.prior.config.unet
    noise = face_noise((1, unet.latent_channels, unet.resolution, unet.resolution), 0, 0, 0)[:, None].numpy()
    onnx = OnnxRestorer(export_restorer(r, work / "onnx").parent)
    oo = onnx.options(mode="full", guidance_scale=0.0, seed=0, steps=o.steps, sampler=o.sampler)
    onnx_out = to_uint8(onnx.restore_faces(x.numpy(), oo, noise=noise)["restored"][0, 0])
    diff = np.abs(torch_out.astype(np.int16) - onnx_out.astype(np.int16))
    return hstack([labelled(crop, "input crop"), labelled(torch_out, "torch (full, g=0)"),
                   labelled(onnx_out, "onnxruntime, no torch"),
                   labelled(np.clip(diff * 100, 0, 255).astype(np.uint8), f"|diff| x100 (max {diff.max()})")])


def fig_batch(work: Path) -> Image.Image:
    src = sorted((DATA / "real_lq" / "cropped").glob("*"))[:6]
    inp = work / "batch_in"
    inp.mkdir(parents=True, exist_ok=True)
    for p in src:
        shutil.copy(p, inp / p.name)
    out = work / "batch_out"
    subprocess.run([sys.executable, "-m", "clrface", "restore", str(inp), "-o", str(out), "--aligned"],
                   check=True, stdout=subprocess.DEVNULL)
    cols = []
    for p in src:
        a = np.asarray(Image.open(p).convert("RGB").resize((128, 128), Image.Resampling.BICUBIC))
        b = load_image(next((out / "restored_faces").glob(p.stem + "*")))
        cols.append(vstack([labelled(a, p.stem[:18]), labelled(np.asarray(Image.fromarray(b).resize((128, 128))),
                                                                 "restored")], gap=2))
    return hstack(cols)


def fig_webui(r: Restorer, work: Path) -> Image.Image | None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    try:  # optional: the web-page figure needs selenium (pip install -e '.[browser]')
        from selenium import webdriver  # noqa: PLC0415
        from selenium.webdriver.common.by import By  # noqa: PLC0415
        from selenium.webdriver.support.ui import WebDriverWait  # noqa: PLC0415
    except ImportError:
        print("webui: selenium not installed; skipped", file=sys.stderr)
        return None
    if not (chromium and driver):
        print("webui: chromium / chromedriver not found; skipped", file=sys.stderr)
        return None
    srv = make_server(r, "127.0.0.1", 0, quiet=True)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    photo = work / "astronaut_lq.jpg"
    Image.fromarray(demo_upload()).save(photo, quality=95)
    os.environ["SE_OFFLINE"] = "true"
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1100,760"):
        opts.add_argument(arg)
    drv = webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=driver))
    try:
        drv.get(srv.url)
        wait = WebDriverWait(drv, 120)
        wait.until(lambda d: d.find_element(By.ID, "mode").get_attribute("value"))  # /api/info arrived
        drv.find_element(By.ID, "file").send_keys(str(photo))
        drv.find_element(By.ID, "restore").click()
        wait.until(lambda d: d.execute_script(
            "const i = document.getElementById('after'); return i.complete && i.naturalWidth > 0"))
        png = drv.get_screenshot_as_png()
    finally:
        drv.quit()
        srv.shutdown()
        srv.server_close()
    return Image.open(io.BytesIO(png)).convert("RGB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="docs/features")
    ap.add_argument("--only", nargs="*", default=["api", "bg", "video", "onnx", "batch", "webui"])
    ap.add_argument("--video-dir", default="runs/video-flicker")
    args = ap.parse_args()
    torch.set_num_threads(2)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    r = Restorer.from_pretrained()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        makers = {"api": lambda: fig_api(r), "bg": lambda: fig_bg(r),
                  "video": lambda: fig_video(r, Path(args.video_dir)), "onnx": lambda: fig_onnx(r, work),
                  "batch": lambda: fig_batch(work), "webui": lambda: fig_webui(r, work)}
        for name in args.only:
            fig = makers[name]()
            if fig is not None:
                if fig.width > MAX_WIDTH:  # keep the repository light
                    fig = fig.resize((MAX_WIDTH, round(fig.height * MAX_WIDTH / fig.width)), Image.Resampling.LANCZOS)
                fig.save(out / f"{name}.jpg", quality=88)
                print(f"{out / name}.jpg {fig.width}x{fig.height}")


if __name__ == "__main__":
    main()
