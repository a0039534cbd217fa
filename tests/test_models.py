"""SimCLRv2 model family: shapes, parameter counts, TF padding, SK, heads and modes."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from simclrv2.models import (
    RESNET_SPECS,
    ProjectionHead,
    SimCLRv2Model,
    SupervisedHead,
    build_resnet,
    build_simclrv2_model,
    count_parameters,
)
from simclrv2.models.resnet import (
    AvgPool2dSame,
    BasicBlock,
    FixedPadAvgPool2d,
    MaxPool2dSame,
    SelectiveKernelConv,
    tf_same_padding,
)
from model_checks import assert_official_counts, bn_stats

# Paper Table 1, in millions. They are the encoder's parameters *including* the BN moving statistics,
# rounded: trainable ones alone give 232 (not 233) for R152-2x and 353 (not 354) for R152-2x-SK.
TABLE1 = {
    (50, 1, False): 24, (50, 1, True): 35, (50, 2, False): 94, (50, 2, True): 140,
    (101, 1, False): 43, (101, 1, True): 65, (101, 2, False): 170, (101, 2, True): 257,
    (152, 1, False): 58, (152, 1, True): 89, (152, 2, False): 233, (152, 2, True): 354,
    (152, 3, True): 795,
}


def _small_model(**overrides) -> SimCLRv2Model:
    cfg = dict(resnet_depth=18, width_multiplier=0.125, sk_ratio=0.0, cifar_stem=True, num_proj_layers=3,
               proj_out_dim=16, ft_proj_selector=1, num_classes=5)
    cfg.update(overrides)
    return build_simclrv2_model(**cfg)


def _randomise_bn(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial BN state (gamma, beta, moving stats) so that eval outputs depend on every layer."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                if m.bias is not None:
                    m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)


# ---------------------------------------------------------------- shapes


@pytest.mark.parametrize(
    "depth,width,sk,cifar,size,spatial",
    [
        (18, 0.25, 0.0, True, 32, [32, 32, 32, 16, 8, 4]),
        (18, 1.0, 0.0625, True, 32, [32, 32, 32, 16, 8, 4]),
        (34, 0.25, 0.0, True, 32, [32, 32, 32, 16, 8, 4]),
        (50, 0.25, 0.0625, True, 32, [32, 32, 32, 16, 8, 4]),
        (18, 0.25, 0.0625, False, 224, [112, 56, 56, 28, 14, 7]),
        (50, 0.25, 0.0, False, 224, [112, 56, 56, 28, 14, 7]),
        (101, 0.125, 0.0625, False, 224, [112, 56, 56, 28, 14, 7]),
        (50, 0.125, 0.0625, False, 65, [33, 17, 17, 9, 5, 3]),  # odd sizes follow TF: ceil(H / stride)
    ],
)
def test_encoder_shapes(depth, width, sk, cifar, size, spatial):
    model = build_resnet(depth, width, sk, cifar).eval()
    kind, _ = RESNET_SPECS[depth]
    expansion = 4 if kind == "bottleneck" else 1
    assert model.out_dim == int(512 * width) * expansion
    assert (model.depth, model.width_multiplier, model.sk_ratio, model.cifar_stem) == (depth, width, sk, cifar)
    x = torch.rand(1, 3, size, size)
    with torch.no_grad():
        inter = model.forward_intermediates(x)
        pooled = model(x)
    assert list(inter) == ["initial_conv", "initial_max_pool", "block_group1", "block_group2", "block_group3",
                           "block_group4", "final_avg_pool"]
    channels = [int(64 * width)] * 2 + [int(c * width) * expansion for c in (64, 128, 256, 512)]
    for (name, t), c, s in zip(list(inter.items())[:6], channels, spatial):
        assert tuple(t.shape) == (1, c, s, s), name
    assert pooled.shape == (1, model.out_dim)
    torch.testing.assert_close(pooled, inter["final_avg_pool"])
    torch.testing.assert_close(pooled, inter["block_group4"].mean(dim=(2, 3)))


def test_cifar_stem_max_pool_entry_is_stem_output():
    model = build_resnet(18, 0.25, cifar_stem=True).eval()
    _randomise_bn(model)
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        inter = model.forward_intermediates(x)
        expected = F.relu(model.stem.bn1(model.stem.conv1(x)))
    torch.testing.assert_close(inter["initial_conv"], model.stem.conv1(x).detach())
    torch.testing.assert_close(inter["initial_max_pool"], expected)


def test_channels_follow_float_width_and_sk_stem():
    model = build_resnet(50, 0.125, sk_ratio=0.0625)
    assert [model.stem.conv1.out_channels, model.stem.conv2.out_channels, model.stem.conv3.out_channels] == [4, 4, 8]
    assert [layer[0].conv1.out_channels for layer in (model.layer1, model.layer2, model.layer3, model.layer4)] == [8, 16, 32, 64]
    assert [layer[-1].bn3.num_features for layer in (model.layer1, model.layer2, model.layer3, model.layer4)] == [32, 64, 128, 256]
    with torch.device("meta"):
        full = build_resnet(50, 1.0, sk_ratio=0.0625, cifar_stem=False)
        plain = build_resnet(50, 1.0)
    assert [full.stem.conv1.out_channels, full.stem.conv3.out_channels] == [32, 64]
    assert [full.stem.conv1.kernel_size, full.stem.conv1.stride] == [(3, 3), (2, 2)]
    assert [plain.stem.conv1.kernel_size, plain.stem.conv1.stride] == [(7, 7), (2, 2)]


def test_every_group_starts_with_a_projection_and_stride_sits_on_3x3():
    for depth in (18, 50):
        model = build_resnet(depth, 0.25)
        for g, layer in enumerate((model.layer1, model.layer2, model.layer3, model.layer4)):
            assert layer[0].downsample is not None  # official: use_projection=True even in group 1
            assert all(block.downsample is None for block in layer[1:])
            stride = 1 if g == 0 else 2
            assert layer[0].conv1.stride == ((stride, stride) if depth == 18 else (1, 1))
            assert layer[0].conv2.stride == ((stride, stride) if depth == 50 else (1, 1))
            assert layer[0].downsample[0].stride == (stride, stride)


def test_resnet_d_shortcut_layout():
    model = build_resnet(50, 0.25, sk_ratio=0.0625)
    assert isinstance(model.layer1[0].downsample[0], AvgPool2dSame)
    assert isinstance(model.layer2[0].downsample[0], FixedPadAvgPool2d)
    for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
        conv = layer[0].downsample[1]
        assert conv.kernel_size == (1, 1) and conv.stride == (1, 1)
        assert isinstance(layer[0].conv2, SelectiveKernelConv) and layer[0].bn2 is None
    basic = build_resnet(18, 0.25, sk_ratio=0.0625)  # SK flag: only ResNet-D shortcuts in basic blocks
    assert isinstance(basic.layer2[0].downsample[0], FixedPadAvgPool2d)
    assert not any(isinstance(m, SelectiveKernelConv) for m in basic.modules())


def test_names_match_torchvision_resnet50():
    torchvision = pytest.importorskip("torchvision")
    with torch.device("meta"):
        ours = build_resnet(50, 1.0).state_dict()
        theirs = torchvision.models.resnet50().state_dict()
    renamed = {("stem." + k if k.split(".")[0] in ("conv1", "bn1") else k): v
               for k, v in theirs.items() if not k.startswith("fc.")}
    assert set(renamed) == set(ours)
    assert all(renamed[k].shape == ours[k].shape for k in ours)


# ---------------------------------------------------------------- parameter counts


def test_param_counts_match_paper_table1():
    for (depth, width, sk), millions in TABLE1.items():
        with torch.device("meta"):
            model = build_resnet(depth, width, 0.0625 if sk else 0.0)
        total = count_parameters(model) + bn_stats(model)
        assert round(total / 1e6) == millions, (depth, width, sk)
        assert abs(count_parameters(model) / 1e6 - millions) < 1, (depth, width, sk)


def test_param_counts_match_official(reference_dir):
    path = reference_dir / "param_counts.json"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    rows = json.loads(path.read_text())["rows"]
    assert len(rows) == 22
    for row in rows:
        with torch.device("meta"):
            model = build_simclrv2_model(resnet_depth=row["depth"], width_multiplier=row["width"], sk_ratio=row["sk_ratio"],
                                         cifar_stem=False, num_proj_layers=3, proj_out_dim=128, ft_proj_selector=0,
                                         num_classes=1000)
        name = f"R{row['depth']}-{row['width']}x-sk{row['sk_ratio']}"
        assert model.encoder.out_dim == row["encoder_output_dim"], name
        assert_official_counts(model, row, name)
        widths = [(layer.linear.in_features, layer.linear.out_features) for layer in model.projection_head.layers]
        assert widths == [tuple(layer["dense_kernel"]) for layer in row["proj_head_layers"]], name
        assert [layer.bn.bias is not None for layer in model.projection_head.layers] == \
            [layer["bn_center(beta)"] for layer in row["proj_head_layers"]], name


def test_count_parameters_trainable_only():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2, bias=False))
    model[0].weight.requires_grad_(False)
    assert count_parameters(model, trainable_only=False) == 12 + 4 + 8
    assert count_parameters(model) == 4 + 8


# ---------------------------------------------------------------- TF padding semantics


def _tf_same_pool_reference(x: np.ndarray, k: int, s: int, op) -> np.ndarray:
    """TF SAME pooling from its definition: each window keeps only the cells inside the image."""
    h, w = x.shape[-2:]
    oh, ow = math.ceil(h / s), math.ceil(w / s)
    top = max((oh - 1) * s + k - h, 0) // 2
    left = max((ow - 1) * s + k - w, 0) // 2
    out = np.empty(x.shape[:-2] + (oh, ow))
    for i in range(oh):
        for j in range(ow):
            r0, c0 = i * s - top, j * s - left
            window = x[..., max(r0, 0):min(r0 + k, h), max(c0, 0):min(c0 + k, w)]
            out[..., i, j] = op(window.reshape(window.shape[:-2] + (-1,)), axis=-1)
    return out


def test_tf_same_padding_values():
    assert tf_same_padding(4, 3, 2) == (0, 1)
    assert tf_same_padding(112, 3, 2) == (0, 1)
    assert tf_same_padding(5, 3, 2) == (1, 1)
    assert tf_same_padding(7, 2, 1) == (0, 1)
    assert tf_same_padding(8, 1, 2) == (0, 0)


def test_max_pool_same_hand_computed():
    x = -torch.arange(1.0, 17.0).reshape(1, 1, 4, 4)  # all negative: zero padding would show up
    out = MaxPool2dSame(3, 2)(x)
    # TF pads one row/column bottom/right only: windows rows/cols {0,1,2} and {2,3}.
    expected = torch.tensor([[[[-1.0, -3.0], [-9.0, -11.0]]]])
    torch.testing.assert_close(out, expected)
    assert not torch.equal(nn.MaxPool2d(3, 2, padding=1)(x), expected)


@pytest.mark.parametrize("size", [4, 5, 6, 7, 9])
@pytest.mark.parametrize("k,s", [(3, 2), (2, 1), (3, 1), (2, 2)])
def test_same_pools_match_definition(size, k, s):
    x = torch.randn(2, 3, size, size + 1, dtype=torch.float64)
    np.testing.assert_allclose(MaxPool2dSame(k, s)(x).numpy(), _tf_same_pool_reference(x.numpy(), k, s, np.max))
    np.testing.assert_allclose(AvgPool2dSame(k, s)(x).numpy(), _tf_same_pool_reference(x.numpy(), k, s, np.mean))


def test_stride1_avg_pool_excludes_padding_hand_computed():
    x = torch.arange(1.0, 10.0).reshape(1, 1, 3, 3)
    expected = torch.tensor([[[[3.0, 4.0, 4.5], [6.0, 7.0, 7.5], [7.5, 8.5, 9.0]]]])
    torch.testing.assert_close(AvgPool2dSame(2, 1)(x), expected)


def test_stride2_resnet_d_pool_counts_fixed_padding():
    x = torch.arange(1.0, 10.0).reshape(1, 1, 3, 3)
    expected = torch.tensor([[[[3.0, 9.0 / 4], [15.0 / 4, 9.0 / 4]]]])  # zero row/column counted
    torch.testing.assert_close(FixedPadAvgPool2d()(x), expected)
    even = torch.randn(2, 3, 6, 8)
    torch.testing.assert_close(FixedPadAvgPool2d()(even), F.avg_pool2d(even, 2, 2))


# ---------------------------------------------------------------- init


def test_zero_init_gamma_only_on_last_bn_of_residual_branch():
    for depth, sk in ((18, 0.0), (18, 0.0625), (50, 0.0), (50, 0.0625)):
        model = build_simclrv2_model(resnet_depth=depth, width_multiplier=0.125, sk_ratio=sk, cifar_stem=False,
                                     num_proj_layers=3, proj_out_dim=8, ft_proj_selector=0, num_classes=3)
        last = {id(b.bn2 if isinstance(b, BasicBlock) else b.bn3)
                for layer in (model.encoder.layer1, model.encoder.layer2, model.encoder.layer3, model.encoder.layer4)
                for b in layer}
        bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        assert len(last) == sum(RESNET_SPECS[depth][1])
        for bn in bns:
            assert torch.all(bn.weight == (0.0 if id(bn) in last else 1.0))
            if bn.bias is not None:
                assert torch.all(bn.bias == 0)


def test_residual_branches_start_as_zero():
    model = build_resnet(50, 0.125, sk_ratio=0.0625).eval()
    with torch.no_grad():
        x = model.stem(torch.rand(2, 3, 32, 32))
        for layer in (model.layer1, model.layer2):
            block = layer[0]
            torch.testing.assert_close(block(x), F.relu(block.downsample(x)))
            x = block(x)
            torch.testing.assert_close(layer[1](x), F.relu(x))


def test_conv_and_dense_init_scales():
    torch.manual_seed(0)
    model = build_simclrv2_model(resnet_depth=50, width_multiplier=0.5, sk_ratio=0.0, cifar_stem=False, num_proj_layers=2,
                                 proj_out_dim=128, ft_proj_selector=0, num_classes=1000)
    conv = model.encoder.layer4[0].conv2.weight  # 3x3, 256 -> 256: fan_in 2304
    std = 1 / math.sqrt(conv[0].numel())
    assert abs(conv.std().item() / std - 1) < 0.02  # truncation-corrected: variance is 1/fan_in
    assert conv.abs().max().item() <= 2 * std / 0.87962566103423978 + 1e-7
    for dense in (model.projection_head.layers[0].linear.weight, model.supervised_head.linear.weight):
        assert abs(dense.std().item() / 0.01 - 1) < 0.02
    assert torch.all(model.supervised_head.linear.bias == 0)


# ---------------------------------------------------------------- selective kernel


def test_sk_mid_dim_and_shapes():
    sk = SelectiveKernelConv(64, 64, stride=2, sk_ratio=0.0625)
    assert (sk.conv.out_channels, sk.fc1.out_channels, sk.fc2.out_channels) == (128, 32, 128)
    assert SelectiveKernelConv(256, 256, 1, sk_ratio=0.25).fc1.out_channels == 64
    assert sk(torch.rand(2, 64, 9, 9)).shape == (2, 64, 5, 5)


def test_sk_mixes_the_two_streams_with_a_softmax():
    torch.manual_seed(0)
    sk = SelectiveKernelConv(6, 4, stride=1, sk_ratio=0.5, min_dim=3).eval()
    _randomise_bn(sk)
    x = torch.randn(2, 6, 5, 5)
    with torch.no_grad():
        streams = F.relu(sk.bn(sk.conv(x)))
        first, second = streams[:, :4], streams[:, 4:]
        nn.init.zeros_(sk.fc2.weight)  # equal logits: the average of both streams
        torch.testing.assert_close(sk(x), (first + second) / 2)
        sk.fc_bn.weight.zero_()
        sk.fc_bn.bias.fill_(1.0)  # the squeezed context is then exactly 1 everywhere
        sk.fc2.weight[:4].fill_(30.0)
        sk.fc2.weight[4:].fill_(-30.0)
        torch.testing.assert_close(sk(x), first)  # stream 0 = first half of the channels
        sk.fc2.weight.zero_()
        sk.fc2.weight[0].fill_(1.0)  # channel 0 of stream 0 gets logit 3 (= mid dim), all others 0
        expected = first.clone()
        a = torch.softmax(torch.tensor([3.0, 0.0]), 0)
        expected[:, 0] = a[0] * first[:, 0] + a[1] * second[:, 0]
        expected[:, 1:] = (first[:, 1:] + second[:, 1:]) / 2
        torch.testing.assert_close(sk(x), expected)


# ---------------------------------------------------------------- heads


def test_projection_head_structure():
    head = ProjectionHead(32, num_layers=3, out_dim=8, ft_proj_selector=1)
    assert [(l.linear.in_features, l.linear.out_features) for l in head.layers] == [(32, 32), (32, 32), (32, 8)]
    assert all(l.linear.bias is None for l in head.layers)
    assert [l.bn.bias is not None for l in head.layers] == [True, True, False]
    assert all(l.bn.weight is not None for l in head.layers)
    assert [l.relu for l in head.layers] == [True, True, False]
    assert head.hidden_dims == [32, 32, 32, 8]
    assert "layers.2.bn.bias" not in head.state_dict()
    _randomise_bn(head)
    head.eval()
    x = torch.randn(64, 32)
    with torch.no_grad():
        hiddens = head.hiddens(x)
        manual = x
        for j, layer in enumerate(head.layers):
            bn = layer.bn
            z = (layer.linear.weight @ manual.T).T
            z = (z - bn.running_mean) / torch.sqrt(bn.running_var + 1e-5) * bn.weight
            manual = torch.relu(z + bn.bias) if j < 2 else z
            torch.testing.assert_close(hiddens[j + 1], manual)
    assert torch.all(hiddens[1] >= 0) and torch.all(hiddens[2] >= 0) and hiddens[3].min() < 0
    projection, selected = head(x)
    torch.testing.assert_close(projection, hiddens[3])
    torch.testing.assert_close(selected, hiddens[1])


@pytest.mark.parametrize("k", [0, 1, 2, 3, -1])
def test_finetune_from_layer_k_uses_exactly_the_first_k_layers(k):
    head = ProjectionHead(16, num_layers=3, out_dim=8, ft_proj_selector=k).eval()
    x = torch.randn(10, 16)
    used = 3 if k == -1 else k
    with torch.no_grad():
        base = head.hidden_at(x, k)
        torch.testing.assert_close(head(x)[1], base)
        for j, layer in enumerate(head.layers):
            saved = layer.linear.weight.clone()
            layer.linear.weight.add_(torch.randn_like(saved))
            changed = not torch.allclose(head.hidden_at(x, k), base)
            layer.linear.weight.copy_(saved)
            assert changed == (j < used), (k, j)


def test_projection_head_selector_validation_and_identity_head():
    with pytest.raises(ValueError, match="ft_proj_selector"):
        ProjectionHead(16, num_layers=3, ft_proj_selector=4)
    head = ProjectionHead(16, num_layers=2)
    with pytest.raises(ValueError, match="out of range"):
        head.ft_proj_selector = -2
    with pytest.raises(ValueError, match="num_layers"):
        ProjectionHead(16, num_layers=-1)
    identity = ProjectionHead(16, num_layers=0, ft_proj_selector=0)
    x = torch.randn(4, 16)
    projection, hidden = identity(x)
    assert identity.out_dim == 16 and count_parameters(identity) == 0
    assert projection is x and hidden is x
    with pytest.raises(ValueError):
        ProjectionHead(16, num_layers=0, ft_proj_selector=1)


def test_sync_batchnorm_conversion_keeps_gamma_only_bn():
    model = _small_model(ft_proj_selector=0)
    _randomise_bn(model)
    model.eval()
    x = torch.rand(3, 3, 16, 16)
    with torch.no_grad():
        expected = model(x)
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(model).eval()
    bns = [m for m in synced.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert bns and all(isinstance(m, nn.SyncBatchNorm) for m in bns)
    assert synced.projection_head.layers[2].bn.bias is None
    assert synced.projection_head.layers[2].bn.weight is not None
    with torch.no_grad():
        got = synced(x)
    torch.testing.assert_close(got[0], expected[0])
    torch.testing.assert_close(got[1], expected[1])


def test_supervised_head_init_and_zero_init():
    head = SupervisedHead(12, 7)
    assert head.linear.bias is not None and head.linear.weight.shape == (7, 12)
    assert head.linear.weight.abs().sum() > 0 and torch.all(head.linear.bias == 0)
    zero = SupervisedHead(12, 7, zero_init=True)
    assert torch.all(zero.linear.weight == 0) and torch.all(zero.linear.bias == 0)
    head.reset_parameters(zero_init=True)
    assert torch.all(head.linear.weight == 0)
    with pytest.raises(ValueError, match="num_classes"):
        SupervisedHead(12, 0)


# ---------------------------------------------------------------- SimCLRv2Model


@pytest.mark.parametrize("selector,width", [(0, 64), (1, 64), (2, 64), (3, 16), (-1, 16)])
def test_supervised_head_takes_the_selected_hidden(selector, width):
    model = _small_model(width_multiplier=0.125, resnet_depth=34, ft_proj_selector=selector, zero_init_logits=True)
    assert model.supervised_head.linear.in_features == width
    assert torch.all(model.supervised_head.linear.weight == 0)


def test_pretrain_mode_detaches_the_supervised_head():
    model = _small_model(ft_proj_selector=1).train()
    x = torch.rand(4, 3, 16, 16)
    projection, logits = model(x)
    assert projection.shape == (4, 16) and logits.shape == (4, 5)
    logits.square().sum().backward()
    assert model.supervised_head.linear.weight.grad.abs().sum() > 0
    for name, p in list(model.encoder.named_parameters()) + list(model.projection_head.named_parameters()):
        assert p.grad is None, name
    model.zero_grad(set_to_none=True)
    projection, _ = model(x)
    projection.square().sum().backward()
    assert model.encoder.stem.conv1.weight.grad.abs().sum() > 0
    assert model.supervised_head.linear.weight.grad is None


def test_pretrain_without_supervised_head_returns_none_logits():
    model = _small_model(num_classes=None)
    projection, logits = model(torch.rand(2, 3, 16, 16))
    assert projection.shape == (2, 16) and logits is None
    with pytest.raises(ValueError, match="supervised head"):
        model.mode = "finetune"
    with pytest.raises(ValueError, match="mode"):
        _small_model().mode = "linear_eval"


@pytest.mark.parametrize("selector", [0, 1, 2])
def test_finetune_mode_uses_encoder_and_first_k_head_layers(selector):
    model = _small_model(ft_proj_selector=selector)
    _randomise_bn(model)
    model.eval()
    x = torch.rand(3, 3, 16, 16)
    with torch.no_grad():
        _, pretrain_logits = model(x)
        hidden = model.projection_head.hiddens(model.embed(x))[selector]
    model.mode = "finetune"
    with torch.no_grad():
        none, logits = model(x)
        torch.testing.assert_close(logits, pretrain_logits)
        torch.testing.assert_close(model.finetune_features(x), hidden)
    assert none is None
    model.train()
    model(x)[1].sum().backward()
    assert model.encoder.stem.conv1.weight.grad.abs().sum() > 0
    for j, layer in enumerate(model.projection_head.layers):
        assert (layer.linear.weight.grad is not None) == (j < selector), j


def test_model_rejects_mismatched_head():
    with pytest.raises(ValueError, match="projection head expects"):
        SimCLRv2Model(build_resnet(18, 0.125), ProjectionHead(100))


def test_build_errors_are_clear():
    with pytest.raises(ValueError, match=r"18, 34, 50, 101, 152, 200"):
        build_resnet(42)
    with pytest.raises(ValueError, match="width_multiplier"):
        build_resnet(18, 0.01)
    with pytest.raises(ValueError, match="sk_ratio"):
        build_resnet(18, 1.0, sk_ratio=-0.1)


# ---------------------------------------------------------------- memory format / autocast


def test_channels_last_and_bf16_autocast():
    model = _small_model(resnet_depth=50, width_multiplier=0.125, sk_ratio=0.0625, cifar_stem=False, ft_proj_selector=0)
    _randomise_bn(model)
    model.eval()
    x = torch.rand(2, 3, 48, 48)
    with torch.no_grad():
        reference = model(x)
        cl_model = model.to(memory_format=torch.channels_last)
        got = cl_model(x.to(memory_format=torch.channels_last))
        inter = cl_model.encoder.forward_intermediates(x.to(memory_format=torch.channels_last))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = cl_model(x.to(memory_format=torch.channels_last))
    assert inter["block_group2"].is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got[0], reference[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got[1], reference[1], atol=1e-5, rtol=1e-4)
    assert low[0].dtype == torch.bfloat16
    scale = reference[0].abs().max()
    assert torch.isfinite(low[0].float()).all()
    assert (low[0].float() - reference[0]).abs().max() < 0.1 * scale
