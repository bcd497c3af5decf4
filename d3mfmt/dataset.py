"""``D3MDataset``: a torch map-style dataset that regenerates an archive's images.

Example:
    >>> from torch.utils.data import DataLoader
    >>> from d3mfmt import D3MDataset
    >>> ds = D3MDataset("mnist_ipc10.d3m")                      # doctest: +SKIP
    >>> image, soft_label, label = ds[0]                         # patch 0 of image 0 of class 0
    >>> loader = DataLoader(ds, batch_size=64, shuffle=True)    # one generation call per batch

Items (``unit="patch"``, the default; ``len = classes * ipc * grid**2``):
``(image float32 [3, h, w] in [0, 1], soft label float32 [C], class index)``.
With ``unit="image"`` (``len = classes * ipc``): ``(collage [3, H, W],
labels [grid**2, C], class index)``. Index ``k`` of the patch unit is the label
row ``k`` of the archive, ``(c * ipc + i) * grid**2 + j``.

Rendered images go to an on-disk cache (``d3mfmt.pixelcache``: one file per
image, written atomically, so DataLoader workers can share it) under a key
made of the archive's content hash and every setting that changes pixels; the
second epoch only reads. A damaged or foreign cache file is rendered again. A
cache folder that cannot be written keeps images in memory instead, with one
warning.
"""

from __future__ import annotations

import os
import warnings
from collections import OrderedDict
from dataclasses import replace
from pathlib import Path

import torch

from .archive import Archive, load_file
from .errors import D3MError
from .files import cache_root
from .generator import (
    DEFAULT_RENDER_BATCH,
    Regenerator,
    check_device,
    default_device,
    default_dtype,
    resolve_render_settings,
    split_patches,
)
from .pixelcache import PixelCache, cache_key
from .render import RenderOptions, checked
from .sources import resolve_archive

UNITS = ("patch", "image")
_MEMORY_IMAGES = 256  # decoded images kept per process


