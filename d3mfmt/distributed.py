"""Consumers on many GPUs: the ranks of ``torch.distributed``, and a sampler that gives each rank whole images.

``D3MDataset.materialize()`` under an initialised process group renders each
image once across ranks (the k-th wanted image on rank ``k % world``, then a
barrier; the pixel cache is shared). Training without materialising first is
where a patch-level ``DistributedSampler`` costs: it deals the patches of one
image to several ranks, and each of them renders that image. With 2x2
collages, 8 ranks render 3.3x the distinct images in the first epoch (3.9x at
64 ranks; ``examples/simulate_rank_renders.py``). :class:`D3MDistributedSampler`
deals whole images instead, so a rank's first epoch renders only its own.

Example (under torchrun, one process per GPU)::

    torch.distributed.init_process_group("nccl")
    ds = D3MDataset("imagenet_ipc10.d3m")              # renders on cuda:LOCAL_RANK
    sampler = D3MDistributedSampler(ds)                 # whole images per rank, reshuffled by set_epoch
    loader = DataLoader(ds, batch_size=64, sampler=sampler, num_workers=0)
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        for images, soft_labels, labels in loader: ...
"""

from __future__ import annotations

import torch

from .errors import D3MError


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the initialised default process group, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier(device: str) -> None:
    """Wait for every rank; NCCL is told the rank's own GPU (``device``) rather than guessing it."""
    import torch.distributed as dist

    parsed = torch.device(device)
    if dist.get_backend() == "nccl" and parsed.type == "cuda":
        dist.barrier(device_ids=[parsed.index if parsed.index is not None else torch.cuda.current_device()])
    else:
        dist.barrier()


def _check_int(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise D3MError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


class D3MDistributedSampler(torch.utils.data.Sampler):
    """``DistributedSampler`` for :class:`d3mfmt.D3MDataset` that deals whole images to ranks.

    Each epoch the images are shuffled with ``seed + epoch`` (the same order on
    every rank) and dealt round-robin: position ``k`` goes to rank ``k %
    num_replicas`` (without shuffling, image ``i`` goes to rank ``i %
    num_replicas``, as in ``materialize``). A rank yields every item (patch,
    or collage with ``unit="image"``) of its images, shuffled among
    themselves. So no image is rendered by two ranks in the first epoch, and
    later epochs, dealt afresh, read the shared pixel cache. Every rank yields
    the same number of items: ranks with one image fewer repeat some of their
    own items (``drop_last=False``), or every rank keeps only
    ``len(images) // num_replicas`` images (``drop_last=True``).

    Args:
        dataset: a ``D3MDataset`` (anything with ``__len__`` and ``items_per_image``).
        num_replicas, rank: default: the initialised process group's world size and rank.
        shuffle: shuffle images and items each epoch (call :meth:`set_epoch`).
        seed: the shuffling seed; must be the same on every rank.
        drop_last: drop the images that do not divide evenly instead of repeating items.
    """

    def __init__(self, dataset, num_replicas: int | None = None, rank: int | None = None, shuffle: bool = True,
                 seed: int = 0, drop_last: bool = False):
        # 1. check inputs; the process group fills what is not given
        group_rank, group_world = rank_and_world()
        self.num_replicas = _check_int("num_replicas", group_world if num_replicas is None else num_replicas, 1)
        self.rank = _check_int("rank", group_rank if rank is None else rank, 0)
        if self.rank >= self.num_replicas:
            raise D3MError(f"rank must be in 0..{self.num_replicas - 1} for num_replicas={self.num_replicas}, "
                           f"got {self.rank}")
        self.seed, self.shuffle, self.drop_last, self.epoch = _check_int("seed", seed, 0), bool(shuffle), drop_last, 0
        self.items_per_image = _check_int("dataset.items_per_image", dataset.items_per_image, 1)
        self.num_images = len(dataset) // self.items_per_image
        # 2. every rank the same length
        per_rank = self.num_images // self.num_replicas if drop_last else -(-self.num_images // self.num_replicas)
        self.num_samples = per_rank * self.items_per_image

    def set_epoch(self, epoch: int) -> None:
        """Deal and shuffle anew for ``epoch`` (call it on every rank before each epoch, as with torch's sampler)."""
        self.epoch = _check_int("epoch", epoch, 0)

    def images(self) -> list[int]:
        """The image indices this rank gets this epoch."""
        if self.shuffle:
            order = torch.randperm(self.num_images, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        else:
            order = torch.arange(self.num_images)
        if self.drop_last:
            order = order[: self.num_images - self.num_images % self.num_replicas]
        return order[self.rank :: self.num_replicas].tolist()

    def __iter__(self):
        # 1. this rank's images, every item of each
        ipi, own = self.items_per_image, self.images()
        if not own and self.num_samples:  # fewer images than ranks: borrow one (it renders twice)
            own = [(self.rank + self.seed + self.epoch) % self.num_images]
        items = torch.tensor([img * ipi + j for img in own for j in range(ipi)], dtype=torch.long)
        # 2. shuffled among themselves, a stream per (epoch, rank)
        if self.shuffle:
            g = torch.Generator().manual_seed((self.seed + self.epoch) * self.num_replicas + self.rank)
            items = items[torch.randperm(len(items), generator=g)]
        # 3. pad with this rank's own items (never another rank's images) to the common length
        if len(items) < self.num_samples:
            items = items.repeat(-(-self.num_samples // len(items)))
        return iter(items[: self.num_samples].tolist())

    def __len__(self) -> int:
        return self.num_samples
