import json
import subprocess
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clrface.batch import restore_files
from clrface.cli import main
from clrface.demo import demo_image
from clrface.errors import ClrfaceError
from clrface.faces.align import ffhq_quad
from clrface.faces.detect import Face
from clrface.faces.paste import paste_mask
from clrface.options import RestoreOptions
from clrface.video import (
    FaceTracker,
    StabilizeConfig,
    VideoRestorer,
    box_iou,
    estimate_shift,
    match_boxes,
    smooth_quad,
    temporal_blend,
    truncated,
    warp_to_current,
)
from clrface.video_io import (
    VideoColor,
    VideoWriter,
    ffmpeg_exe,
    fps_fraction,
    list_media,
    read_video,
    video_color,
)


@pytest.fixture(scope="module")
def portrait() -> np.ndarray:
    """The astronaut at 192 x 144 (one face of ~60 px, which dlib finds after its automatic upsampling)."""
    photo = Image.fromarray(demo_image()).crop((0, 64, 512, 448))
    return np.asarray(photo.resize((192, 144), Image.Resampling.LANCZOS))


def _clip(path: Path, frames: list[np.ndarray], fps: Fraction, audio: bool) -> Path:
    h, w = frames[0].shape[:2]
    silent = path.with_name(path.stem + "_silent.mp4") if audio else path
    with VideoWriter(silent, (w, h), fps) as wr:
        for f in frames:
            wr.write(f)
    if audio:  # a 440 Hz sine as long as the clip, AAC
        subprocess.run([ffmpeg_exe(), "-y", "-v", "error", "-i", str(silent), "-f", "lavfi", "-i",
                        f"sine=frequency=440:duration={len(frames) / float(fps)}", "-c:v", "copy", "-c:a", "aac",
                        str(path)], check=True)
    return path


def _streams(path: Path) -> str:
    r = subprocess.run([ffmpeg_exe(), "-hide_banner", "-i", str(path)], capture_output=True, text=True)
    return "\n".join(line for line in r.stderr.splitlines() if "Stream #" in line)


# ------------------------------------------------------------------------------------------ tracker math


def test_box_iou_and_greedy_matching():
    a = np.array([[0, 0, 10, 10], [100, 100, 120, 120]])
    b = np.array([[5, 0, 15, 10], [0, 0, 10, 10], [300, 300, 310, 310]])
    iou = box_iou(a, b)
    np.testing.assert_allclose(iou, [[50 / 150, 1.0, 0.0], [0.0, 0.0, 0.0]])
    # box 0 takes its exact copy (IoU 1), not the half-overlapping one; nothing overlaps box 1 or b[2]
    assert match_boxes(a, b, 0.3) == [(0, 1)]
    assert match_boxes(a[:1], b[:1], 0.3) == [(0, 0)] and match_boxes(a[:1], b[:1], 0.34) == []
    assert match_boxes(np.zeros((0, 4)), b, 0.3) == [] and box_iou(np.zeros((0, 4)), b).shape == (0, 3)


def test_smooth_quad_averages_jitter_and_follows_moves():
    sq = np.array([[0.0, 0.0], [0.0, 100.0], [100.0, 100.0], [100.0, 0.0]])  # TL, BL, BR, TR, side 100
    # a 2 px move is 0.02 of the side: a = 0.3 + 0.7 * 0.02 / 0.1 = 0.44, so the quad moves 0.88 px
    np.testing.assert_allclose(smooth_quad(sq, sq + [2.0, 0.0], alpha=0.3, snap=0.1), sq + [0.88, 0.0])
    np.testing.assert_allclose(smooth_quad(sq, sq + [20.0, 0.0], alpha=0.3, snap=0.1), sq + [20.0, 0.0])  # snaps
    np.testing.assert_allclose(smooth_quad(sq, sq + [2.0, 0.0], alpha=0.3, snap=0.0), sq + [2.0, 0.0])  # off


def _face(dx: float = 0.0, dy: float = 0.0, scale: float = 1.0) -> Face:
    """A face whose eyes sit at (40, 50), (60, 50) and mouth corners at (42, 75), (58, 75), times scale, shifted."""
    lm = np.full((68, 2), 55.0)
    lm[36:42], lm[42:48], lm[48], lm[54] = (40, 50), (60, 50), (42, 75), (58, 75)
    lm = lm * scale + [dx, dy]
    box = np.array([30, 35, 70, 90]) * scale + [dx, dy, dx, dy]
    return Face(box=box.astype(np.float64), score=1.0, landmarks68=lm)


