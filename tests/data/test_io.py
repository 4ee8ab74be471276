"""load_image / save_image / list_images on every kind of real-world file, good and bad."""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import ExifTags, Image

from clrface.data.io import (
    ensure_not_input,
    image_batches,
    list_images,
    load_image,
    off_white,
    output_names,
    same_size_runs,
    save_image,
    transparency_and_frames,
    upright_exif,
)
from clrface.errors import ClrfaceError, ImageError


def _rgb(h: int = 32, w: int = 48) -> np.ndarray:
    y, x = np.mgrid[:h, :w]
    return np.stack([x * 5 % 256, y * 7 % 256, (x + y) * 3 % 256], -1).astype(np.uint8)


def test_rgb_png_round_trip_exact(tmp_path):
    a = _rgb()
    save_image(tmp_path / "sub" / "deeper" / "a.png", a)  # creates folders
    np.testing.assert_array_equal(load_image(tmp_path / "sub" / "deeper" / "a.png"), a)


def test_jpeg_save_is_close(tmp_path):
    a = np.full((32, 32, 3), (200, 100, 50), np.uint8)
    save_image(tmp_path / "a.JPG", a)
    b = load_image(tmp_path / "a.JPG")
    assert b.dtype == np.uint8 and b.shape == (32, 32, 3)
    assert np.abs(b.astype(int) - a).max() <= 2


def test_exif_orientation_applied(tmp_path):
    # Stored 20 high x 40 wide: left half red, right half blue. Orientation 6 means "rotate 90
    # degrees clockwise to display", so the stored left column becomes the displayed top row.
    a = np.zeros((20, 40, 3), np.uint8)
    a[:, :20] = (255, 0, 0)
    a[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(a).save(tmp_path / "r.jpg", exif=exif.tobytes(), quality=98)
    b = load_image(tmp_path / "r.jpg").astype(int)
    assert b.shape == (40, 20, 3)
    assert b[:15, :, 0].mean() > 240 and b[:15, :, 2].mean() < 15  # top is red
    assert b[25:, :, 2].mean() > 240 and b[25:, :, 0].mean() < 15  # bottom is blue


def test_upright_exif_keeps_the_tags_with_orientation_1(tmp_path):
    exif = Image.Exif()
    exif[0x0112], exif[0x010F], exif[0x0132] = 6, "TestCam", "1962:07:14 10:00:00"
    Image.fromarray(_rgb(20, 40)).save(tmp_path / "r.jpg", exif=exif.tobytes())
    kept = upright_exif(tmp_path / "r.jpg")
    save_image(tmp_path / "out.png", load_image(tmp_path / "r.jpg"), exif=kept)
    written = Image.open(tmp_path / "out.png").getexif()
    assert (written[0x0112], written[0x010F], written[0x0132]) == (1, "TestCam", "1962:07:14 10:00:00")
    assert load_image(tmp_path / "out.png").shape == (40, 20, 3)  # upright, and not turned a second time
    Image.fromarray(_rgb(20, 40)).save(tmp_path / "plain.png")
    assert upright_exif(tmp_path / "plain.png") is None
    # a TIFF's own tags (layout, 70 KB of XMP) are not the photo's description: only its camera is kept
    Image.fromarray(_rgb(20, 40)).save(tmp_path / "scan.tif", tiffinfo={700: b"<x>" + b"a" * 70_000, 271: "Scanner"})
    save_image(tmp_path / "scan.jpg", load_image(tmp_path / "scan.tif"), exif=upright_exif(tmp_path / "scan.tif"))
    assert dict(Image.open(tmp_path / "scan.jpg").getexif()) == {271: "Scanner", 274: 1}
    exif[ExifTags.IFD.Exif] = {0x9003: "1962:07:14 10:00:00", 0x927C: b"maker" * 20, 0xA002: 20}
    exif[ExifTags.IFD.GPSInfo] = {1: "N", 2: (48.0, 51.0, 30.0)}
    Image.fromarray(_rgb(20, 40)).save(tmp_path / "gps.jpg", exif=exif.tobytes())
    save_image(tmp_path / "gps.png", load_image(tmp_path / "gps.jpg"), exif=upright_exif(tmp_path / "gps.jpg"))
    kept = Image.open(tmp_path / "gps.png").getexif()
    assert kept.get_ifd(ExifTags.IFD.GPSInfo) == {1: "N", 2: (48.0, 51.0, 30.0)}
    assert kept.get_ifd(ExifTags.IFD.Exif) == {0x9003: "1962:07:14 10:00:00", 0xA001: 1}  # no maker note, sRGB
    with warnings.catch_warnings():  # a damaged block: nothing to keep, and quiet
        warnings.simplefilter("error")
        Image.fromarray(_rgb(20, 40)).save(tmp_path / "bad.jpg", exif=b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\x00\x05")
        assert upright_exif(tmp_path / "bad.jpg") is None


def test_grayscale_and_bilevel(tmp_path):
    g = (np.arange(32 * 32).reshape(32, 32) % 256).astype(np.uint8)
    Image.fromarray(g, "L").save(tmp_path / "g.png")
    b = load_image(tmp_path / "g.png")
    assert b.shape == (32, 32, 3)
    for c in range(3):
        np.testing.assert_array_equal(b[..., c], g)
    Image.fromarray(g > 127).convert("1").save(tmp_path / "bw.png")
    bw = load_image(tmp_path / "bw.png")
    np.testing.assert_array_equal(bw[..., 1], np.where(g > 127, 255, 0))


def test_rgba_and_la_composited_on_white(tmp_path):
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., 0] = 200  # red 200, hidden green/blue 0
    rgba[..., 3] = 0
    rgba[:8, :, 3] = 255
    rgba[8:12, :, 3] = 128
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    b = load_image(tmp_path / "a.png").astype(int)
    np.testing.assert_array_equal(b[0, 0], [200, 0, 0])     # opaque: own colour
    np.testing.assert_array_equal(b[15, 0], [255, 255, 255])  # transparent: white
    a = 128 / 255
    np.testing.assert_allclose(b[9, 0], np.rint([200 * a + 255 * (1 - a), 255 * (1 - a), 255 * (1 - a)]), atol=1)
    alpha = np.where(np.arange(16)[:, None] < 8, 255, 0).repeat(16, 1).astype(np.uint8)
    la = np.stack([np.full((16, 16), 40, np.uint8), alpha], -1)
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    c = load_image(tmp_path / "la.png")
    np.testing.assert_array_equal(c[0, 0], [40, 40, 40])
    np.testing.assert_array_equal(c[15, 0], [255, 255, 255])


def test_off_white_undoes_the_compositing_on_white(tmp_path):
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (32, 32, 4), dtype=np.uint8)
    rgba[0, :, 3] = 0
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    on_white = load_image(tmp_path / "a.png")
    back = off_white(on_white, rgba[..., 3]).astype(int)
    a = rgba[..., 3:].astype(float) / 255
    err = np.abs(back - rgba[..., :3])[a[..., 0] > 0]
    assert (err <= 0.5 / a[a > 0][:, None] + 0.5).all()  # the rounding of the composite, amplified by 1 / alpha
    assert (np.abs(back - rgba[..., :3])[a[..., 0] >= 0.5] <= 1).all()
    np.testing.assert_array_equal(back[0], on_white[0])  # alpha 0: the colour stays (white)
    dark = off_white(np.zeros((1, 1, 3), np.uint8), np.array([[64]], np.uint8))  # darker than alpha 0.25 allows
    np.testing.assert_array_equal(dark, [[[0, 0, 0]]])


