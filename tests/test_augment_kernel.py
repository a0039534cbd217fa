"""The fused Numba kernel computes the same views as the tensor implementation."""
import pytest
import torch

from simclrv2.data import augment as A
from simclrv2.data import augment_kernel
from simclrv2.data.crops import sample_crop_boxes
from simclrv2.data.resize import crop_resize, resize_boxes

pytestmark = pytest.mark.skipif(not augment_kernel.available(), reason="needs Numba")


def _images(n, channels, height, width, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, channels, height, width), generator=g, dtype=torch.uint8)
    # Edge cases for the HSV maths: flat grey images (chroma 0), pure primaries, black and white.
    images[0] = 128
    images[1] = 0
    images[2] = 255
    if channels == 3:
        images[3] = torch.tensor([255, 0, 0], dtype=torch.uint8).view(3, 1, 1)
        images[4, :, : height // 2] = torch.tensor([0, 255, 0], dtype=torch.uint8).view(3, 1, 1)
        images[4, :, height // 2:] = torch.tensor([0, 0, 255], dtype=torch.uint8).view(3, 1, 1)
    return images


def _pair(image_size, **kwargs):
    return (A.SimCLRAugment(image_size, fused=True, **kwargs), A.SimCLRAugment(image_size, fused=False, **kwargs))


@pytest.mark.parametrize("image_size,source,channels,strength,blur", [
    (96, (96, 96), 3, 1.0, True),      # STL-10 size, with blur
    (32, (32, 32), 3, 0.5, False),     # CIFAR
    (28, (28, 28), 1, 1.0, False),     # Fashion-MNIST: grey input expanded to RGB
    (64, (50, 77), 3, 1.0, True),      # upsampling, non-square source
    (40, (120, 90), 3, 1.5, True),     # downsampling, strength above 1.25
])
def test_fused_equals_tensor_path(image_size, source, channels, strength, blur):
    fused, plain = _pair(image_size, color_jitter_strength=strength, use_blur=blur)
    images = _images(160, channels, *source)
    params = fused.sample_params(160, *source, torch.Generator().manual_seed(1))
    assert params.jitter.any() and params.grayscale.any() and params.flip.any()
    out = fused.apply(images, params)
    ref = plain.apply(images, params)
    assert out.shape == ref.shape == (160, 3, image_size, image_size) and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    assert out.min() >= 0 and out.max() <= 1


@pytest.mark.parametrize("op", range(4))
def test_each_colour_op_alone(op):
    """All four steps do the same op, so a wrong op cannot hide behind the others."""
    fused, plain = _pair(48, use_blur=False)
    images = _images(40, 3, 48, 48, seed=op)
    params = fused.sample_params(40, 48, 48, torch.Generator().manual_seed(op))
    params.jitter[:] = True
    params.grayscale[:] = False
    params.order[:] = op
    torch.testing.assert_close(fused.apply(images, params), plain.apply(images, params), atol=1e-5, rtol=0)


def test_bilinear_and_crop_flip_only():
    images = _images(50, 3, 70, 70)
    for kwargs in ({"interpolation": "bilinear"}, {"color_jitter_strength": 0.0, "use_blur": False, "color": False}):
        fused, plain = _pair(56, **kwargs)
        params = fused.sample_params(50, 70, 70, torch.Generator().manual_seed(2))
        # The tensor path's bilinear is grid_sample, whose arithmetic differs a little more.
        torch.testing.assert_close(fused.apply(images, params), plain.apply(images, params), atol=5e-5, rtol=0)


def test_result_does_not_depend_on_threads():
    fused, _ = _pair(64)
    images = _images(37, 3, 80, 80)
    params = fused.sample_params(37, 80, 80, torch.Generator().manual_seed(3))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = fused.apply(images, params)
        torch.set_num_threads(2)
        two = fused.apply(images, params)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


def test_float_input_and_explicit_opt_out_use_the_tensor_path(monkeypatch):
    calls = []
    monkeypatch.setattr(augment_kernel, "augment_views", lambda *a, **k: calls.append(1))
    aug = A.SimCLRAugment(32)
    aug(torch.rand(4, 3, 32, 32))
    A.SimCLRAugment(32, fused=False)(torch.zeros(4, 3, 32, 32, dtype=torch.uint8))
    assert calls == []
    aug(torch.zeros(4, 3, 32, 32, dtype=torch.uint8))
    assert calls == [1]


def test_fused_without_numba_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(augment_kernel, "numba", None)
    with pytest.raises(ValueError, match="needs Numba"):
        A.SimCLRAugment(32, fused=True)
    assert A.SimCLRAugment(32).fused is False


def test_crop_resize_same_with_and_without_the_kernel(monkeypatch):
    """Worker-side crops of one image: the kernel and the tensor fallback (Numba missing) agree
    up to the uint8 rounding, and both equal ``resize_boxes`` on the original."""
    image = _images(6, 3, 75, 110, seed=4)[5]
    boxes = sample_crop_boxes(6, 75, 110, torch.Generator().manual_seed(2))
    fused = crop_resize(image, boxes, 48)
    monkeypatch.setattr(augment_kernel, "available", lambda: False)
    assert not A.SimCLRAugment(48).fused
    plain = crop_resize(image, boxes, 48)
    assert fused.shape == plain.shape == (6, 3, 48, 48) and fused.dtype == plain.dtype == torch.uint8
    assert (fused.int() - plain.int()).abs().max() <= 1
    exact = resize_boxes(image[None].expand(6, -1, -1, -1), boxes, 48).clamp(0, 1) * 255
    assert (plain.float() - exact).abs().max() <= 0.5 + 1e-3