def test_tracker_keeps_ids_smooths_holds_and_drops():
    tr = FaceTracker(StabilizeConfig(alpha=0.5, snap=0.0 + 1.0, max_age=2))
    a0 = tr.update(0, [_face()])
    assert [t.id for t in a0] == [0]
    q0 = ffhq_quad(_face().landmarks68)
    np.testing.assert_allclose(a0[0].quad, q0)
    # frame 1: face 0 moved by 1 px; a second, larger face appears far away -> new id 1, listed first (largest)
    a1 = tr.update(1, [_face(200, 0, scale=2.0), _face(1.0, 0.0)])
    assert [t.id for t in a1] == [1, 0]
    side = np.linalg.norm(q0[3] - q0[0])  # move / side = 1 / side; a = 0.5 + 0.5 * (1 / side) / 1.0
    a = 0.5 + 0.5 * (1.0 / side)
    np.testing.assert_allclose(a1[1].quad, q0 + [a * 1.0, 0.0])
    # frames 2-3 without detections: both tracks are held (restored at their last place); at frame 4 dropped
    assert [t.id for t in tr.update(2, [])] == [1, 0]
    assert [t.id for t in tr.update(3, [])] == [1, 0]
    assert tr.update(4, []) == [] and tr.next_id == 2
    assert [t.id for t in tr.update(5, [_face()])] == [2]


def test_warp_to_current_is_an_exact_whole_pixel_translation():
    x = torch.arange(16.0).repeat(16, 1)[None, None]  # x[..., j] = j
    m_prev = np.array([[1.0, 0, 0], [0, 1.0, 0]])  # photo -> crop (S = 16)
    m_cur = np.array([[1.0, 0, -2.0], [0, 1.0, 0]])  # the crop moved 2 px right in the photo
    w = warp_to_current(x, [m_prev], [m_cur], 16)
    torch.testing.assert_close(w[0, 0, :, 2:12], x[0, 0, :, 4:14])  # current u sees previous u + 2
    w = warp_to_current(x, [m_prev], [m_cur], 16, shift=np.array([[1.0, 0.0]]))  # the face moved 1 px too
    torch.testing.assert_close(w[0, 0, :, 2:12], x[0, 0, :, 3:13])
    lat = torch.arange(4.0).repeat(4, 1)[None, None]  # a latent of the 16 px crop (f = 4): 4 px = 1 latent px
    w = warp_to_current(lat, [m_prev], [np.array([[1.0, 0, -4.0], [0, 1.0, 0]])], 16)
    torch.testing.assert_close(w[0, 0, :, :3], lat[0, 0, :, 1:])


def test_estimate_shift_whole_and_subpixel():
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.avg_pool2d(torch.rand(2, 3, 72, 72, generator=g), 5, 1)[..., :64, :64]  # smooth
    est = estimate_shift(x, torch.roll(x, (2, -3), (-2, -1)))  # content moved 3 px left, 2 px down
    np.testing.assert_allclose(est.numpy(), [[-3, 2], [-3, 2]], atol=0.05)
    fy = torch.fft.fftfreq(64)[:, None]
    fx = torch.fft.fftfreq(64)[None, :]
    moved = torch.fft.ifft2(torch.fft.fft2(x) * torch.exp(-2j * torch.pi * (fx * 1.5 + fy * -0.25))).real
    np.testing.assert_allclose(estimate_shift(x, moved).numpy(), [[1.5, -0.25], [1.5, -0.25]], atol=0.1)


def test_temporal_blend_numbers():
    prev, cur = torch.zeros(1, 3, 2, 2), torch.full((1, 3, 2, 2), 0.1)
    # |d| = 0.1 = tau / 4: w = 0.5 + 0.5 / 4 = 0.625
    torch.testing.assert_close(temporal_blend(prev, cur, 0.5, 0.4), torch.full_like(cur, 0.0625))
    torch.testing.assert_close(temporal_blend(prev, cur * 10, 0.5, 0.4), cur * 10)  # beyond tau: the new frame
    torch.testing.assert_close(temporal_blend(prev, cur, 0.5, 0.0), cur)


