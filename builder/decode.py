"""One real image file -> 8-bit RGB, bounded and mode-aware: how every ImageFolder image is read.

- **Bounded.** A JPEG is decoded at the smallest DCT scale (1/2, 1/4 or 1/8,
  ``Image.draft``) that still covers the side the build needs, so a 12,000 px
  photo costs what a 1,500 px one does. Any image whose (drafted) size is over
  :data:`MAX_DECODE_PIXELS` is refused, naming the file, before its pixels are
  decoded.
- **Modes.** 8-bit modes go through Pillow's own conversion. 16-bit integer
  images (``I;16*``, ``I``) are scaled by 255/65535 (Pillow would clip them at
  255); float images (``F``) must hold values in [0, 1] and are scaled by 255
  (Pillow would turn them black), others are refused. An image with
  transparency is composited over white; one whose content is only in its
  alpha channel (a flat colour once composited, while its alpha varies) is
  refused, since any background would be a guess.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from d3mfmt import D3MError

MAX_DECODE_PIXELS = 32_000_000  # per image, after the JPEG draft: 96 MB as 8-bit RGB (e.g. 6,900 x 4,600 px)
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


class ImageProblem(D3MError):
    """One image file that cannot be used: ``str()`` is ``"<path>: <why>"``; sources list every one at once."""


def open_image(path: Path, side: int | None) -> Image.Image:
    """Open and fully decode ``path`` as 8-bit RGB, at a JPEG draft scale covering ``side`` px (None: any).

    Raises :class:`ImageProblem` naming the file and the reason.
    """
    try:
        img = Image.open(path)
        if img.format == "JPEG":
            img.draft("RGB", (side, side) if side else (1, 1))
        w, h = img.size
        if w * h > MAX_DECODE_PIXELS:
            img.close()
            raise ImageProblem(f"{path}: {w}x{h} px is over the decode budget of {MAX_DECODE_PIXELS / 1e6:.0f} MP "
                               "per image; downscale it (a short side of 2,048 px is plenty) or remove it")
        img.load()
        return _to_rgb(img, path)
    except ImageProblem:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageProblem(f"unreadable image {path}: {exc}; delete or replace it") from None


def _to_rgb(img: Image.Image, path: Path) -> Image.Image:
    """An open image as 8-bit RGB (the rules in the module docstring)."""
    if img.mode in SIXTEEN_BIT_MODES:
        values = np.asarray(img, dtype=np.float32)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise ImageProblem(f"{path}: a {img.mode} image with values in [{values.min():g}, {values.max():g}], "
                               "outside 16-bit 0..65535; save it as 8- or 16-bit RGB")
        return Image.fromarray(np.rint(values * (255 / 65535)).astype(np.uint8), "L").convert("RGB")
    if img.mode == "F":
        values = np.asarray(img, dtype=np.float32)
        if values.size and not (np.isfinite(values).all() and values.min() >= 0 and values.max() <= 1):
            raise ImageProblem(f"{path}: a float image with values in [{np.nanmin(values):g}, {np.nanmax(values):g}]; "
                               "float images must hold values in [0, 1] (or save it as 8- or 16-bit)")
        return Image.fromarray(np.rint(values * 255).astype(np.uint8), "L").convert("RGB")
    if (img.mode == "P" and "transparency" in img.info) or img.mode in ALPHA_MODES:
        rgba = img.convert("RGBA")
        alpha = rgba.getchannel("A").getextrema()
        flat = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
        if alpha[0] < alpha[1] and all(lo == hi for lo, hi in flat.getextrema()):
            raise ImageProblem(f"{path}: its content is only in the alpha channel (one flat colour once composited "
                               "over white); flatten it onto the background you mean, e.g. "
                               "`magick in.png -background black -flatten out.png`")
        return flat
    return img.convert("RGB")
