"""Video files in and out through the ffmpeg binary that ``imageio-ffmpeg`` ships (rgb24 pipes; no system
ffmpeg): streamed frame reading, H.264 writing at the source's rate, and muxing the source's audio back in."""

from __future__ import annotations

import logging
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


#: ffmpeg colour-matrix tags -> the names of the scale filter's in/out_color_matrix options.
_SCALE_MATRIX = {"bt709": "bt709", "smpte170m": "smpte170m", "bt470bg": "bt470", "bt2020nc": "bt2020",
                 "bt2020c": "bt2020", "fcc": "fcc", "smpte240m": "smpte240m"}


@dataclass(frozen=True)
class VideoColor:
    """How a video's YUV samples map to RGB: the matrix (an ffmpeg colorspace tag), studio or full range, and the
    primaries and transfer tags to carry over (None: not tagged)."""

    matrix: str = "bt709"
    full_range: bool = False
    primaries: str | None = None
    transfer: str | None = None

    def scale_args(self, side: str) -> str:
        """The scale filter's options that read (side "in") or write (side "out") samples in this colour space.
        Accurate rounding: swscale's default darkened every decode-encode round trip by about one grey level."""
        rng = "pc" if self.full_range else "tv"
        return f"{side}_color_matrix={_SCALE_MATRIX[self.matrix]}:{side}_range={rng}:flags=accurate_rnd+full_chroma_int"

    def tags(self) -> str:
        """The setparams filter that tags the frames (and so the stream), so players decode them with this matrix
        and range and show them in the source's primaries and transfer."""
        out = f"setparams=colorspace={self.matrix}:range={'pc' if self.full_range else 'tv'}"
        out += f":color_primaries={self.primaries}" if self.primaries else ""
        return out + (f":color_trc={self.transfer}" if self.transfer else "")


def video_color(pix_fmt: str, height: int) -> VideoColor:
    """The colour space of a stream from ffmpeg's description of its pixel format, e.g. "yuv420p(tv, bt709,
    progressive)" or "yuv420p(tv, bt709/unknown/unknown)". An untagged matrix is guessed as players guess it:
    BT.709 from 720 lines up, BT.601 below."""
    inner = pix_fmt[pix_fmt.find("(") + 1:pix_fmt.rfind(")")] if "(" in pix_fmt else ""
    parts = [s.strip() for s in inner.split(",")]
    full = "pc" in parts or pix_fmt.startswith("yuvj")
    tags = next((s.split("/") for s in parts if s and s not in ("tv", "pc", "progressive")
                 and not s.startswith(("top", "bottom", "unknown"))), [])
    tags = (tags * 3)[:3] if len(tags) == 1 else tags + [""] * (3 - len(tags))
    known = [None if s in ("", "unknown", "reserved", "unspecified") else s for s in tags]
    matrix = known[0] if known[0] in _SCALE_MATRIX else ("bt709" if height >= 720 else "smpte170m")
    return VideoColor(matrix, full, known[1], known[2])


@dataclass(frozen=True)
class VideoInfo:
    """size: (W, H) of the frames read; fps as a fraction; frames: estimated from duration x fps (0: unknown);
    color: the colour space frames are decoded from, and written back in."""

    size: tuple[int, int]
    fps: Fraction
    frames: int
    duration: float
    has_audio: bool
    codec: str
    color: VideoColor = VideoColor()
    audio_codec: str = ""  # of the first audio stream, as ffmpeg names it ("aac", "pcm_s16le"); "" without audio


def _open_frames(p: Path, output_params: list[str] | None = None) -> tuple[dict, Iterator[bytes]]:
    """imageio-ffmpeg's frame generator, started: (its metadata, the generator)."""
    gen = imageio_ffmpeg.read_frames(str(p), output_params=output_params)
    log = logging.getLogger("imageio_ffmpeg")
    level = log.level
    log.setLevel(logging.ERROR)  # it warns that a rotated phone video is read at its upright size, as it should be
    try:
        return next(gen), gen
    except (OSError, RuntimeError, IndexError, AttributeError, StopIteration) as e:
        gen.close()
        text = str(e)
        if "Stream #" in text and ": Video:" not in text:
            raise ClrfaceError(f"{p}: holds no video stream (only audio or data)") from None
        reason = text.strip().splitlines()[-1] if text.strip() else type(e).__name__
        raise ClrfaceError(f"{p}: not a readable video ({reason})") from None
    finally:
        log.setLevel(level)