def test_transparency_and_frames_report_what_load_image_drops(tmp_path):
    rgba = np.zeros((10, 12, 4), np.uint8)
    rgba[..., 3] = np.arange(12, dtype=np.uint8) * 20
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    alpha, frames = transparency_and_frames(tmp_path / "a.png")
    assert frames == 1 and np.array_equal(alpha, rgba[..., 3])
    rgba[..., 3] = 255  # an alpha channel without transparency
    Image.fromarray(rgba, "RGBA").save(tmp_path / "opaque.png")
    assert transparency_and_frames(tmp_path / "opaque.png") == (None, 1)
    gif = [Image.fromarray(np.full((8, 8, 3), v, np.uint8)) for v in (0, 90, 180)]
    gif[0].save(tmp_path / "anim.gif", save_all=True, append_images=gif[1:])
    assert transparency_and_frames(tmp_path / "anim.gif") == (None, 3)


def test_palette_with_and_without_transparency(tmp_path):
    p = Image.new("P", (16, 16))
    p.putpalette([10, 20, 30, 250, 0, 0] + [0] * 762)
    px = np.zeros((16, 16), np.uint8)
    px[:, 8:] = 1
    p.putdata(px.ravel().tolist())
    p.save(tmp_path / "p.png")
    b = load_image(tmp_path / "p.png")
    np.testing.assert_array_equal(b[0, 0], [10, 20, 30])
    np.testing.assert_array_equal(b[0, 15], [250, 0, 0])
    p.info["transparency"] = 0
    p.save(tmp_path / "pt.png", transparency=0)
    c = load_image(tmp_path / "pt.png")
    np.testing.assert_array_equal(c[0, 0], [255, 255, 255])  # transparent index -> white
    np.testing.assert_array_equal(c[0, 15], [250, 0, 0])
    p.save(tmp_path / "p.gif", transparency=0)
    np.testing.assert_array_equal(load_image(tmp_path / "p.gif")[0, 0], [255, 255, 255])


