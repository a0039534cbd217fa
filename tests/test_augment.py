"""Batched SimCLR augmentation: parameters, geometry, colour ops and official statistics."""
from __future__ import annotations

import colorsys
import json
import math
import random
from dataclasses import fields

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from simclrv2.data import augment as A
from simclrv2.data.augment import AugmentParams, SimCLRAugment
from simclrv2.data.blur import blur_kernel_radius, gaussian_blur, gaussian_taps
from simclrv2.data.color import adjust_brightness, adjust_contrast, adjust_hue, adjust_saturation, to_grayscale
from simclrv2.data.crops import FIRST_CROP_ATTEMPTS, center_crop_box, first_valid_crop, sample_crop_boxes
from simclrv2.data.eval_transform import EvalTransform
from simclrv2.data.resize import resize_boxes
from simclrv2.data.torchvision_views import PILViewsDataset, torchvision_simclr_transform


def _params(n: int, **overrides) -> AugmentParams:
    """Identity parameters for n images of 16x16, with selected fields replaced."""
    base = dict(boxes=torch.tensor([0, 0, 16, 16]).repeat(n, 1), flip=torch.zeros(n, dtype=torch.bool),
                jitter=torch.zeros(n, dtype=torch.bool), order=torch.arange(4).repeat(n, 1),
                brightness=torch.ones(n), contrast=torch.ones(n), saturation=torch.ones(n), hue=torch.zeros(n),
                grayscale=torch.zeros(n, dtype=torch.bool), blur=torch.zeros(n, dtype=torch.bool),
                sigma=torch.ones(n))
    base.update(overrides)
    return AugmentParams(**base)


def _colourful(n: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)


# ------------------------------------------------------------------------------------------------
# Crop sampling (official distorted_bounding_box_crop / tf.image.sample_distorted_bounding_box)
# ------------------------------------------------------------------------------------------------
def _tf_crop_scalar(rng: random.Random, height: int, width: int) -> tuple[int, int, int, int]:
    """Independent scalar port of TensorFlow's GenerateRandomCrop loop (area 0.08-1, aspect
    3/4-4/3, min_object_covered 0.1, 100 attempts), float64 arithmetic."""
    min_area, max_area = 0.08 * width * height, 1.0 * width * height
    for _ in range(100):
        aspect = 0.75 + rng.random() * (4 / 3 - 0.75)
        h = round(math.sqrt(min_area / aspect))
        max_h = round(math.sqrt(max_area / aspect))
        if round(max_h * aspect) > width:
            max_h = int((width + 0.5 - 1e-7) / aspect)
            if round(max_h * aspect) > width:
                max_h -= 1
        max_h = min(max_h, height)
        h = min(h, max_h)
        if h < max_h:
            h += rng.randrange(max_h - h + 1)
        w = round(h * aspect)
        if w * h < min_area:
            h += 1
            w = round(h * aspect)
        if w * h > max_area:
            h -= 1
            w = round(h * aspect)
        if w * h < min_area or w * h > max_area or w > width or h > height or w <= 0 or h <= 0:
            continue
        if w * h / (width * height) < 0.1:
            continue
        y = rng.randrange(height - h) if h < height else 0
        x = rng.randrange(width - w) if w < width else 0
        return y, x, h, w
    return 0, 0, height, width


