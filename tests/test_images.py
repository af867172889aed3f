import contextlib
import io
import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from dreambench.data.images import BadImageError, load_image, validate_image_folder

DATA = Path(os.environ.get("DREAMBENCH_DATA",
                           Path(__file__).resolve().parents[2] / "shared" / "dreambench-dataset"))
MIN = 32  # stands in for the training resolution
BOMB_LIMIT = 5000  # px; every good test image is below it


def noise(w, h, seed, mode="RGB"):
    rng = np.random.default_rng(seed)
    shape = (h, w, 3) if mode == "RGB" else (h, w)
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode)


def jpeg_bytes(im, **kw):
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=95, **kw)
    return buf.getvalue()


# --- builders: one real file each -------------------------------------------------------------------------

def make_good(d):
    (d / "good.jpg").write_bytes(jpeg_bytes(noise(64, 48, 0)))


def make_truncated(d):
    data = jpeg_bytes(noise(64, 64, 1))
    (d / "truncated.jpg").write_bytes(data[: len(data) // 2])


def make_corrupt(d):
    (d / "corrupt.jpg").write_bytes(np.random.default_rng(2).integers(0, 256, 4000, dtype=np.uint8).tobytes())


def make_corrupt_body(d):
    # A valid JPEG header followed by garbage: Pillow identifies it, decoding must then fail.
    data = jpeg_bytes(noise(64, 64, 3))
    garbage = np.random.default_rng(3).integers(0, 256, len(data), dtype=np.uint8).tobytes()
    (d / "corrupt_body.jpg").write_bytes(data[:700] + garbage[700:])


def make_cmyk(d):
    Image.new("CMYK", (40, 40), (0, 255, 255, 0)).save(d / "cmyk.jpg", quality=95)  # pure red in CMYK


def make_gray(d):
    Image.new("L", (40, 40), 100).save(d / "gray.png")


def make_rgba(d):
    # Left half fully transparent but storing saturated magenta, right half opaque blue.
    a = np.zeros((40, 40, 4), np.uint8)
    a[:, :20] = (255, 0, 255, 0)
    a[:, 20:] = (0, 0, 255, 255)
    Image.fromarray(a, "RGBA").save(d / "rgba.png")


def make_palette(d):
    im = Image.new("P", (40, 40), 0)
    im.putpalette([0, 255, 0, 0, 0, 255] + [0] * 762)  # index 0 green (transparent), 1 blue
    im.paste(1, (20, 0, 40, 40))
    im.save(d / "palette.png", transparency=0)


def make_16bit(d):
    a = np.full((40, 40), 32896, np.uint16)  # 32896 / 257 = 128
    a[0, 0], a[0, 1] = 0, 65535
    Image.fromarray(a).save(d / "gray16.png")


def make_rotated(d):
    # Stored 60x40 landscape, left half red / right half blue; EXIF orientation 6 = display rotated 90° CW,
    # so the viewer sees 40x60 portrait with red on top.
    a = np.zeros((40, 60, 3), np.uint8)
    a[:, :30] = (255, 0, 0)
    a[:, 30:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    (d / "rotated.jpg").write_bytes(jpeg_bytes(Image.fromarray(a), exif=exif.tobytes()))


def make_mpo(d):
    first, second = Image.new("RGB", (48, 40), (200, 30, 30)), Image.new("RGB", (48, 40), (30, 30, 200))
    first.save(d / "camera.jpg", format="MPO", save_all=True, append_images=[second], quality=95)


def make_small(d):
    noise(MIN - 1, 60, 4).save(d / "small.png")


def make_bombs(d):
    noise(80, 80, 5).save(d / "bomb_warn.png")  # 6400 px: between the limit and twice it (Pillow only warns)
    noise(120, 120, 6).save(d / "bomb_error.png")  # 14400 px: above twice the limit (Pillow raises)


def make_duplicate(d):
    (d / "z_dup.jpg").write_bytes((d / "good.jpg").read_bytes())


def make_notes(d):
    (d / "notes.txt").write_text("shot on my phone, 2023\n")


def make_hidden(d):
    (d / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" + b"\x00" * 100)
    (d / "._good.jpg").write_bytes(b"\x00\x05\x16\x07" + b"\x00" * 60)  # macOS AppleDouble fork


GOOD = ["camera.jpg", "cmyk.jpg", "good.jpg", "gray.png", "gray16.png", "palette.png", "rgba.png",
        "rotated.jpg"]
BAD = {
    "truncated.jpg": "truncated",
    "corrupt.jpg": "corrupt",
    "corrupt_body.jpg": "corrupt",
    "notes.txt": "not an image",
    "small.png": "too small",
    "bomb_warn.png": "decompression bomb",
    "bomb_error.png": "decompression bomb",
    "z_dup.jpg": "duplicate of good.jpg",
}


@pytest.fixture
def folder(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", BOMB_LIMIT)
    d = tmp_path / "instance"
    d.mkdir()
    for make in (make_good, make_truncated, make_corrupt, make_corrupt_body, make_cmyk, make_gray, make_rgba,
                 make_palette, make_16bit, make_rotated, make_mpo, make_small, make_bombs, make_duplicate,
                 make_notes, make_hidden):
        make(d)
    (d / "sub").mkdir()  # not searched
    noise(64, 64, 7).save(d / "sub" / "inner.png")
    return d


def snapshot(d):
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in d.rglob("*") if p.is_file()}


# --- load_image ---------------------------------------------------------------------------------------------

def test_every_good_file_loads_as_8bit_rgb(folder):
    for name in GOOD:
        im = load_image(folder / name)
        assert im.mode == "RGB", name
        assert type(im) is Image.Image, name  # detached from the file (no MpoImageFile, no lazy decoding)


def test_transparent_pixels_become_background_not_hidden_colour(folder):
    im = load_image(folder / "rgba.png")
    assert im.getpixel((5, 5)) == (255, 255, 255)  # a bare convert("RGB") gives (255, 0, 255)
    assert im.getpixel((30, 5)) == (0, 0, 255)
    im = load_image(folder / "palette.png")
    assert im.getpixel((5, 5)) == (255, 255, 255)  # convert("RGB") gives the green under transparency
    assert im.getpixel((30, 5)) == (0, 0, 255)


def test_16bit_is_scaled_not_clipped(folder):
    assert Image.open(folder / "gray16.png").convert("L").getpixel((5, 5)) == 255  # what a bare convert does
    im = load_image(folder / "gray16.png")
    assert im.getpixel((5, 5)) == (128, 128, 128)
    assert im.getpixel((0, 0)) == (0, 0, 0)
    assert im.getpixel((1, 0)) == (255, 255, 255)


@pytest.mark.parametrize("mode", ["I;16B", "I"])
def test_other_16bit_modes_are_scaled(tmp_path, mode):
    a = np.full((8, 8), 32896, np.uint16)
    im = Image.frombytes("I;16B", (8, 8), a.astype(">u2").tobytes())
    if mode == "I":
        im = im.convert("I")
    assert im.mode == mode
    path = tmp_path / "x.tif"
    im.save(path)
    assert load_image(path).getpixel((3, 3)) == (128, 128, 128)


def test_grayscale_and_cmyk(folder):
    assert load_image(folder / "gray.png").getpixel((3, 3)) == (100, 100, 100)
    r, g, b = load_image(folder / "cmyk.jpg").getpixel((20, 20))
    assert r > 240 and g < 15 and b < 15  # C=0 M=Y=100% is red; an un-inverted Adobe CMYK would be cyan


def test_exif_orientation_is_applied(folder):
    assert Image.open(folder / "rotated.jpg").size == (60, 40)
    im = load_image(folder / "rotated.jpg")
    assert im.size == (40, 60)
    assert im.getpixel((20, 5))[0] > 200 and im.getpixel((20, 55))[2] > 200  # red on top, blue below


def test_mpo_gives_first_frame(folder):
    assert Image.open(folder / "camera.jpg").format == "MPO"
    im = load_image(folder / "camera.jpg")
    assert im.size == (48, 40)
    r, g, b = im.getpixel((10, 10))
    assert r > 180 and b < 60  # frame 0 (red), not frame 1 (blue)


@pytest.mark.parametrize("name", ["truncated.jpg", "corrupt.jpg", "corrupt_body.jpg", "notes.txt",
                                  "bomb_warn.png", "bomb_error.png"])
def test_bad_files_raise(folder, name):
    with pytest.raises(BadImageError) as e:
        load_image(folder / name)
    assert e.value.problems[0][0] == folder / name
    assert BAD[name] in e.value.problems[0][1]


def test_truncated_jpeg_is_not_grey_filled(folder, monkeypatch):
    # The trap this guards against: with the flag on, Pillow "loads" half a JPEG.
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    Image.open(folder / "truncated.jpg").load()
    with pytest.raises(RuntimeError, match="LOAD_TRUNCATED_IMAGES"):
        load_image(folder / "truncated.jpg")


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_image(tmp_path / "nope.jpg")


# --- validate_image_folder ----------------------------------------------------------------------------------

def test_error_reports_every_bad_file_at_once(folder):
    before = snapshot(folder)
    with pytest.raises(BadImageError) as e:
        validate_image_folder(folder, MIN)
    problems = {p.name: reason for p, reason in e.value.problems}
    assert set(problems) == set(BAD)  # hidden files and the subfolder are not problems
    for name, fragment in BAD.items():
        assert fragment in problems[name], (name, problems[name])
    lines = str(e.value).splitlines()
    assert str(folder) in lines[0]
    assert len(lines) == 1 + len(BAD)  # one line per bad file
    for name in BAD:
        assert sum(name in line for line in lines[1:]) >= 1
    assert snapshot(folder) == before  # nothing changed, renamed or deleted


def test_skip_returns_exactly_the_good_ones_sorted(folder, caplog):
    before = snapshot(folder)
    with caplog.at_level(logging.DEBUG, logger="dreambench"):
        good = validate_image_folder(folder, MIN, on_bad="skip")
    assert [p.name for p in good] == GOOD
    assert all(p.parent == folder for p in good)
    warned = [r.getMessage() for r in caplog.records
              if r.levelno == logging.WARNING and r.name == "dreambench"]
    assert len(warned) == len(BAD)
    for name in BAD:
        assert any(name in m for m in warned), name
    assert any(".DS_Store" in r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG)
    assert snapshot(folder) == before


def test_min_size_is_the_short_side(folder):
    good = validate_image_folder(folder, 40, on_bad="skip")
    # good.jpg is 64x48, rotated.jpg 40x60, camera.jpg 48x40: all pass at 40; at 41 the 40-px ones fail.
    assert "rotated.jpg" in [p.name for p in good]
    names = [p.name for p in validate_image_folder(folder, 41, on_bad="skip")]
    assert names == ["good.jpg"]


def test_bad_policy_value(folder):
    with pytest.raises(ValueError, match="'error', 'skip'"):
        validate_image_folder(folder, MIN, on_bad="ignore")


def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        validate_image_folder(tmp_path / "nope", MIN)
    assert str(tmp_path / "nope") in str(e.value) and "\n" not in str(e.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / ".DS_Store").write_bytes(b"x")
    for policy in ("error", "skip"):
        with pytest.raises(BadImageError, match="no usable") as e:
            validate_image_folder(empty, MIN, on_bad=policy, what="class images")
        assert str(empty) in str(e.value) and "class images" in str(e.value)


def test_all_bad_with_skip_still_fails(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(BadImageError, match="no usable") as e:
        validate_image_folder(tmp_path, MIN, on_bad="skip")
    assert [p.name for p, _ in e.value.problems] == ["notes.txt"]


# --- real photos ------------------------------------------------------------------------------------------

@pytest.mark.skipif(not (DATA / "dog").is_dir(), reason=f"DreamBench dataset not at {DATA}")
def test_real_dreambench_photos():
    files = sorted((DATA / "dog").glob("*.jpg"))[:3]
    assert files
    for f in files:
        with Image.open(f) as raw:
            expected = raw.size[::-1] if raw.getexif().get(0x0112) in (5, 6, 7, 8) else raw.size
        im = load_image(f)
        assert im.mode == "RGB" and im.size == expected
        assert np.asarray(im).std() > 10  # a real photo, not a grey fill
    good = validate_image_folder(DATA / "dog", 512)
    expected = sorted(p.name for p in (DATA / "dog").iterdir() if not p.name.startswith("."))
    assert [p.name for p in good] == expected


@contextlib.contextmanager
def _as_nobody():
    """Drop the effective uid to nobody (root reads any file whatever its mode); back to root afterwards."""
    if os.geteuid() != 0:
        yield
        return
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)


def test_an_unreadable_photo_is_named_and_skippable():
    # Real permission bits: a photo its owner made unreadable. Kept outside pytest's tmp root (mode 700) so that
    # the unprivileged user can reach the folder.
    folder = Path(tempfile.mkdtemp(prefix="dreambench-unreadable-"))
    try:
        folder.chmod(0o755)
        for i in range(2):
            noise(64, 48, i).save(folder / f"ok{i}.png")
            (folder / f"ok{i}.png").chmod(0o644)
        noise(64, 48, 9).save(folder / "locked.png")
        (folder / "locked.png").chmod(0o000)
        with _as_nobody():
            with pytest.raises(BadImageError) as e:
                validate_image_folder(folder, MIN)
            good = validate_image_folder(folder, MIN, on_bad="skip")
        assert e.value.problems == [(folder / "locked.png", "cannot be read (Permission denied)")]
        assert "set on_bad=skip" in str(e.value).splitlines()[0]
        assert [p.name for p in good] == ["ok0.png", "ok1.png"]
    finally:
        shutil.rmtree(folder)


def test_grid_enlarges_small_tiles_pixel_for_pixel():
    # The toy world's 32 px samples are enlarged by a whole factor (nearest), so a person sees each pixel; real
    # 512 px samples are left at their size.
    from dreambench.sampling import image_grid
    small = [noise(32, 32, seed) for seed in range(3)]
    grid = image_grid(small, cols=3, labels=["a", "b", "c"], pad=2)
    assert grid.size == (3 * (128 + 2) + 2, 128 + 2 + 12 + 2)
    tile = np.asarray(grid)[2:130, 2 + 130:2 + 130 + 128]
    assert np.array_equal(tile[::4, ::4], np.asarray(small[1]))
    assert np.array_equal(tile[3::4, 3::4], np.asarray(small[1]))
    big = image_grid([noise(200, 160, 0)], pad=0)
    assert big.size == (200, 160) and np.array_equal(np.asarray(big), np.asarray(noise(200, 160, 0)))
