"""Video files in and out through the ffmpeg binary that ``imageio-ffmpeg`` ships (rgb24 pipes; no system
ffmpeg): streamed frame reading, H.264 writing at the source's rate, and muxing the source's audio back in."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import imageio_ffmpeg
import numpy as np

from clrface.data.io import list_images
from clrface.errors import ClrfaceError

VIDEO_EXTENSIONS = frozenset({".mp4", ".mov", ".mkv", ".avi", ".webm"})
#: libx264 constant quality of the output: visually lossless, so the codec adds little flicker of its own.
CRF = 17
DEFAULT_FPS = Fraction(25)


def is_video(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in VIDEO_EXTENSIONS


def list_media(path: str | os.PathLike, *, recursive: bool = False) -> list[Path]:
    """``list_images`` plus the videos (``VIDEO_EXTENSIONS``) of a folder, sorted; a file is returned as is."""
    p = Path(path)
    if p.is_file():
        return [p]
    images = list_images(p, recursive=recursive)  # raises for a missing path
    it = p.rglob("*") if recursive else p.iterdir()
    videos = [f for f in it if f.is_file() and is_video(f)
              and not any(part.startswith(".") for part in f.relative_to(p).parts)]
    return sorted(images + videos)


# ----------------------------------------------------------------------------------------------- ffmpeg


def ffmpeg_exe() -> str:
    """The ffmpeg binary of imageio-ffmpeg (or $IMAGEIO_FFMPEG_EXE)."""
    return imageio_ffmpeg.get_ffmpeg_exe()


def fps_fraction(fps: float) -> Fraction:
    """ffmpeg prints rates rounded (29.97): snap to an integer or an NTSC N*1000/1001 rate when within 0.006."""
    if fps <= 0:
        return DEFAULT_FPS
    if abs(fps - round(fps)) < 0.006:
        return Fraction(round(fps))
    ntsc = Fraction(round(fps * 1.001) * 1000, 1001)
    if abs(float(ntsc) - fps) < 0.006:
        return ntsc
    return Fraction(fps).limit_denominator(1000)


@dataclass(frozen=True)
class VideoInfo:
    """size: (W, H) of the frames read; fps as a fraction; frames: estimated from duration x fps (0: unknown)."""

    size: tuple[int, int]
    fps: Fraction
    frames: int
    duration: float
    has_audio: bool
    codec: str


def read_video(path: str | os.PathLike) -> tuple[VideoInfo, Iterator[np.ndarray]]:
    """(VideoInfo, frames uint8 [H, W, 3] RGB, streamed); an unreadable file raises ClrfaceError."""
    p = Path(path)
    if not p.is_file():
        raise ClrfaceError(f"{p}: no such file")
    gen = imageio_ffmpeg.read_frames(str(p))
    try:
        meta = next(gen)
    except (OSError, RuntimeError, IndexError, AttributeError, StopIteration) as e:
        gen.close()
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise ClrfaceError(f"{p}: not a readable video ({reason})") from None
    w, h = (int(v) for v in meta["size"])
    fps = fps_fraction(float(meta.get("fps") or 0))
    dur = float(meta.get("duration") or 0)
    info = VideoInfo((w, h), fps, int(round(dur * float(fps))), dur, "audio_codec" in meta, str(meta.get("codec", "")))

    def frames() -> Iterator[np.ndarray]:
        try:
            for buf in gen:
                yield np.frombuffer(buf, np.uint8).reshape(h, w, 3)
        except RuntimeError as e:
            raise ClrfaceError(f"{p}: cannot decode ({str(e).strip().splitlines()[0]})") from None
        finally:
            gen.close()

    return info, frames()


def probe_video(path: str | os.PathLike) -> VideoInfo:
    """VideoInfo of ``path``, after decoding its first frame (so a broken file fails here, before any work)."""
    info, frames = read_video(path)
    try:
        next(frames, None)
    finally:
        frames.close()
    return info


class VideoWriter:
    """Writes uint8 [H, W, 3] frames to an H.264 mp4 at ``fps`` (yuv420p; yuv444p when W or H is odd, which
    4:2:0 cannot hold, so the size is kept exactly). A context manager; ``frames`` counts what was written."""

    def __init__(self, path: str | os.PathLike, size: tuple[int, int], fps: Fraction, *, crf: int = CRF):
        self.path, self.size, self.frames = Path(path), (int(size[0]), int(size[1])), 0
        odd = self.size[0] % 2 or self.size[1] % 2
        self._gen = imageio_ffmpeg.write_frames(
            str(self.path), self.size, fps=Fraction(fps), quality=None, codec="libx264",
            pix_fmt_out="yuv444p" if odd else "yuv420p", macro_block_size=1, ffmpeg_log_level="error",
            output_params=["-crf", str(int(crf)), "-movflags", "+faststart"])
        self._gen.send(None)

    def write(self, frame: np.ndarray) -> None:
        a = np.ascontiguousarray(frame, np.uint8)
        if a.shape != (self.size[1], self.size[0], 3):
            raise ValueError(f"frame {a.shape} does not match the video size {self.size}")
        self._gen.send(a.tobytes())
        self.frames += 1

    def close(self) -> None:
        try:
            self._gen.close()
        except (OSError, RuntimeError) as e:
            raise ClrfaceError(f"{self.path}: ffmpeg failed to write ({e})") from None

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def mux_audio(video: str | os.PathLike, source: str | os.PathLike, out: str | os.PathLike) -> str:
    """``out`` = the video stream of ``video`` (copied) + every audio stream of ``source``. Audio is copied
    when mp4 can hold its codec, else re-encoded to AAC. Returns "copy" or "aac"."""
    exe = ffmpeg_exe()
    for codec in ("copy", "aac"):
        cmd = [exe, "-y", "-v", "error", "-i", str(video), "-i", str(source), "-map", "0:v:0", "-map", "1:a",
               "-c:v", "copy", "-c:a", codec, *(["-b:a", "192k"] if codec == "aac" else []),
               "-movflags", "+faststart", str(out)]
        r = subprocess.run(cmd, capture_output=True, text=True, errors="replace")
        if r.returncode == 0:
            return codec
    raise ClrfaceError(f"{source}: could not mux its audio into {out} ({r.stderr.strip().splitlines()[-1:]})")