@pytest.mark.parametrize("size", [32, 224])
def test_crop_boxes_valid_and_match_scalar_port(size):
    g = torch.Generator().manual_seed(1)
    boxes = sample_crop_boxes(6000, size, size, g)
    y0, x0, h, w = boxes.T.double()
    assert (y0 >= 0).all() and (x0 >= 0).all() and (y0 + h <= size).all() and (x0 + w <= size).all()
    area = h * w / size**2
    assert area.min() >= 0.1 - 1e-9 and area.max() <= 1.0  # min_object_covered = 0.1 beats area 0.08
    full = (h == size) & (w == size)
    aspect = (w / h)[~full]
    slack = 0.5 / h[~full] * 1.01  # width = round(h * aspect): at most half a pixel off
    assert ((aspect >= 0.75 - slack) & (aspect <= 4 / 3 + slack)).all()
    # offsets never reach the last row/column unless the crop spans the image (TF's Uniform(n))
    assert ((y0 + h < size) | (h == size)).all() and ((x0 + w < size) | (w == size)).all()

    rng = random.Random(2)
    ref = torch.tensor([_tf_crop_scalar(rng, size, size) for _ in range(6000)], dtype=torch.float64)
    ref_area = ref[:, 2] * ref[:, 3] / size**2
    levels = torch.tensor([0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95], dtype=torch.float64)
    assert torch.allclose(area.quantile(levels), ref_area.quantile(levels), atol=0.03)
    ref_aspect = (ref[:, 3] / ref[:, 2])
    assert torch.allclose((w / h).quantile(levels), ref_aspect.quantile(levels), atol=0.03)


