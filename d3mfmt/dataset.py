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
image, written atomically, so DataLoader workers and ranks can share it) under
a key made of the archive's content hash and every setting that changes
pixels; the second epoch only reads. A damaged, foreign or planted cache file
is rendered again; a file is verified once per process. Decoded images (8-bit)
stay in a per-process LRU of at most :attr:`D3MDataset.memory_cache_bytes`. A
cache folder that cannot be written keeps images in memory instead, with one
warning. On many GPUs see ``d3mfmt.distributed``: ``materialize()`` splits the
rendering across ranks, and :class:`~d3mfmt.distributed.D3MDistributedSampler`
keeps a rank's first epoch to its own images.
"""

from __future__ import annotations

import os
import warnings
from collections import OrderedDict
from dataclasses import replace
from pathlib import Path

import torch

from .archive import Archive, load_file
from .distributed import barrier, rank_and_world
from .errors import D3MError
from .files import cache_root
from .labels import MAX_LABEL_TABLE
from .generator import (
    DEFAULT_RENDER_BATCH,
    Regenerator,
    check_device,
    default_device,
    default_dtype,
    resolve_render_settings,
)
from .pixelcache import PixelCache, cache_key
from .render import RenderOptions, checked
from .sources import resolve_archive

UNITS = ("patch", "image")


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
            default CUDA+fp16 when available, on ``cuda:LOCAL_RANK`` under torchrun or
            accelerate, else CPU+fp32). Its ``allow_download`` also lets a hub or URL
            archive be fetched.
            Its ``limits`` (:class:`d3mfmt.RenderLimits`) bound the render cost accepted,
            when the archive loads and again for the model loaded.
        render_batch: images per generation call; a call mixes classes to fill it.
        sha256: expected sha256 of the archive file (instead of a URL fragment).
        max_label_bytes: the cap on the decoded label table (as for ``d3mfmt.load``;
            raise it, up to the format's 2 GiB, for a trusted, dense archive).

    Attributes:
        memory_cache_bytes: the bound of each process's LRU of decoded 8-bit
            images (default 256 MiB: ~340 images at 512 px; DataLoader workers
            have one each). Set it on an instance or the class; 0 keeps none.
    """

    memory_cache_bytes = 256 * 2**20

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
        max_label_bytes: int = MAX_LABEL_TABLE,
    ):
        # 1. check inputs; the device before anything else is resolved
        if unit not in UNITS:
            raise D3MError(f"unit must be one of {list(UNITS)}, got {unit!r}")
        for name, value in (("render_batch", render_batch), ("max_label_bytes", max_label_bytes)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise D3MError(f"{name} must be a positive integer, got {value!r}")
        render = checked(render)
        device = render.device or default_device()
        check_device(device)
        # 2. fixed here, so that every worker renders alike: the resolved device and dtype
        self.render = replace(render, device=device, dtype=render.dtype or default_dtype(device))
        self.path = resolve_archive(path, allow_download=render.allow_download, sha256=sha256)
        self.unit, self.transform, self.render_batch = unit, transform, render_batch
        self.target_transform = target_transform
        self.cache_dir = Path(cache_dir) if cache_dir is not None else cache_root() / "images"
        self.max_label_bytes = max_label_bytes
        self._archive: Archive | None = self._load()
        ds = self._archive.manifest.dataset
        self.num_classes, self.ipc, self.grid = ds.num_classes, ds.ipc, ds.grid
        self.classes = [c.name for c in ds.classes]
        self._regen: Regenerator | None = None
        self._pixels: PixelCache | None = None
        self._memory: OrderedDict[int, torch.Tensor] = OrderedDict()  # image index -> uint8 [3, H, W], LRU order
        self._memory_used = 0  # bytes in _memory
        self._cache_writable = True  # False after a failed write: memory only, warned once

    # -- pickling: no pipeline, no arrays; workers reload the small archive ---

    def __getstate__(self):
        state = dict(self.__dict__)
        state.update(_archive=None, _regen=None, _memory=OrderedDict(), _memory_used=0)
        return state

    @property
    def archive(self) -> Archive:
        if self._archive is None:
            self._archive = self._load()
        return self._archive

    def _load(self) -> Archive:
        return load_file(self.path, max_label_bytes=self.max_label_bytes, render_limits=self.render.limits)

    @property
    def regenerator(self) -> Regenerator:
        """The renderer, created on first use (loads the model)."""
        if self._regen is None:
            self._regen = Regenerator(self.archive.manifest.generator, self.archive.embeddings, self.render,
                                      num_images=self.num_classes * self.ipc)
        return self._regen

    @property
    def pixel_cache(self) -> PixelCache:
        """This archive's cached images (resolves the model to compute the key; loads nothing)."""
        if self._pixels is None:
            gen = self.archive.manifest.generator
            _, settings = resolve_render_settings(gen, self.render)
            name = cache_key(self.archive.content_hash, settings.key_parts())
            self._pixels = PixelCache(self.cache_dir, name, gen.height, gen.width)
        return self._pixels

    @property
    def image_cache_dir(self) -> Path:
        """This archive's folder under :attr:`cache_dir`: content hash + every pixel-changing setting."""
        return self.pixel_cache.folder

    @property
    def images_rendered(self) -> int:
        """Images this process rendered for this dataset so far (cache reads not counted)."""
        return 0 if self._regen is None else self._regen.images_rendered

    @property
    def items_per_image(self) -> int:
        """Consecutive items that come from one image: ``grid**2`` patches, or 1 with ``unit="image"``."""
        return self.grid * self.grid if self.unit == "patch" else 1

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
        images = self._pixels_of({k // self.items_per_image for k in indices})
        items = []
        for k in indices:
            if self.unit == "patch":
                image_idx, j = divmod(k, g2)
                x = _patch(images[image_idx], self.grid, j)
                label = torch.from_numpy(self.archive.labels.dense(slice(k, k + 1))[0])
            else:
                image_idx = k
                x = images[image_idx]
                label = torch.from_numpy(self.archive.labels.dense(slice(k * g2, (k + 1) * g2)))
            x = _unit_float(x)
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
        """image index (``c * ipc + i``) -> float32 ``[3, H, W]`` in 8-bit levels, rendering what is not cached."""
        return {idx: _unit_float(x) for idx, x in self._pixels_of(image_indices).items()}

    def _pixels_of(self, image_indices) -> dict[int, torch.Tensor]:
        """image index -> uint8 ``[3, H, W]``: from memory, else the pixel cache, else rendered (and cached)."""
        out, missing = {}, []
        self._trim_memory()  # memory_cache_bytes may have been lowered since the last insert
        for idx in sorted(image_indices):
            x = self._memory.get(idx)
            if x is None:
                x = self._cached_pixels(idx)
            if x is None:
                missing.append(idx)
            else:
                out[idx] = self._remember(idx, x)
        for start in range(0, len(missing), self.render_batch):  # classes mixed: full batches at any IPC
            chunk = missing[start : start + self.render_batch]
            pairs = [(idx // self.ipc, int(self.archive.seeds[idx // self.ipc, idx % self.ipc])) for idx in chunk]
            rendered = torch.round(self.regenerator.render_pairs(pairs) * 255.0).to(torch.uint8)
            for idx, x in zip(chunk, rendered.unbind()):
                x = x.clone()  # its own storage, so the LRU's byte count is what it holds
                self._write_cached(idx, x)
                out[idx] = self._remember(idx, x)
        return out

    def materialize(self, progress: bool = True, images=None, distributed: bool = True) -> "D3MDataset":
        """Render every image (or the image indices ``images``) into the cache now; returns self.

        Every cached image is verified here, so DataLoader workers forked
        afterwards neither hash nor render it. Batches of ``render_batch``
        span classes.

        Args:
            progress: a tqdm bar on stderr (under torch.distributed: rank 0's share).
            images: image indices (``c * ipc + i``) instead of all.
            distributed: under an initialised ``torch.distributed`` process
                group, split the work across its ranks; call it on every rank
                then. The k-th wanted image (image ``k`` when all are wanted)
                renders on rank ``k % world``, then all ranks wait at a barrier,
                so each image is rendered once in total; the pixel cache must be
                a folder every rank sees. A rank that still misses another
                rank's images after the barrier renders them itself, with a
                warning. ``False``: this process renders all it lacks, alone.
        """
        wanted = range(self.num_classes * self.ipc) if images is None else sorted({self._check_image(i) for i in images})
        rank, world = rank_and_world() if distributed else (0, 1)
        # 1. this rank's share, what the cache lacks of it rendered
        self._render_missing(wanted[rank::world], progress and rank == 0,
                             "rendering" if world == 1 else f"rendering (rank 0 of {world})")
        if world == 1:
            return self
        # 2. the other ranks' shares, once they are done
        barrier(self.render.device)
        others = [idx for k, idx in enumerate(wanted) if k % world != rank]
        missing = [idx for idx in others if self._cached_pixels(idx) is None]
        if missing:
            warnings.warn(
                f"rank {rank}: {len(missing)} images the other ranks rendered are not in the pixel cache "
                f"{self.image_cache_dir} (the ranks do not share one cache folder, or a rank could not write it); "
                "rendering them here too. Pass a cache_dir every rank can read and write (or set D3MFMT_CACHE_DIR)",
                RuntimeWarning, stacklevel=2,
            )
            self._render_missing(missing, progress, f"rendering on rank {rank}")
        return self

    def _render_missing(self, indices, progress: bool, desc: str) -> None:
        """Render (and cache) those of ``indices`` whose cache file is absent or not genuine."""
        from tqdm.auto import tqdm

        todo = [idx for idx in indices if self._cached_pixels(idx) is None]
        with tqdm(total=len(todo), desc=desc, unit="img", disable=not progress or not todo) as bar:
            for start in range(0, len(todo), self.render_batch):
                chunk = todo[start : start + self.render_batch]
                self._pixels_of(chunk)
                bar.update(len(chunk))

    def _cached_pixels(self, idx: int) -> torch.Tensor | None:
        """uint8 ``[3, H, W]`` from the pixel cache, or None when absent or not genuine."""
        pixels = self.pixel_cache.read(*divmod(idx, self.ipc))
        return None if pixels is None else torch.from_numpy(pixels)

    def _write_cached(self, idx: int, x: torch.Tensor) -> None:
        """Cache one uint8 image; on an unwritable cache, warn once and keep memory only."""
        if not self._cache_writable:
            return
        try:
            self.pixel_cache.write(*divmod(idx, self.ipc), x.numpy())
        except OSError as exc:
            self._cache_writable = False
            warnings.warn(
                f"the pixel cache {self.image_cache_dir} cannot be written ({exc.strerror or exc}); images are "
                f"kept in memory only (up to memory_cache_bytes={self.memory_cache_bytes:,} per process) and "
                "rendered again after that. Pass a writable cache_dir (d3m-inspect: --cache-dir) or set "
                "D3MFMT_CACHE_DIR",
                RuntimeWarning,
                stacklevel=2,
            )

    def _remember(self, idx: int, x: torch.Tensor) -> torch.Tensor:
        """Keep ``x`` as the most recent entry of the LRU, evicting the oldest beyond ``memory_cache_bytes``."""
        if idx in self._memory:
            self._memory.move_to_end(idx)
            return x
        self._memory[idx] = x
        self._memory_used += x.numel()
        self._trim_memory()
        return x

    def _trim_memory(self) -> None:
        while self._memory and self._memory_used > self.memory_cache_bytes:
            _, old = self._memory.popitem(last=False)
            self._memory_used -= old.numel()


def _patch(image: torch.Tensor, grid: int, j: int) -> torch.Tensor:
    """SPEC step 8 for one patch: row-major patch ``j`` of ``[3, H, W]`` (a view, no copy of the image)."""
    _, h, w = image.shape
    row, col = divmod(j, grid)
    ph, pw = h // grid, w // grid
    return image[:, row * ph : (row + 1) * ph, col * pw : (col + 1) * pw]


def _unit_float(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 -> float32 ``k / 255`` in one kernel: bit-identical to what the renderer returned (SPEC step 7)."""
    return torch.div(pixels, 255.0)