def test_16bit_png_scaled_not_truncated(tmp_path):
    v = np.array([0, 257, 128 * 257, 65535, 1000, 40000], np.uint16)
    a = np.tile(v, (16, 3))  # 16 x 18
    Image.fromarray(a).save(tmp_path / "d.png")
    assert Image.open(tmp_path / "d.png").mode.startswith("I")
    b = load_image(tmp_path / "d.png")
    np.testing.assert_array_equal(b[0, :6, 0], np.rint(v / 257.0).astype(np.uint8))  # 0 1 128 255 4 156
    np.testing.assert_array_equal(b[..., 0], b[..., 2])


def test_cmyk_jpeg(tmp_path):
    a = np.zeros((32, 32, 3), np.uint8)
    a[:, :16] = (255, 0, 0)
    a[:, 16:] = (30, 160, 90)
    Image.fromarray(a).convert("CMYK").save(tmp_path / "c.jpg", quality=98)
    assert Image.open(tmp_path / "c.jpg").mode == "CMYK"
    b = load_image(tmp_path / "c.jpg").astype(int)
    assert np.abs(b[8, 4] - [255, 0, 0]).max() <= 6
    assert np.abs(b[8, 28] - [30, 160, 90]).max() <= 6


def test_missing_directory_empty_and_non_image(tmp_path):
    with pytest.raises(ImageError, match="no such file"):
        load_image(tmp_path / "nope.jpg")
    with pytest.raises(ImageError, match="directory"):
        load_image(tmp_path)
    (tmp_path / "z.png").write_bytes(b"")
    with pytest.raises(ImageError, match="empty"):
        load_image(tmp_path / "z.png")
    (tmp_path / "t.jpg").write_text("this is not a picture\n")
    with pytest.raises(ImageError, match="not an image") as ei:
        load_image(tmp_path / "t.jpg")
    assert ei.value.path == tmp_path / "t.jpg"
    assert "\n" not in str(ei.value)


def test_truncated_files(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(_rgb(64, 64)).save(buf, "JPEG", quality=90)
    (tmp_path / "t.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageError, match="corrupt|truncated") as ei:
        load_image(tmp_path / "t.jpg")
    assert "\n" not in str(ei.value)
    buf = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(buf, "PNG")
    assert len(buf.getvalue()) > 10_000
    (tmp_path / "t.png").write_bytes(buf.getvalue()[:5_000])
    with pytest.raises(ImageError, match="corrupt|truncated"):
        load_image(tmp_path / "t.png")


def _png_header_only(w: int, h: int) -> bytes:
    """A PNG that claims w x h pixels but carries a single tiny IDAT: a decompression bomb's header."""
    def chunk(t: bytes, d: bytes) -> bytes:
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 10)) + chunk(b"IEND", b"")


def test_decompression_bomb_refused_before_decoding(tmp_path):
    (tmp_path / "bomb.png").write_bytes(_png_header_only(100_000, 100_000))  # 10 GP, beyond PIL's own limit
    with pytest.raises(ImageError, match=r"too large: 10000.0 MP exceeds the 120 MP cap$"):  # not PIL's wording
        load_image(tmp_path / "bomb.png")
    (tmp_path / "big.png").write_bytes(_png_header_only(11_000, 11_000))  # 121 MP: under PIL's error, over our cap
    with pytest.raises(ImageError, match=r"11000x11000 = 121.0 MP exceeds the 120 MP cap"):
        load_image(tmp_path / "big.png")
    (tmp_path / "a7r.png").write_bytes(_png_header_only(9_504, 6_336))  # a 61 MP camera frame: read, then truncated
    with pytest.raises(ImageError, match="unreadable or corrupt"):
        load_image(tmp_path / "a7r.png")
    save_image(tmp_path / "ok.png", _rgb(40, 40))
    with pytest.raises(ImageError, match="too large"):
        load_image(tmp_path / "ok.png", max_pixels=1000)


def test_tiny_image_refused(tmp_path):
    save_image(tmp_path / "tiny.png", _rgb(10, 40))
    with pytest.raises(ImageError, match="too small: 40x10"):
        load_image(tmp_path / "tiny.png")
    assert load_image(tmp_path / "tiny.png", min_side=8).shape == (10, 40, 3)