def test_fps_fraction_snaps_to_broadcast_rates():
    assert fps_fraction(25.0) == 25 and fps_fraction(12.5) == Fraction(25, 2)
    assert fps_fraction(29.97) == Fraction(30000, 1001) and fps_fraction(23.98) == Fraction(24000, 1001)
    assert fps_fraction(0) == 25


# ------------------------------------------------------------------------------------------ the pipeline hook


def test_face_ids_and_start_hook(restorer):
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    o = RestoreOptions(steps=2, guidance_scale=0.0, mode="full")
    ref = restorer.restore_faces(x, o, first_index=5)
    same = restorer.restore_faces(x, o, face_ids=[5, 6], start=lambda z: z)
    torch.testing.assert_close(same.restored, ref.restored)
    assert same.latent.shape == (2, 1, 3, 8, 8)
    swapped = restorer.restore_faces(x[[1, 0]], o, face_ids=[6, 5])  # a face keeps its noise wherever it sits
    torch.testing.assert_close(swapped.restored[[1, 0]], ref.restored)
    moved = restorer.restore_faces(x, o, first_index=5, start=lambda z: z + 1.0)
    assert (moved.restored - ref.restored).abs().mean() > 1e-3
    assert restorer.restore_faces(x, RestoreOptions(mode="irn")).latent is None


def test_both_paths_search_frames_for_faces_from_64_px(restorer, monkeypatch):
    seen = []
    monkeypatch.setattr("clrface.video.detect_faces", lambda img, **kw: seen.append(kw["min_face"]) or [])
    monkeypatch.setattr("clrface.photo.align_faces", lambda img, size, **kw: seen.append(kw["min_face"]) or [])
    frame = np.zeros((96, 96, 3), np.uint8)
    for stab in (True, False):
        for min_face, want in ((None, 64), (40, 40)):
            VideoRestorer(restorer, RestoreOptions(mode="irn", min_face=min_face), stabilize=stab)(frame)
            assert seen.pop() == want, (stab, min_face)


# ------------------------------------------------------------------------------------------ end to end


def test_stabilised_frames_flicker_less(restorer, portrait):
    """A still face under fresh per-frame noise: the stabilised output changes less from frame to frame. (The
    tiny random model turns small input changes into large output ones, so the filter's tau is widened.)"""
    rng = np.random.default_rng(0)
    clip = [np.clip(portrait + rng.normal(0, 6, portrait.shape), 0, 255).astype(np.uint8) for _ in range(5)]
    o = RestoreOptions(mode="irn")
    face = paste_mask(portrait.shape[:2], restorer.restore_image(portrait, o).faces[0].affine, affine_size=32) >= 1
    flick = {}
    for stab in (False, True):
        vr = VideoRestorer(restorer, o, stabilize=stab, config=StabilizeConfig(blend=0.4, blend_tau=2.0))
        out = [vr(f) for f in clip]
        assert all(n == out[0][1] for _, n in out) and out[0][1] >= 1
        frames = [f.astype(np.float32) for f, _ in out]
        flick[stab] = np.mean([np.abs(a - b).mean(-1)[face].mean() for a, b in zip(frames[1:], frames[:-1])])
    assert flick[True] < 0.6 * flick[False], flick


