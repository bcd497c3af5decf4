"""Leave the format: ImageFolder images, diffusers textual-inversion files, preview grids."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .archive import Archive
from .errors import D3MError
from .files import atomic_folder, safe_file_name, write_atomic

TOKEN_FORMAT = "<d3m-{}>"  # the placeholder token an exported embedding is loaded under
# One preview sheet holds at most this many rows (classes) and columns (images per class): 64 x 32 cells of
# 132 px are 8,448 x 4,334 px, 110 MB of RGB; an archive of 100,000 classes would otherwise ask for 40+ GB.
MAX_PREVIEW_CLASSES = 64
MAX_PREVIEW_PER_CLASS = 32
MAX_PREVIEW_CELL = 512


def class_folder(index: int, name: str) -> str:
    """``0007_seven``: zero-padded so ImageFolder's sorted order is the archive's order."""
    return f"{index:04d}_{safe_file_name(name, default='class', max_chars=64)}"


def _to_pil(image) -> Image.Image:
    """float ``[3, H, W]`` in [0, 1] -> RGB PIL image."""
    pixels = np.round(np.asarray(image.permute(1, 2, 0).cpu()) * 255.0).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


def export_embeddings(archive: Archive, out_dir) -> list[Path]:
    """One diffusers textual-inversion file per class: ``{token: [V, D]}``, metadata format=pt.

    Load them all at once with ``pipe.load_textual_inversion(tensors, token=tokens)``.
    """
    import safetensors.numpy

    names = []
    with atomic_folder(out_dir) as out:
        for c, info in enumerate(archive.manifest.dataset.classes):
            names.append(f"{class_folder(c, info.name)}.safetensors")
            token = TOKEN_FORMAT.format(info.id)
            safetensors.numpy.save_file({token: np.ascontiguousarray(archive.embeddings[c])}, out / names[-1],
                                        metadata={"format": "pt"})
    return [Path(out_dir) / name for name in names]


def export_images(dataset, out_dir, progress: bool = True) -> int:
    """Write a D3MDataset's items as PNGs in an ImageFolder layout; returns the count.

    ``unit="patch"`` writes ``c{c}_i{i}_p{j}.png`` patches; ``unit="image"``
    writes ``c{c}_i{i}.png`` collages.
    """
    from tqdm.auto import tqdm

    with atomic_folder(out_dir) as out:
        dataset.materialize(progress=progress, distributed=False)  # this process writes the folder: it renders all
        g2 = dataset.grid * dataset.grid
        folders = [class_folder(c, n) for c, n in enumerate(dataset.classes)]
        for folder in folders:
            (out / folder).mkdir()
        for k in tqdm(range(len(dataset)), desc="exporting", unit="png", disable=not progress):
            image, _, label = dataset[k]
            if dataset.unit == "patch":
                (c, i), j = divmod(k // g2, dataset.ipc), k % g2
                name = f"c{c:04d}_i{i:04d}_p{j}.png"
            else:
                c, i = divmod(k, dataset.ipc)
                name = f"c{c:04d}_i{i:04d}.png"
            _to_pil(image).save(out / folders[label] / name)
    return len(dataset)


def write_png(image: Image.Image, path) -> None:
    """Save ``image`` as PNG at ``path`` whatever its suffix, atomically (nothing at ``path`` on failure)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    write_atomic(path, buf.getvalue())


def preview_grid(dataset, classes: list[int], per_class: int = 8, cell: int = 128) -> Image.Image:
    """A row per class: its name, then up to ``per_class`` regenerated images.

    Each patch of each image carries its stored top-1 label and probability.
    The sheet is bounded before anything is rendered or allocated: at most
    :data:`MAX_PREVIEW_CLASSES` classes and :data:`MAX_PREVIEW_PER_CLASS` images per
    class (make several sheets for more).
    """
    for arg, value, most in (("per_class (d3m-inspect: --per-class)", per_class, MAX_PREVIEW_PER_CLASS),
                             ("cell", cell, MAX_PREVIEW_CELL)):
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= most:
            raise D3MError(f"{arg} must be an integer in 1..{most}, got {value!r}")
    if not classes or len(classes) > MAX_PREVIEW_CLASSES:
        raise D3MError(f"a preview sheet shows 1..{MAX_PREVIEW_CLASSES} classes, {len(classes)} were asked for; "
                       "choose them (d3m-inspect preview: --select 0,5,cat) and make several sheets for more")
    font = ImageFont.load_default()
    per_class = min(per_class, dataset.ipc)
    label_w, g = 110, dataset.grid
    sheet = Image.new("RGB", (label_w + per_class * (cell + 4), len(classes) * (cell + 4)), "white")
    draw = ImageDraw.Draw(sheet)
    names = dataset.classes
    # every shown image in one request: the dataset fills render batches across classes
    images = dataset.render_images([c * dataset.ipc + i for c in classes for i in range(per_class)])
    for row, c in enumerate(classes):
        y = row * (cell + 4)
        draw.text((4, y + cell // 2 - 6), f"{c}: {names[c]}"[:18], fill="black", font=font)
        for col in range(per_class):
            idx = c * dataset.ipc + col
            tile = _to_pil(images[idx]).resize((cell, cell), Image.NEAREST)
            tile_draw = ImageDraw.Draw(tile)
            labels = dataset.archive.labels.dense(slice(idx * g * g, (idx + 1) * g * g))
            for j, p in enumerate(labels):
                top = int(p.argmax())
                px, py = (j % g) * cell // g, (j // g) * cell // g
                text = f"{top} {p[top]:.2f}"
                tile_draw.rectangle((px, py, px + 6 * len(text) + 2, py + 11), fill="black")
                tile_draw.text((px + 1, py), text, fill="yellow" if top == c else "red", font=font)
            sheet.paste(tile, (label_w + col * (cell + 4), y))
    return sheet