def test_save_refuses_to_overwrite_inputs(tmp_path):
    src = tmp_path / "in.png"
    save_image(src, _rgb())
    before = src.read_bytes()
    with pytest.raises(ClrfaceError, match="refusing to overwrite"):
        save_image(tmp_path / "." / "in.png", _rgb()[::-1].copy(), inputs=[src])
    link = tmp_path / "alias.png"
    link.symlink_to(src)
    with pytest.raises(ClrfaceError, match="refusing to overwrite"):
        ensure_not_input(link, [src])
    assert src.read_bytes() == before
    ensure_not_input(tmp_path / "other.png", [src])  # a different file is fine


def test_save_rejects_bad_extension_and_array(tmp_path):
    with pytest.raises(ClrfaceError, match="unsupported output extension"):
        save_image(tmp_path / "a.gif", _rgb())
    with pytest.raises(ClrfaceError, match="uint8"):
        save_image(tmp_path / "a.png", _rgb().astype(np.float32))


def test_list_images(tmp_path):
    for name in ["b.PNG", "a.jpg", "c.txt", ".hidden.png", "sub/d.jpeg"]:
        f = tmp_path / name
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(b"x")
    assert [p.name for p in list_images(tmp_path)] == ["a.jpg", "b.PNG"]
    found = [p.relative_to(tmp_path).as_posix() for p in list_images(tmp_path, recursive=True)]
    assert found == ["a.jpg", "b.PNG", "sub/d.jpeg"]
    assert list_images(tmp_path / "c.txt") == [tmp_path / "c.txt"]
    with pytest.raises(ClrfaceError, match="no such file or folder"):
        list_images(tmp_path / "missing")


@pytest.mark.parametrize("failure", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_save_image_never_leaves_a_truncated_file(tmp_path, monkeypatch, failure):
    target = tmp_path / "out.png"
    old = np.full((20, 20, 3), 7, np.uint8)
    save_image(target, old)
    good = target.read_bytes()
    real_save = Image.Image.save

    def dies_midway(self, fp, *args, **kwargs):
        real_save(self, fp, *args, **kwargs)
        Path(fp).write_bytes(Path(fp).read_bytes()[:33])  # what a kill or a full disk leaves behind
        raise failure

    monkeypatch.setattr(Image.Image, "save", dies_midway)
    with pytest.raises(ClrfaceError if isinstance(failure, OSError) else KeyboardInterrupt):
        save_image(target, np.zeros((20, 20, 3), np.uint8))
    assert target.read_bytes() == good and sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]
    monkeypatch.undo()
    new = np.full((20, 20, 3), 9, np.uint8)
    save_image(target, new)  # written through a temporary name: the pixels are those given
    assert np.array_equal(np.asarray(Image.open(target)), new)


def test_output_names_keep_todays_names_and_disambiguate_collisions():
    assert output_names([Path("in/a.png"), Path("in/b.jpg")]) == ["a", "b"]
    assert output_names([Path("in/a.png"), Path("in/a.jpg")]) == ["a_png", "a_jpg"]
    clash = [Path("in/x.jpg"), Path("in/x.png"), Path("in/x_png.jpg")]
    names = output_names(clash)
    assert len({n.casefold() for n in names}) == 3
    assert names[0] == "x_jpg" and names[1].startswith("x_png_") and names[2].startswith("x_png_")
    # a name depends on the input list only, not on the shard that restores it
    assert output_names(clash) == names and output_names(clash[::-1]) == names[::-1]
    assert len({n.casefold() for n in output_names([Path("A.png"), Path("a.jpg")])}) == 2  # case-insensitive disks
    same_file_name = output_names([Path("one/a.png"), Path("two/a.png")])
    assert len(set(same_file_name)) == 2


def test_image_batches_split_a_folder_of_mixed_sizes_in_order(tmp_path):
    arrays = [np.zeros((s, s, 3), np.uint8) for s in (8, 8, 4, 8)]
    assert same_size_runs(arrays) == [slice(0, 2), slice(2, 3), slice(3, 4)] and same_size_runs([]) == []
    files = []
    for i, s in enumerate((32, 32, 16, 32)):
        files.append(tmp_path / f"{i}.png")
        save_image(files[-1], _rgb(s, s))
    batches = image_batches(files)
    assert [tuple(b.shape) for b in batches] == [(2, 3, 32, 32), (1, 3, 16, 16), (1, 3, 32, 32)]
    assert batches[0].dtype == torch.uint8 and np.array_equal(batches[1][0].permute(1, 2, 0).numpy(), _rgb(16, 16))