@pytest.mark.parametrize("height, width", [(32, 32), (224, 224), (3, 40), (4, 100), (1, 1)])
def test_crop_boxes_judging_later_attempts_only_where_needed_changes_nothing(height, width):
    """The host judges the first attempts for every image and the rest only where those all fail;
    the boxes are those of judging all 100 attempts of every image (3 x 40 images often find
    their crop only after the first attempts, 4 x 100 images never find one)."""
    n, attempts = 3000, 100
    boxes = sample_crop_boxes(n, height, width, torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    aspect = torch.rand(attempts, n, generator=g) * (4 / 3 - 3 / 4) + 3 / 4
    u = torch.rand(attempts, n, generator=g)
    h, w, found = first_valid_crop(aspect, u, height, width, (0.08, 1.0), 0.1)
    h, w = torch.where(found, h, float(height)), torch.where(found, w, float(width))
    offsets = torch.rand(2, n, generator=g)
    y0 = torch.minimum(torch.floor(offsets[0] * (height - h)), (height - h - 1).clamp(min=0))
    x0 = torch.minimum(torch.floor(offsets[1] * (width - w)), (width - w - 1).clamp(min=0))
    assert torch.equal(boxes, torch.stack([y0, x0, h, w], dim=1).long())
    later = ~first_valid_crop(aspect[:FIRST_CROP_ATTEMPTS], u[:FIRST_CROP_ATTEMPTS], height, width,
                                (0.08, 1.0), 0.1)[2]
    if (height, width) == (3, 40):
        assert int((later & found).sum()) > 100
    if (height, width) == (4, 100):
        assert not found.any() and (boxes == torch.tensor([0, 0, 4, 100])).all()  # whole-image fallback


@pytest.mark.parametrize("size", ["32", "224"])
def test_crop_statistics_match_official(reference_dir, size):
    stats = json.loads((reference_dir / "augment_stats.json").read_text())
    levels = torch.tensor(stats["quantile_levels"], dtype=torch.float64)
    official = stats["sizes"][size]
    s = int(size)
    boxes = sample_crop_boxes(8000, s, s, torch.Generator().manual_seed(3)).double()
    area = boxes[:, 2] * boxes[:, 3] / s**2
    aspect = boxes[:, 3] / boxes[:, 2]
    inner = slice(1, -1)  # skip the extreme 0 and 1 levels, which are noisy in 2000 draws
    assert torch.allclose(area.quantile(levels)[inner],
                          torch.tensor(official["area_fraction_quantiles"], dtype=torch.float64)[inner], atol=0.035)
    assert torch.allclose(aspect.quantile(levels)[inner],
                          torch.tensor(official["aspect_ratio_w_over_h_quantiles"], dtype=torch.float64)[inner],
                          atol=0.035)
    assert abs(area.mean().item() - official["area_fraction_mean"]) < 0.015
    if s == 32:  # integer rounding at 32 px: the smallest crop is 0.105 of the image
        assert area.min().item() == pytest.approx(official["area_fraction_quantiles"][0])


def test_parameter_frequencies_and_ranges():
    aug = SimCLRAugment(32, color_jitter_strength=1.0, use_blur=True)
    p = aug.sample_params(8000, 32, 32, torch.Generator().manual_seed(4))
    assert abs(p.flip.float().mean().item() - 0.5) < 0.025
    assert abs(p.jitter.float().mean().item() - 0.8) < 0.02
    assert abs(p.grayscale.float().mean().item() - 0.2) < 0.02
    assert abs(p.blur.float().mean().item() - 0.5) < 0.025
    assert 0.2 <= p.brightness.min() and p.brightness.max() <= 1.8  # SimCLRv2: U(1-0.8s, 1+0.8s)
    assert p.brightness.min() < 0.25 and p.brightness.max() > 1.75
    assert 0.2 <= p.contrast.min() and p.contrast.max() <= 1.8
    assert 0.2 <= p.saturation.min() and p.saturation.max() <= 1.8
    assert -0.2 <= p.hue.min() and p.hue.max() <= 0.2 and p.hue.min() < -0.19
    assert 0.1 <= p.sigma.min() and p.sigma.max() <= 2.0
    assert (p.order.sort(dim=1).values == torch.arange(4)).all()  # each row a permutation
    first = torch.bincount(p.order[:, 0], minlength=4).float() / 8000
    assert torch.allclose(first, torch.full((4,), 0.25), atol=0.025)

    weak = SimCLRAugment(32, color_jitter_strength=0.5).sample_params(4000, 32, 32, torch.Generator().manual_seed(5))
    assert 0.6 <= weak.brightness.min() and weak.brightness.max() <= 1.4 and weak.hue.abs().max() <= 0.1
    strong = SimCLRAugment(32, color_jitter_strength=1.5).sample_params(4000, 32, 32, torch.Generator().manual_seed(5))
    assert strong.brightness.min() >= 0.0  # max(0, 1 - 0.8s)


def test_zero_strength_keeps_random_grayscale():
    """Official ``random_color_jitter``: jitter ops of strength 0 do nothing, grayscale (p = 0.2)
    still applies."""
    aug = SimCLRAugment(16, color_jitter_strength=0.0, use_blur=False)
    p = aug.sample_params(4000, 16, 16, torch.Generator().manual_seed(3))
    assert not p.jitter.any()
    assert abs(p.grayscale.float().mean().item() - 0.2) < 0.025
    images = torch.zeros(64, 3, 16, 16, dtype=torch.uint8)
    images[:, 0] = 200  # pure red: only grayscale makes the channels equal
    views = aug(images, torch.Generator().manual_seed(4))
    equal = (views[:, 0] - views[:, 1]).abs().amax(dim=(1, 2)) < 1e-6
    assert 0 < int(equal.sum()) < 64
    classic = torchvision_simclr_transform(16, 0.0, blur=False)
    assert [type(op).__name__ for op in classic.transforms] == [
        "RandomResizedCrop", "RandomHorizontalFlip", "RandomGrayscale", "ToTensor"]

def test_flags_turn_parts_off():
    p = SimCLRAugment(32, crop=False, flip=False, color=False, use_blur=False).sample_params(500, 40, 36)
    assert (p.boxes == torch.tensor([0, 0, 40, 36])).all()
    assert not p.flip.any() and not p.jitter.any() and not p.grayscale.any() and not p.blur.any()


# ------------------------------------------------------------------------------------------------
# Output contract and reproducibility
# ------------------------------------------------------------------------------------------------
def test_output_contract_uint8_float_and_grey():
    aug = SimCLRAugment(24, use_blur=True)
    x = _colourful(10, 20)
    for inp in (x, x.float() / 255, x[:, :1]):
        out = aug(inp, torch.Generator().manual_seed(0))
        assert out.shape == (10, 3, 24, 24) and out.dtype == torch.float32 and out.device == inp.device
        assert out.min() >= 0.0 and out.max() <= 1.0
    with pytest.raises(ValueError, match="shape"):
        aug(x[0])
    with pytest.raises(ValueError, match="dtype"):
        aug(x.long())


def test_same_seed_same_views_different_seed_different():
    aug = SimCLRAugment(16, use_blur=True)
    x = _colourful(12)
    a = aug(x, torch.Generator().manual_seed(7))
    b = aug(x, torch.Generator().manual_seed(7))
    c = aug(x, torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    views = aug.views(x, 3, torch.Generator().manual_seed(7))
    assert views.shape == (36, 3, 16, 16)
    assert torch.equal(views, aug.views(x, 3, torch.Generator().manual_seed(7)))
    v1, v2, v3 = views.chunk(3)  # view v of image i is row v * N + i, each its own draw
    assert not torch.allclose(v1, v2) and not torch.allclose(v2, v3)
    assert torch.equal(views, aug(torch.cat([x, x, x]), torch.Generator().manual_seed(7)))


def test_chunking_does_not_change_result():
    x = _colourful(23, 20)
    p = SimCLRAugment(16, use_blur=True).sample_params(23, 20, 20, torch.Generator().manual_seed(9))
    whole = SimCLRAugment(16, use_blur=True, chunk_size=1000).apply(x, p)
    chunked = SimCLRAugment(16, use_blur=True, chunk_size=5).apply(x, p)
    assert torch.allclose(whole, chunked, atol=1e-6)


def test_schedule_partitions_the_batch():
    p = SimCLRAugment(16, use_blur=True).sample_params(300, 16, 16, torch.Generator().manual_seed(10))
    jitter, gray, blur = A.schedule(p)
    for step in range(4):
        chosen = torch.cat(jitter[step]).sort().values
        assert torch.equal(chosen, torch.nonzero(p.jitter).flatten())  # each jittered image once per step
        for op in range(4):
            assert (p.order[jitter[step][op], step] == op).all()
    for step_subsets in zip(*jitter):  # every jittered image gets each op exactly once
        assert sorted(torch.cat(step_subsets).tolist()) == torch.nonzero(p.jitter).flatten().tolist()
    assert torch.equal(gray.sort().values, torch.nonzero(p.grayscale).flatten())
    assert torch.equal(blur.sort().values, torch.nonzero(p.blur).flatten())


def test_finetune_augment_keeps_colours():
    x = torch.zeros(50, 3, 16, 16, dtype=torch.uint8)
    x[:, 0], x[:, 1], x[:, 2] = 200, 100, 50
    out = A.finetune_augment(16)(x, torch.Generator().manual_seed(0))
    expected = torch.tensor([200, 100, 50]).view(1, 3, 1, 1) / 255
    assert torch.allclose(out, expected.expand_as(out), atol=1e-5)


def test_grayscale_outputs_have_equal_channels_and_change_fraction():
    """Official stats: ~20 % of outputs grey, ~84 % changed at all (1 - 0.2 * 0.8)."""
    aug = SimCLRAugment(8, crop=False, flip=False, use_blur=False)
    x = _colourful(3000, 8, seed=1)
    p = aug.sample_params(3000, 8, 8, torch.Generator().manual_seed(11))
    out = aug.apply(x, p)
    grey = (out.amax(1) - out.amin(1)).amax(dim=(1, 2)) < 1e-6
    assert torch.equal(grey, p.grayscale)
    assert abs(grey.float().mean().item() - 0.2) < 0.03
    changed = (out - x.float() / 255).abs().amax(dim=(1, 2, 3)) > 1e-4
    assert abs(changed.float().mean().item() - (1 - 0.2 * 0.8)) < 0.03


# ------------------------------------------------------------------------------------------------
# Geometry: crop, resize, flip
# ------------------------------------------------------------------------------------------------
def _keys(d: float) -> float:
    d = abs(d)
    if d <= 1:
        return 1.5 * d**3 - 2.5 * d**2 + 1
    if d < 2:
        return -0.5 * d**3 + 2.5 * d**2 - 4 * d + 2
    return 0.0


def _resize_reference(img: np.ndarray, box, out: int) -> np.ndarray:
    """float64 loop: crop, then TF half-pixel bicubic (Keys a=-0.5), out-of-crop taps dropped."""
    y0, x0, h, w = box
    crop = img[:, y0:y0 + h, x0:x0 + w].astype(np.float64)

    def weights(length):
        m = np.zeros((out, length))
        for s in range(out):
            centre = (s + 0.5) * length / out - 0.5
            for j in range(length):
                m[s, j] = _keys(j - centre)
            m[s] /= m[s].sum()
        return m

    rows, cols = weights(h), weights(w)
    return np.einsum("sh,chw,tw->cst", rows, crop, cols)


def test_resize_matches_float64_reference():
    img = _colourful(1, 20, seed=3)
    box = torch.tensor([[3, 5, 11, 14]])
    out = resize_boxes(img, box, 9)[0].numpy()
    ref = _resize_reference(img[0].numpy() / 255.0, (3, 5, 11, 14), 9)
    assert np.abs(out - ref).max() < 1e-5


def test_resize_identity_crop_and_bilinear_vs_interpolate():
    x = torch.rand(2, 3, 12, 12)
    same = resize_boxes(x, torch.tensor([[2, 3, 7, 5], [0, 0, 12, 12]]), (7, 5))
    assert torch.allclose(same[0], x[0, :, 2:9, 3:8], atol=1e-6)  # crop at native size: exact
    up = resize_boxes(x, torch.tensor([[0, 0, 12, 12]] * 2), 30, interpolation="bilinear")
    ref = F.interpolate(x, size=30, mode="bilinear", align_corners=False)
    assert torch.allclose(up, ref, atol=1e-5)


def test_flip_and_crop_on_hand_made_images():
    grad = torch.arange(16, dtype=torch.float32).repeat(16, 1)[None, None].expand(1, 3, 16, 16) / 15
    p = _params(1, flip=torch.tensor([True]))
    out = SimCLRAugment(16, crop=False, color=False, use_blur=False).apply(grad, p)
    assert torch.allclose(out, grad.flip(-1), atol=1e-6)

    dot = torch.zeros(1, 3, 32, 32)
    dot[..., 20, 6] = 1.0
    box = torch.tensor([[16, 0, 16, 16]])  # bottom-left quarter, dot at local (4, 6)
    up = resize_boxes(dot, box, 32, interpolation="bilinear")
    # 2x upsampling: outputs 8 and 9 sample local positions 3.75 and 4.25, weight 0.75 on pixel 4
    assert torch.allclose(up[0, 0, 8:10, 12:14], torch.full((2, 2), 0.75**2))
    assert up.max() == pytest.approx(0.75**2) and up[0, 0, 7:11, 11:15].sum() == pytest.approx(4.0)
    flipped = resize_boxes(dot, box, 32, flip=torch.tensor([True]), interpolation="bilinear")
    assert torch.allclose(flipped, up.flip(-1), atol=1e-6)
    assert resize_boxes(dot, torch.tensor([[0, 0, 16, 16]]), 32).abs().max() == 0  # dot outside the crop


# ------------------------------------------------------------------------------------------------
# Colour ops against float64 colorsys / hand formulas
# ------------------------------------------------------------------------------------------------
def _per_pixel(x: torch.Tensor, fn) -> torch.Tensor:
    arr = x.double().numpy()
    out = np.zeros_like(arr)
    for n in range(arr.shape[0]):
        for i in range(arr.shape[2]):
            for j in range(arr.shape[3]):
                out[n, :, i, j] = fn(n, *arr[n, :, i, j])
    return torch.from_numpy(out)


def test_hue_matches_colorsys():
    x = torch.rand(3, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    x[0, :, 0, 0] = torch.tensor([0.5, 0.5, 0.5])  # grey pixel: unchanged
    x[1, :, 0, 0] = torch.tensor([0.7, 0.7, 0.2])  # max tie between R and G
    delta = torch.tensor([0.13, -0.2, 0.45])

    def ref(n, r, g, b):
        h, s, v = colorsys.rgb_to_hsv(r, g, b)
        return colorsys.hsv_to_rgb((h + delta[n].item()) % 1.0, s, v)

    assert torch.allclose(adjust_hue(x, delta).double(), _per_pixel(x, ref), atol=1e-5)


def test_saturation_matches_colorsys():
    x = torch.rand(3, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    factor = torch.tensor([0.3, 1.0, 1.7])

    def ref(n, r, g, b):
        h, s, v = colorsys.rgb_to_hsv(r, g, b)
        return colorsys.hsv_to_rgb(h, min(max(s * factor[n].item(), 0.0), 1.0), v)

    assert torch.allclose(adjust_saturation(x, factor).double(), _per_pixel(x, ref), atol=1e-5)


def test_brightness_contrast_grayscale_formulas():
    x = torch.rand(2, 3, 5, 4, generator=torch.Generator().manual_seed(2))
    f = torch.tensor([0.4, 1.6])
    assert torch.allclose(adjust_brightness(x, f), x * f.view(2, 1, 1, 1))
    mean = x.double().mean(dim=(2, 3), keepdim=True)  # per channel, like tf.image.adjust_contrast
    assert torch.allclose(adjust_contrast(x, f).double(), (x - mean) * f.view(2, 1, 1, 1).double() + mean, atol=1e-6)
    grey = to_grayscale(x)
    assert torch.equal(grey[:, 0], grey[:, 1]) and torch.equal(grey[:, 1], grey[:, 2])
    expected = 0.2989 * x[:, 0] + 0.5870 * x[:, 1] + 0.1140 * x[:, 2]
    assert torch.allclose(grey[:, 0], expected, atol=1e-6)


def test_jitter_follows_each_images_order_with_clipping():
    x = torch.rand(2, 3, 6, 6, generator=torch.Generator().manual_seed(3))
    factors = dict(brightness=torch.tensor([1.7, 1.7]), contrast=torch.tensor([1.5, 1.5]),
                   saturation=torch.tensor([0.4, 0.4]), hue=torch.tensor([0.1, 0.1]))
    order = torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0]])
    p = _params(2, jitter=torch.tensor([True, True]), order=order, **factors)
    out = A.color_jitter(x, p)
    fns = [adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue]
    names = ["brightness", "contrast", "saturation", "hue"]
    for i in range(2):
        y = x[i:i + 1]
        for op in order[i].tolist():
            y = fns[op](y, factors[names[op]][i:i + 1]).clamp(0, 1)
        assert torch.allclose(out[i:i + 1], y, atol=1e-6)
    assert not torch.allclose(out[0], out[1], atol=1e-3)  # order matters
    unchanged = A.color_jitter(x, _params(2, order=order, **factors))  # jitter flag off
    assert torch.equal(unchanged, x)


# ------------------------------------------------------------------------------------------------
# Blur
# ------------------------------------------------------------------------------------------------
def test_blur_radius_follows_official_kernel_size():
    assert [blur_kernel_radius(s) for s in (32, 96, 224)] == [1, 4, 11]  # 3, 9 and 23 taps
    taps = gaussian_taps(torch.tensor([0.5, 2.0]), 4)
    assert torch.allclose(taps.sum(1), torch.ones(2)) and taps[0, 4] > taps[1, 4]


@pytest.mark.parametrize("radius", [2, 3])  # shifted multiply-adds and depthwise conv paths
def test_blur_matches_per_image_conv_with_zero_padding(radius):
    x = torch.rand(3, 3, 10, 10, generator=torch.Generator().manual_seed(4))
    sigma = torch.tensor([0.1, 1.0, 2.0])
    out = gaussian_blur(x, sigma, radius)
    size = 2 * radius + 1
    for i in range(3):
        t = torch.arange(-radius, radius + 1, dtype=torch.float64)
        k = torch.exp(-t**2 / (2 * sigma[i].double() ** 2))
        k = k / k.sum()
        k2 = (k[:, None] * k[None, :]).expand(3, 1, size, size)
        ref = F.conv2d(x[i:i + 1].double(), k2, padding=radius, groups=3)
        assert torch.allclose(out[i:i + 1].double(), ref, atol=1e-6)
    ones = gaussian_blur(torch.ones(1, 3, 10, 10), torch.tensor([2.0]), radius)
    assert ones[0, 0, 0, 0] < 0.9 and ones[0, 0, 5, 5] == pytest.approx(1.0, abs=0.02)  # zero padding darkens borders


# ------------------------------------------------------------------------------------------------
# Evaluation preprocessing
# ------------------------------------------------------------------------------------------------
def test_center_crop_box_official_formula():
    assert center_crop_box(80, 72, 64, 64) == (9, 5, 63, 63)
    assert center_crop_box(100, 200, 64, 64) == (6, 56, 88, 88)


def test_eval_transform_small_images_untouched():
    x = _colourful(2, 32)
    assert torch.equal(EvalTransform(32)(x), x.float() / 255)
    assert EvalTransform(32)(_colourful(2, 28)).shape == (2, 3, 32, 32)


@pytest.mark.parametrize("tag,size", [("forward_B_r50_w0.125_sk0_64", 64), ("forward_A_r18_w1_sk0.0625_cifar32", 32)])
def test_eval_transform_matches_official_preprocessing(reference_dir, tag, size):
    data = np.load(reference_dir / tag / "io.npz")
    src = torch.from_numpy(data["source_images_uint8"]).permute(0, 3, 1, 2)
    ref = torch.from_numpy(data["input"]).permute(0, 3, 1, 2)
    assert torch.allclose(EvalTransform(size)(src), ref, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# Per-image torchvision pipeline and devices
# ------------------------------------------------------------------------------------------------
def test_torchvision_pipeline_and_views_dataset():
    from simclrv2.data.in_memory import TensorImageDataset

    ds = TensorImageDataset(_colourful(3, 40), None, (), "tiny")
    views, label = PILViewsDataset(ds, torchvision_simclr_transform(36))[1]
    assert views.shape == (2, 3, 36, 36) and views.dtype == torch.float32 and label == -1
    assert 0 <= views.min() and views.max() <= 1


def test_parameters_and_index_subsets_travel_as_one_buffer():
    """What the device needs goes over in one copy whose views keep every dtype, shape and value
    (odd sizes and empty subsets included)."""
    aug = SimCLRAugment(24, use_blur=True, blur_p=0.0)
    params = aug.sample_params(37, 30, 30, torch.Generator().manual_seed(0))
    plan = A.schedule(params)
    assert plan[2].numel() == 0
    moved, moved_plan = A._send(params, plan, torch.device("cpu"))
    for field in fields(params):
        before, after = getattr(params, field.name), getattr(moved, field.name)
        assert after.dtype == before.dtype and torch.equal(after, before), field.name
    flat = [t for step in plan[0] for t in step] + [plan[1], plan[2]]
    flat_moved = [t for step in moved_plan[0] for t in step] + [moved_plan[1], moved_plan[2]]
    assert len(moved_plan[0]) == 4 and all(len(step) == 4 for step in moved_plan[0])
    assert all(a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(flat, flat_moved))
    storages = {t.untyped_storage().data_ptr() for t in flat_moved + [getattr(moved, f.name) for f in fields(moved)]}
    assert len(storages) == 1


def test_host_parameters_reach_another_device_in_one_copy():
    """A batch on another device (``meta`` here, standing in for a GPU) with parameters drawn on
    the host: one host-to-device copy per call, no other, and views of the right shape."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class HostToDevice(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.copies = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor) and out.device.type == "meta" and any(
                    isinstance(a, torch.Tensor) and a.device.type == "cpu" for a in args):
                self.copies.append((out.dtype, tuple(out.shape)))
            return out

    aug = SimCLRAugment(24, use_blur=True)
    apply = SimCLRAugment.apply.__wrapped__  # autocast has no meta device
    images = _colourful(37, 30).to("meta")
    generator = torch.Generator().manual_seed(1)
    apply(aug, images, aug.sample_params(37, 30, 30, generator))  # caches the grey weights there
    for _ in range(2):
        params = aug.sample_params(37, 30, 30, generator)
        with HostToDevice() as mode:
            out = apply(aug, images, params)
        assert out.shape == (37, 3, 24, 24) and out.dtype == torch.float32 and out.device.type == "meta"
        assert len(mode.copies) == 1 and mode.copies[0][0] == torch.uint8


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_views_from_a_host_generator_do_not_wait_for_the_gpu():
    x = _colourful(64, 40).cuda()
    aug = SimCLRAugment(36, use_blur=True)
    generator = torch.Generator().manual_seed(0)
    aug.views(x, 2, generator)  # first call: caches, cuDNN set-up
    torch.cuda.set_sync_debug_mode("error")
    try:
        views = aug.views(x, 2, generator)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert views.is_cuda and views.shape == (128, 3, 36, 36)
    on_gpu = aug.views(x, 2, torch.Generator().manual_seed(0))
    on_cpu = aug.views(x.cpu(), 2, torch.Generator().manual_seed(0))
    assert (on_gpu.cpu() - on_cpu).abs().max() < 5e-3  # the same seed, the same views on CPU and GPU


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_cuda_matches_cpu(interpolation):
    x = _colourful(16, 40)
    aug = SimCLRAugment(36, use_blur=True, interpolation=interpolation)
    p = aug.sample_params(16, 40, 40, torch.Generator().manual_seed(0))
    out = aug.apply(x.cuda(), p)
    assert out.is_cuda
    assert (out.cpu() - aug.apply(x, p)).abs().max() < 5e-3  # cuDNN may run the blur in TF32
    g = torch.Generator(device="cuda").manual_seed(1)
    assert aug(x.cuda(), g).is_cuda


def test_augmentation_is_float32_under_autocast():
    """The training step runs inside autocast; the views must not depend on it."""
    images = torch.randint(0, 256, (8, 3, 40, 40), dtype=torch.uint8)
    aug = SimCLRAugment(32, use_blur=True)
    params = aug.sample_params(8, 40, 40, torch.Generator().manual_seed(0))
    plain = aug.apply(images, params)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        under = aug.apply(images, params)
        evaluated = EvalTransform(48)(images)
    assert under.dtype == torch.float32 and evaluated.dtype == torch.float32
    torch.testing.assert_close(under, plain, rtol=0, atol=0)
    torch.testing.assert_close(evaluated, EvalTransform(48)(images), rtol=0, atol=0)


def test_crop_min_area_bounds_every_crop_of_every_path(tmp_path) -> None:
    """--crop-min-area reaches the batched crops (pretraining and fine-tuning), the image-folder
    workers and the torchvision pipeline; 0.08 is the official value."""
    from simclrv2.data.folder import ImageFolderDataset

    def areas(boxes: torch.Tensor) -> torch.Tensor:  # (N, 4) as (y, x, h, w)
        return (boxes[:, 2] * boxes[:, 3]).float() / (28 * 28)

    g = torch.Generator().manual_seed(0)
    small = areas(A.finetune_augment(28).sample_params(2000, 28, 28, g).boxes)
    large = areas(A.finetune_augment(28, crop_min_area=0.5).sample_params(2000, 28, 28, g).boxes)
    assert small.min() < 0.2 and large.min() >= 0.5 - 2 / 28  # rounding to whole pixels
    images = torch.randint(0, 255, (4, 3, 28, 28), dtype=torch.uint8)
    from simclrv2.data import TensorImageDataset
    _, make_views = TensorImageDataset(images, None, [], "t").pretrain_inputs(28, 1.0, False, crop_min_area=0.5)
    assert make_views((images,), g).shape == (8, 3, 28, 28)
    (tmp_path / "a").mkdir()
    from PIL import Image
    Image.new("RGB", (40, 40)).save(tmp_path / "a" / "x.png")
    folder, _ = ImageFolderDataset(tmp_path, image_size=16).crop_flip_inputs(16, crop_min_area=0.7)
    assert folder.crop_min_area == 0.7 and folder.mode == "train"
    assert "scale=(0.3, 1.0)" in repr(torchvision_simclr_transform(16, crop_min_area=0.3))
