"""Patch selection: the same patches as the per-crop loop of earlier builds, batched device crops, streams."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tiny_teacher import build_teacher

from builder.crops import crop_boxes, resize_crops, resize_crops_batched
from builder.patches import PatchSettings, as_float, select_patches, teacher_losses
from builder.prefetch import ImageStream
from builder.decode import open_image
from builder.sources import ImageFolderSource, _rgb_tensor


def reference_selection(images, c, teacher, keep, side, s, g):
    """Patch selection as every build before the streamed, batched one did it (the code, verbatim in substance)."""
    n, _, h, w = images.shape
    area = torch.empty(n, s.n_crops).uniform_(*s.scale, generator=g) * h * w
    log_r = torch.empty(n, s.n_crops).uniform_(*torch.log(torch.tensor(s.ratio)).tolist(), generator=g)
    aspect = torch.exp(log_r)
    ch = torch.sqrt(area / aspect).round().clamp(1, h).long()
    cw = torch.sqrt(area * aspect).round().clamp(1, w).long()
    y0 = (torch.rand(n, s.n_crops, generator=g) * (h - ch + 1)).floor().long()
    x0 = (torch.rand(n, s.n_crops, generator=g) * (w - cw + 1)).floor().long()
    crops = torch.empty(n, s.n_crops, images.shape[1], side, side)
    for a in range(n):
        for b in range(s.n_crops):
            crop = images[a : a + 1, :, y0[a, b] : y0[a, b] + ch[a, b], x0[a, b] : x0[a, b] + cw[a, b]]
            crops[a, b] = F.interpolate(crop, size=(side, side), mode="bilinear", align_corners=False, antialias=True)[0]
    loss = teacher_losses(teacher, crops.flatten(0, 1), c, s.batch, "cpu").view(n, s.n_crops)
    best_loss, best = loss.min(dim=1)
    order = torch.argsort(best_loss, stable=True).repeat((keep + n - 1) // n)[:keep]
    return crops[torch.arange(n), best][order], best_loss[order]


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(37, 3, 64, 64, generator=g)
    x[:, 2] += 0.25 * torch.rand(37, 1, 1, generator=g)  # classes the teacher tells apart, with near-ties
    return x.clamp(0, 1)


@pytest.mark.parametrize("settings", [PatchSettings(), PatchSettings(n_crops=3, batch=16),
                                      PatchSettings(n_crops=7, batch=5, max_images=20)])
def test_the_selection_is_the_one_of_earlier_builds_bit_for_bit(images, settings):
    expected = reference_selection(images[: settings.max_images], 2, build_teacher(), 12, 32, settings,
                                   torch.Generator().manual_seed(3))
    for chunk in (1, 5, 32):  # however the stream is batched, the teacher sees the same calls
        got = select_patches(ImageStream.of(images[: settings.max_images], chunk), 2, build_teacher(), 12, 32,
                             settings, torch.Generator().manual_seed(3), "cpu")
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_batched_device_crops_match_the_cpu_kernel_within_rounding():
    g = torch.Generator().manual_seed(0)
    for n, size, side in ((6, 64, 32), (4, 40, 48), (3, 100, 16)):  # down, up and strong downscaling
        x = torch.rand(n, 3, size, size, generator=g)
        boxes = crop_boxes(n, 5, size, size, (0.08, 1.0), (3 / 4, 4 / 3), g).view(-1, 4)
        owner = torch.arange(n).repeat_interleave(5)
        loop, batched = resize_crops(x, owner, boxes, side), resize_crops_batched(x, owner, boxes, side)
        assert batched.shape == loop.shape == (5 * n, 3, side, side)
        assert float((batched - loop).abs().max()) <= 4 * 2**-24 * 2  # a few float32 ulps of values <= 1
        assert float((batched == loop).float().mean()) > 0.5
        # elementwise: a crop's pixels do not depend on its batch-mates
        assert torch.equal(resize_crops_batched(x, owner[3:4], boxes[3:4], side)[0], batched[3])


def test_batched_crops_select_the_same_patches(images):
    """The device path's rounding does not move the selection on realistic data."""
    s, g = PatchSettings(), torch.Generator().manual_seed(5)
    n = len(images)
    boxes = crop_boxes(n, s.n_crops, 64, 64, s.scale, s.ratio, g).view(-1, 4)
    owner = torch.arange(n).repeat_interleave(s.n_crops)
    scores = [teacher_losses(build_teacher(), f(images, owner, boxes, 32), 2, s.batch, "cpu").view(n, -1)
              for f in (resize_crops, resize_crops_batched)]
    assert torch.equal(scores[0].argmin(1), scores[1].argmin(1))
    assert torch.equal(torch.argsort(scores[0].min(1).values, stable=True),
                       torch.argsort(scores[1].min(1).values, stable=True))
    assert float((scores[0] - scores[1]).abs().max()) < 1e-5


def test_image_streams_decode_what_images_decoded(image_folder):
    source = ImageFolderSource(image_folder)
    stream = source.image_stream(1, side=24, limit=4)
    batches = list(stream.batches)
    assert stream.count == 4 and all(b.dtype == torch.uint8 for b in batches)
    assert torch.equal(as_float(torch.cat(batches)), source.images(1, side=24, limit=4))
    named = source.image_stream(1, side=24, files=["005.png", "002.png"])
    with open_image(image_folder / "b_green" / "005.png", 24) as img:
        first = _rgb_tensor(img, 24)
    assert named.count == 2 and torch.equal(as_float(next(iter(named.batches))[0]), first)


def test_a_bad_image_in_a_stream_is_a_d3m_error(tmp_path):
    from tiny_teacher import make_imagefolder

    from d3mfmt import D3MError

    data = make_imagefolder(tmp_path / "d")
    (data / "a_red" / "003.png").write_bytes(b"not a png")
    stream = ImageFolderSource(data).image_stream(0, side=16)
    with pytest.raises(D3MError, match="unreadable image .*003.png"):
        list(stream.batches)
    assert np.isfinite(ImageFolderSource(data).images(1, side=16).numpy()).all()
