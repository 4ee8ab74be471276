"""Video: restore every face of every frame of a clip, keep its audio, keep the faces steady.

Frames stream through the ffmpeg binary that ``imageio-ffmpeg`` ships (rgb24 pipes; no system ffmpeg)::

    clip -> read_video -> frame t -> faces.detect_faces -> FaceTracker (IoU match, EMA of each track's FFHQ quad)
         -> align_affine(smoothed quad) -> warp_face -> Restorer.restore_faces(face_ids = track ids)
         -> temporal_blend with the track's previous output (motion-compensated into this frame's crop)
         -> paste_face -> VideoWriter (libx264, the input's fps)
         -> mux_audio (the source's audio streams, copied if mp4 takes them, else AAC) -> OUT/final/<name>.mp4

A face restored frame by frame as independent photos flickers for four reasons, each with its remedy here:

1. dlib's landmarks jitter by a pixel or two, so the crop moves and the nets (not shift-equivariant) answer
   differently: each track's quad is an exponential moving average (``smooth_quad``) that follows large moves
   at once. Crop and paste use the same smoothed affine, so the face is still pasted where it was cropped.
2. The order of faces by size, hence their noise index, can swap between frames: the start noise is drawn per
   track id (``Restorer.restore_faces(face_ids=...)``), so a face keeps its noise for the whole clip.
3. The diffusion sampler maps slightly different inputs to different details, and the input itself changes
   (sensor and codec noise): a motion-compensated, motion-adaptive recursive filter on the restored crop
   (``temporal_blend``) averages them. The previous output is warped into the current crop by the crops'
   affines plus the face's own shift, measured on the input crops by phase correlation (``estimate_shift``);
   where the new crop then agrees with it within ``blend_tau`` the two are averaged, where it differs more
   (expression, occlusion) the new crop wins.
4. Optionally (``latent_blend``, off by default) modes full/prior start the sampler from the start latent
   blended with the track's previous sampled latent, warped the same way.

``stabilize=False`` restores each frame as an independent photo (``Restorer.restore_image``), for comparison.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from clrface.data.io import ensure_not_input, to_model_range, to_uint8
from clrface.errors import ClrfaceError
from clrface.faces.align import align_affine, ffhq_quad, homogeneous, warp_face
from clrface.faces.detect import Face, detect_faces
from clrface.options import DIFFUSION_MODES, RestoreOptions
from clrface.photo import paste_back
from clrface.video_io import VideoWriter, mux_audio, read_video

if TYPE_CHECKING:  # the restorer is passed in; importing its module here would only serve the annotations
    from clrface.restorer import Restorer

#: Smallest face box (px) searched for in video frames: a quarter of the still-photo search's work per frame
#: (every frame is searched), and faces below it carry too little for a steady track.
VIDEO_MIN_FACE = 64

# ---------------------------------------------------------------------------------------------- tracking


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU [N, M] of boxes a [N, 4] and b [M, 4] (x0, y0, x1, y1, edge coordinates)."""
    a = np.asarray(a, np.float64).reshape(-1, 4)
    b = np.asarray(b, np.float64).reshape(-1, 4)
    iw = (np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0])).clip(0)
    ih = (np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1])).clip(0)
    inter = iw * ih
    area = lambda x: (x[:, 2] - x[:, 0]).clip(0) * (x[:, 3] - x[:, 1]).clip(0)  # noqa: E731
    union = area(a)[:, None] + area(b)[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def match_boxes(prev: np.ndarray, cur: np.ndarray, min_iou: float) -> list[tuple[int, int]]:
    """Greedy one-to-one matching, highest IoU first: pairs (i in prev, j in cur) with IoU >= min_iou."""
    iou = box_iou(prev, cur)
    pairs = []
    if iou.size:
        used_i, used_j = set(), set()
        for flat in np.argsort(-iou, axis=None, kind="stable"):
            i, j = divmod(int(flat), iou.shape[1])
            if iou[i, j] < min_iou:
                break
            if i not in used_i and j not in used_j:
                pairs.append((i, j))
                used_i.add(i)
                used_j.add(j)
    return sorted(pairs)


def quad_side(quad: np.ndarray) -> float:
    """Mean edge length of a [4, 2] quad (TL, BL, BR, TR), in pixels."""
    q = np.asarray(quad, np.float64)
    return float(np.linalg.norm(q - np.roll(q, 1, axis=0), axis=1).mean())


def smooth_quad(prev: np.ndarray, new: np.ndarray, alpha: float, snap: float) -> np.ndarray:
    """One step of the track's moving average: prev + a (new - prev), [4, 2].

    a = alpha for a still face and rises linearly to 1 as the mean corner move reaches ``snap`` x the quad's
    side, so jitter (a pixel on a 100+ px quad) is averaged while a real move is followed with little lag.
    """
    prev = np.asarray(prev, np.float64)
    new = np.asarray(new, np.float64)
    move = float(np.linalg.norm(new - prev, axis=1).mean()) / max(quad_side(prev), 1e-6)
    a = 1.0 if snap <= 0 else alpha + (1.0 - alpha) * min(move / snap, 1.0)
    return prev + a * (new - prev)


@dataclass
class Track:
    """One face followed through the clip. quad: [4, 2] smoothed FFHQ quad; box: [4] last detected box;
    crop / x_d / latent / affine: the previous frame's restored and input crops [3,S,S] in [-1, 1], sampled
    latent [d,h,w] (modes full/prior) and photo -> crop affine [2, 3] (None before the first restore)."""

    id: int
    quad: np.ndarray
    box: np.ndarray
    last_seen: int
    crop: Tensor | None = None
    x_d: Tensor | None = None
    latent: Tensor | None = None
    affine: np.ndarray | None = None

    @property
    def size(self) -> float:
        return quad_side(self.quad)


@dataclass(frozen=True)
class StabilizeConfig:
    """min_iou: box overlap that continues a track; max_age: frames a track survives without a detection (its
    face is still restored at the last place, so one missed detection does not make the face pop); alpha,
    snap: the quad average (``smooth_quad``); blend, blend_tau: the output filter (``temporal_blend``; blend
    = weight of the new frame, 1 = off); latent_blend: weight of the previous sampled latent in the start
    latent of modes full/prior (default off: re-applying the prior to its own output frame after frame drifts
    away from the input, which measured more flicker and a lower IDS, see README "Video"); max_shift: a face
    that moved more than this x S between frames (a cut, a jump) starts afresh. Defaults: blend 0.3 measured
    on 12 frames of benchmarks/video_flicker.py's clip (0.4 left the step-1106 prior at 0.54 of its flicker)."""

    min_iou: float = 0.3
    max_age: int = 2
    alpha: float = 0.3
    snap: float = 0.1
    blend: float = 0.3
    blend_tau: float = 0.25
    latent_blend: float = 0.0
    max_shift: float = 0.125

    def __post_init__(self) -> None:
        for name in ("min_iou", "alpha", "blend", "latent_blend"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {v}")
        if self.alpha == 0 or self.blend == 0:
            raise ValueError("alpha and blend must be > 0 (0 would freeze the face)")
        if self.max_age < 0 or self.snap < 0 or self.blend_tau < 0:
            raise ValueError(f"max_age, snap and blend_tau must be >= 0: {self}")


class FaceTracker:
    """IoU tracker over detected faces: a detection continues the track whose last box overlaps it most
    (>= min_iou, one to one), else starts a new track; each track's quad is smoothed with ``smooth_quad``."""

    def __init__(self, config: StabilizeConfig = StabilizeConfig()):
        self.config = config
        self.tracks: list[Track] = []
        self.next_id = 0

    def update(self, frame: int, faces: Sequence[Face]) -> list[Track]:
        """The tracks to restore in ``frame``: matched or new ones and those unseen for <= max_age frames,
        largest first."""
        c = self.config
        boxes = np.array([f.box for f in faces], np.float64).reshape(-1, 4)
        prev = np.array([t.box for t in self.tracks], np.float64).reshape(-1, 4)
        pairs = match_boxes(prev, boxes, c.min_iou)
        matched = {j for _, j in pairs}
        for i, j in pairs:
            t = self.tracks[i]
            t.quad = smooth_quad(t.quad, ffhq_quad(faces[j].landmarks68), c.alpha, c.snap)
            t.box, t.last_seen = boxes[j], frame
        for j, f in enumerate(faces):
            if j not in matched:
                self.tracks.append(Track(self.next_id, ffhq_quad(f.landmarks68), boxes[j], frame))
                self.next_id += 1
        self.tracks = [t for t in self.tracks if frame - t.last_seen <= c.max_age]
        return sorted(self.tracks, key=lambda t: -t.size)


# --------------------------------------------------------------------------------------- temporal filter


def _norm(size: int) -> np.ndarray:
    """Crop pixel centres of an S px crop -> grid_sample's [-1, 1] coordinates (align_corners=False)."""
    return np.array([[2.0 / size, 0.0, 1.0 / size - 1.0], [0.0, 2.0 / size, 1.0 / size - 1.0], [0.0, 0.0, 1.0]])


def warp_to_current(x: Tensor, affine_prev: Sequence[np.ndarray], affine_cur: Sequence[np.ndarray], size: int,
                    shift: np.ndarray | None = None) -> Tensor:
    """Resamples x [B,C,h,w], laid out in the previous frames' crops (photo -> crop affines [2, 3] at ``size``
    px), into the current crops: crop pixel u samples the previous crop at M_prev M_cur^-1 (u - shift), with
    shift [B, 2] (dx, dy) the face's own motion in current-crop pixels (``estimate_shift``; None: a still
    face). Bicubic, edges repeated. h may be size / f (a latent): its [-1, 1] coordinates are the image's."""
    n = _norm(size)
    sh = np.zeros((len(affine_prev), 2)) if shift is None else np.asarray(shift, np.float64).reshape(-1, 2)
    back = [np.array([[1.0, 0.0, -dx], [0.0, 1.0, -dy], [0.0, 0.0, 1.0]]) for dx, dy in sh]
    theta = [n @ homogeneous(mp) @ np.linalg.inv(homogeneous(mc)) @ tb @ np.linalg.inv(n)
             for mp, mc, tb in zip(affine_prev, affine_cur, back)]
    th = torch.tensor(np.stack(theta)[:, :2], dtype=torch.float32, device=x.device)
    grid = F.affine_grid(th, list(x.shape), align_corners=False)
    return F.grid_sample(x.float(), grid, mode="bicubic", padding_mode="border", align_corners=False)


def estimate_shift(ref: Tensor, cur: Tensor, *, lowpass: float = 0.25) -> Tensor:
    """Translation [B, 2] (dx, dy) in pixels with cur(u) ~ ref(u - shift), of images [B,C,S,S]: phase correlation
    of the channel means under a Hann window, frequencies weighted by a Gaussian of std ``lowpass`` x Nyquist
    (whitening would let the noise of degraded frames drown the peak), peak refined by a parabola per axis.
    Exact for circular integer shifts; |shift| < S/2."""
    a, b = ref.float().mean(1), cur.float().mean(1)
    s = a.shape[-1]
    win = torch.hann_window(s, periodic=False, dtype=a.dtype, device=a.device)
    win = win[:, None] * win[None, :]
    fa = torch.fft.rfft2((a - a.mean((-2, -1), keepdim=True)) * win)
    fb = torch.fft.rfft2((b - b.mean((-2, -1), keepdim=True)) * win)
    cross = fb * fa.conj()
    fy = torch.fft.fftfreq(s, device=a.device)[:, None]
    fx = torch.fft.rfftfreq(s, device=a.device)[None, :]
    weight = torch.exp(-(fx**2 + fy**2) / (2 * (0.5 * lowpass) ** 2))
    corr = torch.fft.irfft2(cross / (cross.abs() + 1e-12) * weight, s=(s, s))  # [B, S, S], peak at the shift
    flat = corr.flatten(1).argmax(1)
    out = []
    for k, i in enumerate(flat.tolist()):
        py, px = divmod(i, s)
        c = corr[k]

        def vertex(m1: float, c0: float, p1: float) -> float:
            den = m1 - 2 * c0 + p1
            return 0.0 if den >= 0 else float(0.5 * (m1 - p1) / den)

        dx = px + vertex(float(c[py, (px - 1) % s]), float(c[py, px]), float(c[py, (px + 1) % s]))
        dy = py + vertex(float(c[(py - 1) % s, px]), float(c[py, px]), float(c[(py + 1) % s, px]))
        out.append([(dx + s / 2) % s - s / 2, (dy + s / 2) % s - s / 2])
    return torch.tensor(out, dtype=torch.float64)


def temporal_blend(prev: Tensor, cur: Tensor, weight: float, tau: float) -> Tensor:
    """Motion-adaptive recursive filter: prev + w (cur - prev), w = weight where |cur - prev| (mean over the
    channel dim -3) is 0, rising linearly to 1 where it reaches tau (units of the images, e.g. [-1, 1])."""
    d = (cur - prev).abs().mean(dim=-3, keepdim=True)
    w = torch.ones_like(d) if tau <= 0 else weight + (1.0 - weight) * (d / tau).clamp(0, 1)
    return prev + w * (cur - prev)


# ------------------------------------------------------------------------------------------ restoring


class VideoRestorer:
    """Restores a clip frame by frame (``__call__``), holding the tracker and each track's previous output.

    stabilize=False: every frame is an independent photo (``Restorer.restore_image``). Only sample 0 is used.
    """

    def __init__(self, restorer: Restorer, options: RestoreOptions, *, stabilize: bool = True,
                 config: StabilizeConfig = StabilizeConfig()):
        self.restorer, self.stabilize, self.config = restorer, stabilize, config
        # faces from 64 px in frames, in both paths (the unstabilised one restores frames as photos, whose
        # search starts at 32 px)
        self.options = dataclasses.replace(options, samples=1, min_face=options.min_face or VIDEO_MIN_FACE)
        self.tracker = FaceTracker(config)
        self.frame = 0
        self.sampling: dict[str, float] = {}

    @property
    def diffusion(self) -> bool:
        return self.options.mode in DIFFUSION_MODES

    def __call__(self, frame: np.ndarray) -> tuple[np.ndarray, int]:
        """uint8 [H, W, 3] -> (restored frame uint8 [H*u, W*u, 3], faces restored in it)."""
        t, self.frame = self.frame, self.frame + 1
        if not self.stabilize:
            res = self.restorer.restore_image(frame, self.options)
            self.sampling = res.sampling or self.sampling
            return res.image, len(res.faces)
        r, o, c = self.restorer, self.options, self.config
        s, u = r.resolution, o.upscale
        tracks = self.tracker.update(t, detect_faces(frame, max_faces=o.max_faces, min_face=o.min_face))
        base = r.background(frame, u)
        if not tracks:
            return base, 0
        affines = [align_affine(tr.quad, s) for tr in tracks]
        # bicubic warp + bicubic paste, as Restorer.restore_image
        x_d = to_model_range(np.stack([warp_face(frame, m, s, resample="bicubic") for m in affines]))
        motion = self._motion(tracks, affines, x_d, s)  # track index -> its face's shift since the last frame
        restored, latents = [], []
        for lo in range(0, len(tracks), o.batch_size):
            chunk = list(range(lo, min(lo + o.batch_size, len(tracks))))
            out = r.restore_faces(x_d[chunk], o, face_ids=[tracks[i].id for i in chunk],
                                  start=self._start_hook(tracks, affines, motion, chunk, s))
            restored.append(out.restored[:, 0].float().cpu())
            latents += [None] * len(chunk) if out.latent is None else list(out.latent[:, 0].float().cpu())
            self.sampling = out.sampling.as_dict()
        x = torch.cat(restored)
        have = sorted(motion)
        if have and c.blend < 1:
            prev = warp_to_current(torch.stack([tracks[i].crop for i in have]), [tracks[i].affine for i in have],
                                   [affines[i] for i in have], s, np.stack([motion[i] for i in have]))
            x[have] = temporal_blend(prev, x[have], c.blend, c.blend_tau)
        for i, tr in enumerate(tracks):
            tr.crop, tr.x_d, tr.affine, tr.latent = x[i], x_d[i], affines[i], latents[i]
        return paste_back(base, list(to_uint8(x).numpy()), affines, s, u), len(tracks)

    def _motion(self, tracks: list[Track], affines: list[np.ndarray], x_d: Tensor, s: int) -> dict[int, np.ndarray]:
        """Per track with a previous frame: the face's own shift (dx, dy) in current-crop pixels, measured on the
        input crops (previous one warped by the crops' affines, then phase correlation); tracks that moved more
        than ``max_shift`` x S are left out (their history is not blended in)."""
        have = [i for i, tr in enumerate(tracks) if tr.crop is not None]
        if not have:
            return {}
        prev = warp_to_current(torch.stack([tracks[i].x_d for i in have]), [tracks[i].affine for i in have],
                               [affines[i] for i in have], s)
        shifts = estimate_shift(prev, x_d[have]).numpy()
        return {i: sh for i, sh in zip(have, shifts) if np.hypot(*sh) <= self.config.max_shift * s}

    def _start_hook(self, tracks: list[Track], affines: list[np.ndarray], motion: dict[int, np.ndarray],
                    chunk: list[int], s: int) -> Callable[[Tensor], Tensor] | None:
        """z_init -> z_init + latent_blend (previous latent, motion-compensated into this crop - z_init), per
        track that has one."""
        beta = self.config.latent_blend
        have = [k for k, i in enumerate(chunk) if i in motion and tracks[i].latent is not None]
        if not (self.diffusion and beta > 0 and have):
            return None

        def start(z: Tensor) -> Tensor:
            idx = [chunk[k] for k in have]
            zp = warp_to_current(torch.stack([tracks[i].latent for i in idx]), [tracks[i].affine for i in idx],
                                 [affines[i] for i in idx], s, np.stack([motion[i] for i in idx])).to(z.device)
            z = z.clone()
            z[have] = z[have] + beta * (zp - z[have])
            return z

        return start


def truncated(decoded: int, declared: int) -> bool:
    """Fewer frames decoded than the container declares (duration x fps, so allow a frame of rounding per 50)."""
    return declared > 0 and decoded < declared - max(1, declared // 50)


def restore_video(path: str | os.PathLike, out_path: str | os.PathLike, restorer: Restorer, options: RestoreOptions, *,
                  stabilize: bool = True, config: StabilizeConfig = StabilizeConfig(),
                  inputs: Iterable[str | os.PathLike] = (), progress: bool = True) -> dict[str, Any]:
    """Restores every face of every frame of ``path`` into ``out_path`` (.mp4, H.264, same fps and frame count,
    size x options.upscale), with the source's audio; returns the report entry. Never writes over an input."""
    t0 = time.perf_counter()
    src, out = Path(path), Path(out_path)
    inputs = list(inputs) or [src]
    ensure_not_input(out, inputs)
    info, frames = read_video(src)
    u = options.upscale
    out.parent.mkdir(parents=True, exist_ok=True)
    # per process: a second run into the same folder must not write into this run's files (the last rename wins)
    tmp = out.with_name(f".{out.stem}.video{os.getpid()}{out.suffix}")
    muxed = out.with_name(f".{out.stem}.muxed{os.getpid()}{out.suffix}")
    vr = VideoRestorer(restorer, options, stabilize=stabilize, config=config)
    counts: list[int] = []
    warnings = []
    if options.samples > 1:
        warnings.append("videos get one sample per face; --samples ignored")
    try:
        with VideoWriter(tmp, (info.size[0] * u, info.size[1] * u), info.fps, color=info.color) as writer:
            for frame in tqdm(frames, total=info.frames or None, desc=src.name, unit="frame",
                              disable=not progress, file=sys.stderr):
                img, n = vr(frame)
                writer.write(img)
                counts.append(n)
        if not counts:
            raise ClrfaceError(f"{src}: no frames could be read")
        audio = None
        if info.has_audio:  # muxed under a temporary name too: `out` only ever appears whole
            audio = mux_audio(tmp, src, muxed, info.audio_codec)
            os.replace(muxed, out)
        else:
            os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
        muxed.unlink(missing_ok=True)
    if truncated(len(counts), info.frames):
        warnings.append(f"only {len(counts)} of the {info.frames} frames the file declares could be decoded "
                        "(truncated or damaged file); the output holds those")
    if not any(counts):
        warnings.append("no face found in any frame; frames re-encoded without a change")
    if (info.size[0] * u) % 2 or (info.size[1] * u) % 2:
        warnings.append(f"an odd frame size ({info.size[0] * u}x{info.size[1] * u}) is kept by writing H.264 4:4:4, "
                        "which browsers and some players do not play; crop it to even sides for those")
    return {
        "input": str(src), "final": [str(out)], "size": list(info.size), "fps": str(info.fps),
        "frames": len(counts), "frames_declared": info.frames, "audio": audio or "none", "stabilize": stabilize,
        **({"stabilize_config": dataclasses.asdict(config)} if stabilize else {}),
        "face_frames": int(sum(counts)),
        "faces_per_frame": {"mean": round(float(np.mean(counts)), 3), "max": int(max(counts))},
        "frames_without_face": int(sum(n == 0 for n in counts)),
        "tracks": vr.tracker.next_id if stabilize else None,
        "sampling": vr.sampling, "warnings": warnings,
        "seconds": round(time.perf_counter() - t0, 3),
    }