def test_video_round_trip_keeps_frames_size_fps_and_audio(tmp_path, restorer, portrait):
    frames = [np.roll(portrait, t, axis=1) for t in range(6)]
    with_audio = _clip(tmp_path / "talk.mp4", frames, Fraction(12), audio=True)
    silent = _clip(tmp_path / "mute.mov", frames, Fraction(30000, 1001), audio=False)
    assert "Audio: aac" in _streams(with_audio) and "Audio" not in _streams(silent)
    report = restore_files([with_audio, silent], tmp_path / "out", restorer, RestoreOptions(mode="irn"),
                           progress=False)
    assert report["failures"] == []
    recs = {Path(r["input"]).name: r for r in report["images"]}
    for name, fps, audio in (("talk.mp4", "12", "copy"), ("mute.mov", "30000/1001", "none")):
        rec = recs[name]
        assert rec["video"] and rec["frames"] == 6 and rec["fps"] == fps and rec["audio"] == audio
        assert rec["faces_per_frame"]["mean"] == 1 and rec["tracks"] == 1  # one face, one track throughout
        info, out = read_video(rec["final"][0])
        got = list(out)
        assert len(got) == 6 and info.size == (192, 144) and str(info.fps) == fps
        assert info.has_audio == (audio != "none")
        # outside the faces the frame is the decoded input's (up to the codec); the tiny random model paints faces
        decoded = list(read_video(rec["input"])[1])
        diff = np.abs(got[3].astype(int) - decoded[3]).mean(-1)
        assert np.median(diff) < 2 and diff.max() > 40
    assert "Audio: aac" in _streams(tmp_path / "out" / "final" / "talk.mp4")
    assert sorted(p.name for p in (tmp_path / "out" / "final").iterdir()) == ["mute.mp4", "talk.mp4"]  # no temporaries
    assert json.loads((tmp_path / "out" / "report.json").read_text())["images"][0]["frames"] == 6


def test_truncation_rule():
    assert not truncated(40, 40) and not truncated(6, 0) and not truncated(99, 100) and not truncated(39, 40)
    assert truncated(19, 40) and truncated(97, 100)


def test_a_truncated_video_is_restored_with_a_warning(tmp_path, restorer, capsys):
    rng = np.random.default_rng(0)  # noise frames: the file's bytes spread evenly over time
    src = _clip(tmp_path / "cut.mp4", [rng.integers(0, 255, (48, 64, 3), np.uint8) for _ in range(40)], Fraction(10),
                audio=False)
    src.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    rec = restore_files([src], tmp_path / "out", restorer, RestoreOptions(mode="irn"), progress=False)["images"][0]
    assert rec["frames_declared"] == 40 and 10 < rec["frames"] < 30
    assert any("truncated" in w for w in rec["warnings"]) and "truncated" in capsys.readouterr().err
    assert len(list(read_video(rec["final"][0])[1])) == rec["frames"]


def test_odd_sized_video_without_faces_is_copied(tmp_path, restorer):
    frames = [np.full((75, 97, 3), 40 * t, np.uint8) for t in range(3)]
    src = _clip(tmp_path / "flat.avi", frames, Fraction(25), audio=False)
    rec = restore_files([src], tmp_path / "out", restorer, RestoreOptions(mode="irn"), progress=False)["images"][0]
    info, out = read_video(rec["final"][0])
    got = list(out)
    assert info.size == (97, 75) and len(got) == 3 and rec["no_face"] and rec["frames_without_face"] == 3
    assert max(np.abs(g.astype(int) - f).max() for g, f in zip(got, frames)) <= 2
    assert any("odd frame size (97x75)" in w for w in rec["warnings"])


def test_audio_players_cannot_play_in_mp4_is_reencoded(tmp_path, restorer):
    frames = [np.full((48, 64, 3), 90, np.uint8)] * 5
    silent = _clip(tmp_path / "silent.mp4", frames, Fraction(10), audio=False)
    src = tmp_path / "pcm.mkv"
    subprocess.run([ffmpeg_exe(), "-y", "-v", "error", "-i", str(silent), "-f", "lavfi", "-i",
                    "sine=frequency=440:duration=0.5", "-c:v", "copy", "-c:a", "pcm_s16le", str(src)], check=True)
    assert read_video(src)[0].audio_codec == "pcm_s16le"
    rec = restore_files([src], tmp_path / "out", restorer, RestoreOptions(mode="irn"), progress=False)["images"][0]
    assert rec["audio"] == "aac" and "Audio: aac" in _streams(Path(rec["final"][0]))