class D3MDataset(torch.utils.data.Dataset):
    """Patches (or whole collages) of a .d3m archive, with their soft labels.

    Args:
        path: the .d3m file, an ``hf://datasets/ORG/NAME[@REV]/FILE.d3m`` id or a
            URL pinned by ``#sha256=<hex>`` (see :func:`d3mfmt.resolve_archive`).
        unit: ``"patch"`` (default) or ``"image"``.
        transform: applied to each image tensor.
        target_transform: applied to each soft label (``[C]``, or ``[grid**2, C]`` with ``unit="image"``),
            e.g. sharpening with a temperature or ``lambda p: p.argmax()`` for hard labels.
        cache_dir: the root of the pixel cache (default ``$D3MFMT_CACHE_DIR``
            or ``~/.cache/d3mfmt``, subfolder ``images``); this archive's images
            go to its keyed subfolder :attr:`image_cache_dir`.
        render: model, device, dtype and switches (:class:`d3mfmt.RenderOptions`;
            default CUDA+fp16 when available, else CPU+fp32). Its ``allow_download``
            also lets a hub or URL archive be fetched.
        render_batch: images per generation call; a call mixes classes to fill it.
        sha256: expected sha256 of the archive file (instead of a URL fragment).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        unit: str = "patch",
        transform=None,
        target_transform=None,
        cache_dir: str | os.PathLike | None = None,
        render: RenderOptions = RenderOptions(),
        render_batch: int = DEFAULT_RENDER_BATCH,
        sha256: str | None = None,
    ):
        # 1. check inputs; the device before anything else is resolved
        if unit not in UNITS:
            raise D3MError(f"unit must be one of {list(UNITS)}, got {unit!r}")
        if not isinstance(render_batch, int) or render_batch < 1:
            raise D3MError(f"render_batch must be a positive integer, got {render_batch!r}")
        render = checked(render)
        device = render.device or default_device()
        check_device(device)
        # 2. fixed here, so that every worker renders alike: the resolved device and dtype
        self.render = replace(render, device=device, dtype=render.dtype or default_dtype(device))
        self.path = resolve_archive(path, allow_download=render.allow_download, sha256=sha256)
        self.unit, self.transform, self.render_batch = unit, transform, render_batch
        self.target_transform = target_transform
        self.cache_dir = Path(cache_dir) if cache_dir is not None else cache_root() / "images"
        self._archive: Archive | None = load_file(self.path)
        ds = self._archive.manifest.dataset
        self.num_classes, self.ipc, self.grid = ds.num_classes, ds.ipc, ds.grid
        self.classes = [c.name for c in ds.classes]
        self._regen: Regenerator | None = None
        self._pixels: PixelCache | None = None
        self._memory: OrderedDict[tuple[int, int], torch.Tensor] = OrderedDict()
        self._cache_writable = True  # False after a failed write: memory only, warned once

    # -- pickling: no pipeline, no arrays; workers reload the small archive ---

    def __getstate__(self):
        state = dict(self.__dict__)
        state.update(_archive=None, _regen=None, _memory=OrderedDict())
        return state

    @property
    def archive(self) -> Archive:
        if self._archive is None:
            self._archive = load_file(self.path)
        return self._archive

    @property
    def regenerator(self) -> Regenerator:
        """The renderer, created on first use (loads the model)."""
        if self._regen is None:
            self._regen = Regenerator(self.archive.manifest.generator, self.archive.embeddings, self.render)
        return self._regen

    @property
    def pixel_cache(self) -> PixelCache:
        """This archive's cached images (resolves the model to compute the key; loads nothing)."""
        if self._pixels is None:
            gen = self.archive.manifest.generator
            _, settings = resolve_render_settings(gen, self.render)
            folder = self.cache_dir / cache_key(self.archive.content_hash, settings.key_parts())
            self._pixels = PixelCache(folder, gen.height, gen.width)
        return self._pixels

    @property
    def image_cache_dir(self) -> Path:
        """This archive's folder under :attr:`cache_dir`: content hash + every pixel-changing setting."""
        return self.pixel_cache.folder

    # -- the Dataset protocol -------------------------------------------------

    def __len__(self) -> int:
        n = self.num_classes * self.ipc
        return n * self.grid * self.grid if self.unit == "patch" else n

    def __getitem__(self, index: int):
        return self.__getitems__([index])[0]

    def __getitems__(self, indices) -> list:
        """A whole batch in one go: its missing images render together, ``render_batch`` per call."""
        g2 = self.grid * self.grid
        indices = [self._check_index(i) for i in indices]
        images = self.render_images({(i // g2 if self.unit == "patch" else i) for i in indices})
        items = []
        for k in indices:
            if self.unit == "patch":
                image_idx, j = divmod(k, g2)
                x = split_patches(images[image_idx][None], self.grid)[0, j]
                label = torch.from_numpy(self.archive.labels.dense(slice(k, k + 1))[0])
            else:
                image_idx = k
                x = images[image_idx]
                label = torch.from_numpy(self.archive.labels.dense(slice(k * g2, (k + 1) * g2)))
            if self.transform is not None:
                x = self.transform(x)
            if self.target_transform is not None:
                label = self.target_transform(label)
            items.append((x, label, image_idx // self.ipc))
        return items

    def _check_index(self, index) -> int:
        index = int(index)
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} items")
        return index

    def _check_image(self, index) -> int:
        index, total = int(index), self.num_classes * self.ipc
        if not 0 <= index < total:
            raise IndexError(f"image index {index} out of range for an archive of {total} images")
        return index

    # -- rendering and caching ------------------------------------------------

    def render_images(self, image_indices) -> dict[int, torch.Tensor]:
        """image index (``c * ipc + i``) -> float32 ``[3, H, W]``, rendering what is not cached."""
        out, missing = {}, []
        for idx in sorted(image_indices):
            x = self._memory.get(divmod(idx, self.ipc)) if self._memory else None
            if x is None:
                x = self._read_cached(idx)
            if x is None:
                missing.append(idx)
            else:
                out[idx] = self._remember(idx, x)
        for start in range(0, len(missing), self.render_batch):  # classes mixed: full batches at any IPC
            chunk = missing[start : start + self.render_batch]
            pairs = [(idx // self.ipc, int(self.archive.seeds[idx // self.ipc, idx % self.ipc])) for idx in chunk]
            rendered = self.regenerator.render_pairs(pairs)
            for idx, x in zip(chunk, rendered):
                self._write_cached(idx, x)
                out[idx] = self._remember(idx, x)
        return out

    def materialize(self, progress: bool = True, images=None) -> "D3MDataset":
        """Render every image (or the image indices ``images``) into the cache now; returns self.

        Progress is a tqdm bar on stderr; batches of ``render_batch`` span classes.
        """
        from tqdm.auto import tqdm

        wanted = range(self.num_classes * self.ipc) if images is None else sorted({self._check_image(i) for i in images})
        todo = [i for i in wanted if not self.pixel_cache.path(*divmod(i, self.ipc)).is_file()]
        with tqdm(total=len(todo), desc="rendering", unit="img", disable=not progress or not todo) as bar:
            for start in range(0, len(todo), self.render_batch):
                chunk = todo[start : start + self.render_batch]
                self.render_images(chunk)
                bar.update(len(chunk))
        return self

    def _read_cached(self, idx: int) -> torch.Tensor | None:
        pixels = self.pixel_cache.read(*divmod(idx, self.ipc))
        return None if pixels is None else torch.from_numpy(pixels).float().div_(255.0)

    def _write_cached(self, idx: int, x: torch.Tensor) -> None:
        """Cache one image; on an unwritable cache, warn once and keep memory only."""
        if not self._cache_writable:
            return
        try:
            self.pixel_cache.write(*divmod(idx, self.ipc), torch.round(x * 255.0).to(torch.uint8).numpy())
        except OSError as exc:
            self._cache_writable = False
            warnings.warn(
                f"the pixel cache {self.image_cache_dir} cannot be written ({exc.strerror or exc}); images are "
                f"kept in memory only (the last {_MEMORY_IMAGES}) and rendered again after that. Pass a writable "
                "cache_dir (d3m-inspect: --cache-dir) or set D3MFMT_CACHE_DIR",
                RuntimeWarning,
                stacklevel=2,
            )

    def _remember(self, idx: int, x: torch.Tensor) -> torch.Tensor:
        key = divmod(idx, self.ipc)
        self._memory[key] = x
        self._memory.move_to_end(key)
        while len(self._memory) > _MEMORY_IMAGES:
            self._memory.popitem(last=False)
        return x