def _matrix_trc_profile(description: str, primaries: tuple, gamma: float) -> bytes:
    """A minimal ICC v2 RGB display profile: PCS-adapted (D50) primaries as columns and one gamma curve."""
    def s15(v):
        return struct.pack(">i", round(v * 65536))

    def xyz(v):
        return b"XYZ " + bytes(4) + b"".join(s15(c) for c in v)

    text = description.encode() + b"\0"
    tags = [(b"desc", b"desc" + bytes(4) + struct.pack(">I", len(text)) + text + bytes(8) + bytes(3) + bytes(67)),
            (b"wtpt", xyz((0.9642, 1.0, 0.8249))), (b"rXYZ", xyz(primaries[0])), (b"gXYZ", xyz(primaries[1])),
            (b"bXYZ", xyz(primaries[2]))]
    curve = b"curv" + bytes(4) + struct.pack(">IH", 1, round(gamma * 256)) + bytes(2)
    tags += [(b"rTRC", curve), (b"gTRC", curve), (b"bTRC", curve)]
    offset, table, data = 128 + 4 + 12 * len(tags), b"", b""
    for sig, body in tags:
        body += bytes(-len(body) % 4)
        table += sig + struct.pack(">II", offset + len(data), len(body))
        data += body
    size = offset + len(data)
    header = (struct.pack(">I", size) + bytes(4) + struct.pack(">I", 0x02100000) + b"mntrRGB XYZ " + bytes(12)
              + b"acsp" + bytes(24) + bytes(4) + s15(0.9642) + s15(1.0) + s15(0.8249) + bytes(48))
    return header + struct.pack(">I", len(tags)) + table + data


def test_load_image_converts_a_wide_gamut_profile_to_srgb(tmp_path):
    # Display P3 primaries (D50-adapted): a P3-tagged muted red is a more saturated red in sRGB; grey stays grey
    p3 = _matrix_trc_profile("Display P3 (test)", ((0.5151, 0.2412, -0.0011), (0.2920, 0.6922, 0.0419),
                                                   (0.1571, 0.0666, 0.7841)), 2.2)
    px = np.zeros((16, 32, 3), np.uint8)
    px[:, :16] = (200, 90, 80)
    px[:, 16:] = (128, 128, 128)
    Image.fromarray(px).save(tmp_path / "p3.png", icc_profile=p3)
    Image.fromarray(px).save(tmp_path / "plain.png")
    got = load_image(tmp_path / "p3.png")
    red, grey = got[0, 0].astype(int), got[0, -1].astype(int)
    assert red[0] > 200 + 10 and red[1] < 90 - 5  # wider than sRGB: the same numbers mean a stronger red
    assert np.abs(grey - 128).max() <= 3 and grey.max() - grey.min() <= 1
    assert np.array_equal(load_image(tmp_path / "plain.png"), px)  # no profile: taken as sRGB
    Image.fromarray(px).save(tmp_path / "broken.png", icc_profile=b"not a profile")
    assert np.array_equal(load_image(tmp_path / "broken.png"), px)


def test_mpo_pictures_are_not_frames_and_corrupt_exif_is_quiet(tmp_path):
    face, preview = Image.fromarray(_rgb(32, 32)), Image.fromarray(_rgb(16, 16))
    face.save(tmp_path / "two.jpg", format="MPO", save_all=True, append_images=[preview])  # a phone's gain map
    assert Image.open(tmp_path / "two.jpg").n_frames == 2
    assert transparency_and_frames(tmp_path / "two.jpg") == (None, 1)
    face.save(tmp_path / "exif.jpg", exif=b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\x00\x05\x01\x12\x00\x03")  # cut short
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PIL's "Corrupt EXIF data" would fail the test
        assert load_image(tmp_path / "exif.jpg").shape == (32, 32, 3)
        assert transparency_and_frames(tmp_path / "exif.jpg") == (None, 1)


def test_an_image_above_pils_bomb_warning_but_under_our_cap_reads_quietly(tmp_path, monkeypatch):
    # PIL warns from 89 MP; our cap is 120 MP: a 100 MP photo must not print PIL's warning anywhere it is read
    save_image(tmp_path / "p.png", _rgb(32, 32))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 600)  # 1,024 px: over PIL's warning, under its error (x2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_image(tmp_path / "p.png").shape == (32, 32, 3)
        assert transparency_and_frames(tmp_path / "p.png") == (None, 1)
