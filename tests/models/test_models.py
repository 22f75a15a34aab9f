"""Models: forward shapes on 8x8 and 28x28, parameter counts against the architectures' formulas and the
papers' figures, BatchNorm where the architecture has it, initialization, name parsing and errors."""

import math

import pytest
import torch
from torch import nn

from samkit.models import MODELS, build_model

SMALL = [name for name in MODELS if name not in ("wrn-28-10", "pyramidnet-272-200")]  # 36.5 M, 26 M: counted, not run


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def wrn_params(depth, width, channels, classes, batch_norm=True):
    """Zagoruyko & Komodakis: 3 groups of (depth - 4) / 6 pre-activation blocks, widths 16, 16k, 32k, 64k."""
    n, widths, bn = (depth - 4) // 6, [16, 16 * width, 32 * width, 64 * width], 2 if batch_norm else 0
    total = channels * 16 * 9
    for group in range(3):
        for block in range(n):
            w_in, w_out = (widths[group] if block == 0 else widths[group + 1]), widths[group + 1]
            total += bn * w_in + w_in * w_out * 9 + bn * w_out + w_out * w_out * 9
            if w_in != w_out or (group > 0 and block == 0):
                total += w_in * w_out  # 1x1 projection shortcut
    return total + bn * widths[3] + widths[3] * classes + classes


def resnet_params(depth, channels, classes):
    """He et al. CIFAR ResNet: 16-32-64 channels, (depth - 2) / 6 blocks each, parameter-free shortcuts."""
    n, total, w_in = (depth - 2) // 6, channels * 16 * 9 + 2 * 16, 16
    for w_out in (16, 32, 64):
        for _ in range(n):
            total += w_in * w_out * 9 + 2 * w_out + w_out * w_out * 9 + 2 * w_out
            w_in = w_out
    return total + 64 * classes + classes


@pytest.mark.parametrize("name", SMALL)
@pytest.mark.parametrize("size, classes", [(8, 10), (28, 7)])
def test_forward_shape_on_digits_and_fashion_sizes(name, size, classes):
    torch.manual_seed(0)
    model = build_model(name, in_channels=1, num_classes=classes, image_size=size)
    out = model(torch.randn(2, 1, size, size))
    assert out.shape == (2, classes) and bool(torch.isfinite(out).all())


def test_three_channel_float64_forward_and_backward():
    torch.manual_seed(0)
    for name in ("cnn-bn", "resnet20", "wrn-16-4-nobn"):
        model = build_model(name, in_channels=3, num_classes=5, image_size=12).double()
        model(torch.randn(3, 3, 12, 12, dtype=torch.float64)).square().sum().backward()
        assert all(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in model.parameters()), name


def test_wrn_28_10_has_the_papers_36_5_million_parameters():
    model = build_model("wrn-28-10", in_channels=3, num_classes=10, image_size=32)
    assert n_params(model) == wrn_params(28, 10, 3, 10)
    assert round(n_params(model) / 1e6, 1) == 36.5  # Zagoruyko & Komodakis, Table 2 (CIFAR-10)


@pytest.mark.parametrize("name, depth, width", [("wrn-16-4", 16, 4), ("wrn-16-8", 16, 8), ("wrn-28-2", 28, 2),
                                                ("wrn-10-1", 10, 1), ("wrn-40-2", 40, 2)])
def test_wrn_parameter_counts_follow_the_architecture(name, depth, width):
    model = build_model(name, in_channels=1, num_classes=10, image_size=28)
    assert n_params(model) == wrn_params(depth, width, 1, 10)
    no_bn = build_model(name + "-nobn", in_channels=1, num_classes=10, image_size=28)
    assert n_params(no_bn) == wrn_params(depth, width, 1, 10, batch_norm=False)


@pytest.mark.parametrize("depth, paper_millions", [(20, 0.27), (32, 0.46), (56, 0.85), (14, None)])
def test_resnet_parameter_counts_and_depth(depth, paper_millions):
    model = build_model(f"resnet{depth}", in_channels=3, num_classes=10, image_size=32)
    assert n_params(model) == resnet_params(depth, 3, 10)
    if paper_millions is not None:
        assert round(n_params(model) / 1e6, 2) == paper_millions  # He et al. 2016, Table 6
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(convs) + len(linears) == depth  # weighted layers; option-A shortcuts have none
    assert all(c.kernel_size == (3, 3) for c in convs)


@pytest.mark.parametrize(
    "name, has_bn",
    [("mlp", False), ("mlp-bn", True), ("cnn", False), ("cnn-bn", True), ("wrn-16-4", True), ("wrn-16-4-nobn", False),
     ("resnet20", True)],
)
def test_batchnorm_only_where_the_architecture_has_it(name, has_bn):
    model = build_model(name, in_channels=1, num_classes=10, image_size=8)
    found = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert found == has_bn
    if not has_bn:
        assert all(not isinstance(m, nn.modules.batchnorm._NormBase) for m in model.modules())


def test_mlp_bn_is_the_mlp_with_batchnorm_after_each_hidden_linear():
    plain = build_model("mlp", in_channels=1, num_classes=10, image_size=8)
    bn = build_model("mlp-bn", in_channels=1, num_classes=10, image_size=8)
    kinds = [type(m).__name__ for m in bn.net]
    assert kinds == ["Flatten", "Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d", "ReLU", "Linear"]
    plain_shapes = [p.shape for n, p in plain.named_parameters() if n.endswith("weight")]
    bn_linear_shapes = [m.weight.shape for m in bn.net if isinstance(m, nn.Linear)]
    assert bn_linear_shapes == plain_shapes
    # a bias before BatchNorm is redundant (BN subtracts the mean): only the last Linear keeps one
    assert [m.bias is not None for m in bn.net if isinstance(m, nn.Linear)] == [False, False, True]