def read_video(path: str | os.PathLike) -> tuple[VideoInfo, Iterator[np.ndarray]]:
    """(VideoInfo, frames uint8 [H, W, 3] RGB, streamed); an unreadable file raises ClrfaceError.

    Frames come at a constant ``info.fps``: a variable-rate file (as phones record) is resampled to its average
    rate, so written back at that rate the video keeps its duration and its audio stays in sync. They are decoded
    with the stream's colour matrix and range (``info.color``; guessed as players do where untagged)."""
    p = Path(path)
    if not p.is_file():
        raise ClrfaceError(f"{p}: no such file")
    meta, gen = _open_frames(p)  # the metadata first: the decoding options below depend on it
    gen.close()
    w, h = (int(v) for v in meta["size"])
    fps = fps_fraction(float(meta.get("fps") or 0))
    color = video_color(str(meta.get("pix_fmt", "")), int(meta.get("source_size", (w, h))[1]))
    meta, gen = _open_frames(p, ["-vf", f"scale={color.scale_args('in')}", "-r", str(fps)])
    dur = float(meta.get("duration") or 0)
    info = VideoInfo((w, h), fps, int(round(dur * float(fps))), dur, "audio_codec" in meta,
                     str(meta.get("codec", "")), color, str(meta.get("audio_codec", "")).strip(" ,"))

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
    4:2:0 cannot hold, so the size is kept exactly), converted to YUV with ``color``'s matrix and range and
    tagged with them, so players show the RGB frames as given. A context manager; ``frames`` counts what was
    written."""

    def __init__(self, path: str | os.PathLike, size: tuple[int, int], fps: Fraction, *, crf: int = CRF,
                 color: VideoColor = VideoColor()):
        self.path, self.size, self.frames = Path(path), (int(size[0]), int(size[1])), 0
        pix_fmt = "yuv444p" if self.size[0] % 2 or self.size[1] % 2 else "yuv420p"
        self._gen = imageio_ffmpeg.write_frames(
            str(self.path), self.size, fps=Fraction(fps), quality=None, codec="libx264",
            pix_fmt_out=pix_fmt, macro_block_size=1, ffmpeg_log_level="error",
            output_params=["-vf", f"scale={color.scale_args('out')},format={pix_fmt},{color.tags()}",
                           "-crf", str(int(crf)), "-movflags", "+faststart"])
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


#: Audio codecs that mp4 players (browsers, phones, QuickTime) play: copied. ffmpeg also puts PCM and Vorbis in mp4,
#: which most players do not play: those are re-encoded.
MP4_AUDIO = frozenset({"aac", "mp3", "ac3", "eac3", "opus", "alac"})


def mux_audio(video: str | os.PathLike, source: str | os.PathLike, out: str | os.PathLike, audio_codec: str) -> str:
    """``out`` = the video stream of ``video`` (copied) + every audio stream of ``source``. Audio is copied
    when its codec (``audio_codec``, the first stream's) is one mp4 players play, else (or where the copy fails)
    re-encoded to AAC. Returns "copy" or "aac"."""
    exe = ffmpeg_exe()
    for codec in ("copy", "aac") if audio_codec in MP4_AUDIO else ("aac",):
        cmd = [exe, "-y", "-v", "error", "-i", str(video), "-i", str(source), "-map", "0:v:0", "-map", "1:a",
               "-c:v", "copy", "-c:a", codec, *(["-b:a", "192k"] if codec == "aac" else []),
               "-movflags", "+faststart", str(out)]
        r = subprocess.run(cmd, capture_output=True, text=True, errors="replace")
        if r.returncode == 0:
            return codec
    raise ClrfaceError(f"{source}: could not mux its audio into {out} ({r.stderr.strip().splitlines()[-1:]})")