def test_cli_restores_a_folder_of_photos_and_videos(tmp_path, restorer, portrait, capsys):
    src = tmp_path / "in"
    src.mkdir()
    _clip(src / "clip.mp4", [portrait] * 3, Fraction(10), audio=False)
    Image.fromarray(portrait).save(src / "still.png")
    (src / "notes.txt").write_text("not media")
    assert [p.name for p in list_media(src)] == ["clip.mp4", "still.png"]
    rc = main(["restore", str(src), "-o", str(tmp_path / "out"), "--model", restorer.source, "--mode", "irn",
               "--no-stabilize"])
    assert rc == 0
    assert (tmp_path / "out" / "final" / "clip.mp4").is_file() and (tmp_path / "out" / "final" / "still.png").is_file()
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    vid = next(r for r in report["images"] if r.get("video"))
    assert vid["stabilize"] is False and vid["frames"] == 3 and vid["tracks"] is None
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"\x00" * 100)
    assert main(["restore", str(bad), "-o", str(tmp_path / "out2"), "--model", restorer.source]) == 1
    assert "not a readable video" in capsys.readouterr().err
    with pytest.raises(ClrfaceError, match="no such file"):
        read_video(tmp_path / "missing.mp4")
    sound = tmp_path / "sound.mp4"
    subprocess.run([ffmpeg_exe(), "-y", "-v", "error", "-f", "lavfi", "-i", "sine=duration=0.3", "-c:a", "aac",
                    str(sound)], check=True)
    with pytest.raises(ClrfaceError, match=r"sound.mp4: holds no video stream \(only audio or data\)$"):
        read_video(sound)


def test_video_color_reads_ffmpegs_pixel_format_description():
    assert video_color("yuv420p(tv, bt709, progressive)", 1080) == VideoColor("bt709", False, "bt709", "bt709")
    assert video_color("yuv420p(tv, bt709/unknown/unknown)", 480) == VideoColor("bt709", False, None, None)
    assert video_color("yuv420p(progressive)", 720) == VideoColor("bt709")  # untagged HD: BT.709, as players guess
    assert video_color("yuv420p(progressive)", 576) == VideoColor("smpte170m")  # untagged SD: BT.601
    assert video_color("yuvj420p(pc, bt470bg/bt470bg/smpte170m)", 240) == \
        VideoColor("bt470bg", True, "bt470bg", "smpte170m")
    assert video_color("yuv420p10le(tv, bt2020nc/bt2020/arib-std-b67)", 2160).scale_args("in").startswith(
        "in_color_matrix=bt2020:in_range=tv")
    assert VideoColor("smpte170m", True).tags() == "setparams=colorspace=smpte170m:range=pc"


def test_hd_colours_survive_a_write_read_round_trip_and_are_tagged(tmp_path):
    """A BT.709 HD clip written and read back keeps its colours (swscale's default rounding lost about a grey level
    per round trip, and an untagged HD file is shown by players with another matrix than it was written with)."""
    frame = np.zeros((720, 1280, 3), np.uint8)
    frame[:, :640] = (38, 158, 58)
    frame[:, 640:] = (199, 39, 40)
    hd = VideoColor("bt709", False, "bt709", "bt709")
    with VideoWriter(tmp_path / "hd.mp4", (1280, 720), Fraction(10), color=hd) as wr:
        wr.write(frame)
    assert "bt709" in _streams(tmp_path / "hd.mp4")
    info, frames = read_video(tmp_path / "hd.mp4")
    got = next(frames).astype(int)
    assert info.color == hd
    assert np.abs(got[8:-8, 8:632] - frame[0, 0]).max() <= 1 and np.abs(got[8:-8, 648:-8] - frame[0, -1]).max() <= 1


def test_a_variable_rate_video_is_read_at_its_average_rate_over_its_real_length(tmp_path):
    """Ten frames at 25 fps, then ten frames 0.2 s apart (2.4 s): read at the average rate the container states
    and so written back, the frames span the same 2.4 s (read at the 25 fps base rate they spanned 5.8 s)."""
    src = tmp_path / "vfr.mp4"
    subprocess.run([ffmpeg_exe(), "-y", "-v", "error", "-f", "lavfi", "-i", "testsrc=size=64x48:rate=25",
                    "-frames:v", "20", "-vf", "setpts='if(lt(N,10),N*0.04,0.4+(N-10)*0.2)/TB'", "-fps_mode", "vfr",
                    "-c:v", "libx264", "-pix_fmt", "yuv420p", str(src)], check=True)
    info, frames = read_video(src)
    n = len(list(frames))
    assert float(info.fps) == pytest.approx(10.42, abs=0.01)
    assert n / float(info.fps) == pytest.approx(2.4, abs=1.5 / float(info.fps))