def test_cnn_and_cnn_bn_differ_only_by_batchnorm():
    plain = build_model("cnn", in_channels=1, num_classes=10, image_size=8)
    with_bn = build_model("cnn-bn", in_channels=1, num_classes=10, image_size=8)
    convs = lambda m: [(c.in_channels, c.out_channels, c.kernel_size) for c in m.modules() if isinstance(c, nn.Conv2d)]  # noqa: E731
    assert convs(plain) == convs(with_bn)
    assert all(c.bias is not None for c in plain.modules() if isinstance(c, nn.Conv2d))
    assert all(c.bias is None for c in with_bn.modules() if isinstance(c, nn.Conv2d))  # BN's shift replaces it


def test_initialization_kaiming_fan_out_and_zero_biases():
    torch.manual_seed(0)
    model = build_model("wrn-16-4", in_channels=1, num_classes=10, image_size=8)
    conv = model.blocks[-1].conv2  # 256 x 256 x 3 x 3 = 589824 weights
    expected = math.sqrt(2.0 / (9 * conv.out_channels))
    assert abs(conv.weight.std().item() / expected - 1) < 0.01  # sample std of 590k normals: within ~0.1 %
    assert abs(conv.weight.mean().item()) < 0.01 * expected
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert bool((m.weight == 1).all()) and bool((m.bias == 0).all())
        if isinstance(m, nn.Linear):
            assert bool((m.bias == 0).all())


def test_same_seed_same_weights():
    def weights(seed):
        torch.manual_seed(seed)
        return torch.cat([p.flatten() for p in build_model("resnet20", in_channels=1, num_classes=10,
                                                            image_size=8).parameters()])

    assert torch.equal(weights(3), weights(3)) and not torch.equal(weights(3), weights(4))


def test_mlp_input_follows_the_dataset():
    model = build_model("mlp", in_channels=3, num_classes=4, image_size=5)
    assert model.net[1].in_features == 75
    assert model(torch.randn(2, 3, 5, 5)).shape == (2, 4)


@pytest.mark.parametrize(
    "name, options, message",
    [
        ("vgg16", {}, r"unknown model 'vgg16'; choose one of \('mlp'"),
        ("wrn-15-4", {}, r"WRN depth must be 6n \+ 4 .* got 15"),
        ("wrn-4-4", {}, "got 4"),
        ("wrn-16-0", {}, "widen_factor must be >= 1, got 0"),
        ("resnet21", {}, r"ResNet depth must be 6n \+ 2 .* got 21"),
        ("wrn-16", {}, "unknown model 'wrn-16'"),
        ("cnn", {"in_channels": 0}, "in_channels must be a positive int, got 0"),
        ("cnn", {"num_classes": 2.0}, "num_classes must be a positive int, got 2.0"),
        ("cnn", {"image_size": 1}, "image_size must be >= 2, got 1"),
    ],
)
def test_bad_names_and_shapes(name, options, message):
    shape = {"in_channels": 1, "num_classes": 10, "image_size": 8, **options}
    with pytest.raises(ValueError, match=message):
        build_model(name, **shape)


def pyramid_params(depth, alpha, channels, classes, widen=round):
    """Han et al. bottleneck PyramidNet: N = 3 (depth - 2) / 9 blocks, block k 16 + alpha k / N wide inside and
    4x that at its output, BN-conv1x1-BN-ReLU-conv3x3-BN-ReLU-conv1x1-BN, parameter-free shortcuts."""
    blocks = 3 * ((depth - 2) // 9)
    total, w_in = channels * 16 * 9 + 2 * 16, 16
    for k in range(1, blocks + 1):
        d = int(widen(16 + alpha * k / blocks))
        total += 2 * w_in + w_in * d + 2 * d + 9 * d * d + 2 * d + d * 4 * d + 2 * 4 * d
        w_in = 4 * d
    return total + 2 * w_in + w_in * classes + classes


def test_pyramidnet_272_200_has_the_papers_26_million_parameters():
    model = build_model("pyramidnet-272-200", in_channels=3, num_classes=10, image_size=32)
    assert n_params(model) == pyramid_params(272, 200, 3, 10)
    # Han et al. 2017, Table 4: 26.0 M with truncated widths; rounding them (as the SAM authors' code does)
    # adds ~0.2 M
    assert round(pyramid_params(272, 200, 3, 10, widen=math.floor) / 1e6, 1) == 26.0
    assert round(n_params(model) / 1e6, 1) == 26.2


@pytest.mark.parametrize("depth, alpha", [(11, 24), (20, 48), (29, 0)])
def test_pyramidnet_structure_small_sizes(depth, alpha):
    torch.manual_seed(0)
    model = build_model(f"pyramidnet-{depth}-{alpha}", in_channels=1, num_classes=7, image_size=28)
    assert n_params(model) == pyramid_params(depth, alpha, 1, 7)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == depth - 1  # 3 per block + the stem: every layer but the classifier
    assert [c.stride[0] for c in convs if c.kernel_size == (3, 3)].count(2) == 2  # groups 2 and 3 downsample
    for size in (8, 28):
        out = model(torch.randn(2, 1, size, size))
        assert out.shape == (2, 7) and bool(torch.isfinite(out).all())


def test_pyramidnet_name_errors():
    with pytest.raises(ValueError, match=r"depth must be 9n \+ 2 .*got 12"):
        build_model("pyramidnet-12-48", in_channels=1, num_classes=2, image_size=8)
    with pytest.raises(ValueError, match=r"unknown model 'pyramidnet-x'.*pyramidnet-D-A \(D = 9n \+ 2\)"):
        build_model("pyramidnet-x", in_channels=1, num_classes=2, image_size=8)
