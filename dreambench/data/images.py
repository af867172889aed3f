"""Loading user images, and checking a whole folder of them before any training starts.

DreamBooth fine-tunes on 3-5 photos (§4.1 of the paper), so one silently broken photo is a fifth of the data:
a truncated JPEG that Pillow grey-fills, a PNG whose transparent pixels hide a saturated colour, a 16-bit scan
clipped to white. Here every such case either loads correctly or is refused with its reason, and
`validate_image_folder` reports all bad files of a folder at once, before any model loads.
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

log = logging.getLogger("dreambench")

# Suffixes we expect in an image folder; an unreadable file with one of these is "corrupt", anything else
# that Pillow cannot identify is "not an image" (a notes.txt, a .zip of the originals).
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".jpe", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".mpo"}
ON_BAD = ("error", "skip")
BACKGROUND = (255, 255, 255)  # transparent pixels become white, like a product photo on a white table


class BadImageError(ValueError):
    def __init__(self, problems: Iterable[tuple[Path, str]], header: str | None = None):
        self.problems: list[tuple[Path, str]] = [(Path(p), r) for p, r in problems]
        lines = [header or f"{len(self.problems)} bad image file(s):"]
        lines += [f"  {p}: {r}" for p, r in self.problems]
        super().__init__("\n".join(lines))


def _to_rgb(im: Image.Image, path: Path) -> Image.Image:
    mode = im.mode
    if mode == "RGB":
        return im
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit greyscale (scans, 16-bit PNG). Pillow's convert("L") clips at 255, which turns everything
        # above 1/257 of full scale white; scale by the type's range instead: 65535 / 255 = 257.
        a = np.asarray(im)
        if mode == "I" and (a.min() < 0 or a.max() > 65535):
            raise BadImageError([(path, f"32-bit integer image with values {a.min()}..{a.max()} outside the "
                                        "16-bit range; convert it to 8-bit RGB first")])
        a8 = np.round(a.astype(np.float64) / 257.0).astype(np.uint8)
        return Image.fromarray(a8, mode="L").convert("RGB")
    if mode == "F":
        # Float TIFFs have no agreed range (0..1? 0..255? HDR?), so guessing would be silently wrong.
        raise BadImageError([(path, "32-bit float image: no agreed value range; "
                                    "convert it to 8-bit RGB first")])
    if "A" in mode or "a" in mode or "transparency" in im.info:
        # RGBA, LA, PA, RGBa, and P/L/RGB with a tRNS transparent colour: composite on the background, since
        # convert("RGB") would expose whatever colour the transparent pixels happen to store.
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    # L, 1, P, CMYK (Pillow undoes Adobe's inverted CMYK when decoding), YCbCr.
    try:
        return im.convert("RGB")
    except ValueError as e:
        raise BadImageError([(path, f"unsupported image mode {mode!r}: {e}")]) from e


def load_image(path: str | Path) -> Image.Image:
    path = Path(path)
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        # Something in this process (another library, a notebook) switched Pillow to grey-filling truncated
        # files; refusing is better than training on grey blocks.
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True in this process, so truncated images "
                           "would load grey-filled; set it back to False")
    with warnings.catch_warnings():
        # Pillow only warns between MAX_IMAGE_PIXELS and twice that (and raises above); refuse both.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as im:
                # MPO (multi-picture camera JPEG): frame 0 is the photo, later frames are previews/depth.
                im.seek(0)
                # Decode every byte now: a truncated or corrupt file raises here, not in a dataloader worker.
                im.load()
                # Rotate by the EXIF orientation (phones store portrait shots as rotated landscape pixels).
                # Returns a plain in-memory Image (also for MPO), detached from the file.
                out = ImageOps.exif_transpose(im)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            limit = Image.MAX_IMAGE_PIXELS
            raise BadImageError([(path, f"refused as a possible decompression bomb (limit "
                                        f"PIL.Image.MAX_IMAGE_PIXELS={limit}): {e}")]) from e
        except UnidentifiedImageError as e:
            what = "corrupt or unreadable image" if path.suffix.lower() in IMAGE_SUFFIXES else "not an image"
            raise BadImageError([(path, f"{what} (Pillow cannot identify the format)")]) from e
        except (FileNotFoundError, IsADirectoryError, PermissionError):
            raise
        except (OSError, SyntaxError, ValueError, EOFError, IndexError) as e:
            # OSError: "image file is truncated", "broken data stream"; the others come from plugins
            # choking on corrupt headers.
            raise BadImageError([(path, f"truncated or corrupt image data ({type(e).__name__}: {e})")]) from e
    return _to_rgb(out, path)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _problem(path: Path, min_size: int, first_with_hash: dict[str, Path]) -> str | None:
    try:
        digest = _sha256(path)
    except OSError as e:  # no read permission, a file on a vanished mount, ...
        return f"cannot be read ({e.strerror or type(e).__name__})"
    if digest in first_with_hash:
        # Same bytes twice would silently double that photo's weight in a 3-5 image training set.
        return f"exact duplicate of {first_with_hash[digest].name}"
    first_with_hash[digest] = path
    try:
        im = load_image(path)
    except BadImageError as e:
        return e.problems[0][1]
    w, h = im.size
    if min(w, h) < min_size:
        # Upscaling to the training resolution would train on blur (and teach it as the subject's look).
        return f"too small: {w}x{h} px, short side {min(w, h)} < {min_size} px (the training resolution)"
    return None


def validate_image_folder(folder: str | Path, min_size: int, on_bad: str = "error",
                          what: str = "instance images", policy_key: str = "on_bad") -> list[Path]:
    if on_bad not in ON_BAD:
        raise ValueError(f"on_bad must be one of {', '.join(map(repr, ON_BAD))}, got {on_bad!r}")
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"{what} folder not found: {folder}")
    if not folder.is_dir():  # e.g. one photo given instead of its folder
        raise BadImageError([], header=f"{what} path is not a folder: {folder} (give the folder that holds the "
                                       f"photos)")

    good: list[Path] = []
    problems: list[tuple[Path, str]] = []
    first_with_hash: dict[str, Path] = {}
    # Read-only throughout: nothing here writes, renames or deletes a user file.
    from dreambench.data.sidecars import is_sidecar
    entries = sorted(folder.iterdir(), key=lambda p: p.name)
    names = {p.name for p in entries}
    for path in entries:
        if is_sidecar(path, names):
            # <photo>.mask.png (loss.mask) and <photo>.txt (data.captions) describe a photo; never one themselves.
            log.debug("%s: %s is a mask or caption file, not a photo", what, path)
            continue
        if path.name.startswith("."):
            # .DS_Store, macOS ._resource forks, editor swap files: never images the user meant.
            log.debug("%s: skipping hidden file %s", what, path)
            continue
        if path.is_dir():
            log.debug("%s: skipping subfolder %s (folders are not searched recursively)", what, path)
            continue
        if not path.is_file():
            problems.append((path, "not a regular file (broken symlink, socket, ...)"))
            continue
        reason = _problem(path, min_size, first_with_hash)
        if reason is None:
            good.append(path)
        else:
            problems.append((path, reason))

    if problems and on_bad == "error":
        raise BadImageError(problems, header=f"{len(problems)} bad file(s) in {what} folder {folder} "
                                             f"(fix or remove them, or set {policy_key}=skip):")
    for path, reason in problems:
        log.warning("%s: skipping %s: %s", what, path, reason)
    if not good:
        raise BadImageError(problems, header=f"no usable {what} in {folder}"
                                              + (" (all skipped):" if problems else " (folder is empty)"))
    return good
