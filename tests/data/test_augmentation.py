"""augment: identity, shapes, determinism, crops/flips against a brute-force numpy reference, cutout."""

import numpy as np
import pytest
import torch

from samkit.data import AUGMENTATIONS, augment
from samkit.data.augmentation import default_cutout_size, default_padding

MEAN, STD = (0.3,), (0.4,)
BLACK = (0.0 - MEAN[0]) / STD[0]  # pixel 0 on the normalized scale


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def images(n, size, seed=0, channels=1):
    return torch.randn(n, channels, size, size, generator=gen(seed), dtype=torch.float64)


def candidates(image, padding, pad_value):
    """Every crop (and its mirror) of the padded image: the numpy reference of basic augmentation."""
    c, h, w = image.shape
    padded = np.pad(image, ((0, 0), (padding, padding), (padding, padding)), constant_values=pad_value)
    for top in range(2 * padding + 1):
        for left in range(2 * padding + 1):
            crop = padded[:, top : top + h, left : left + w]
            yield (top, left, False), crop
            yield (top, left, True), crop[:, :, ::-1]


def test_names_and_default_sizes():
    assert AUGMENTATIONS == ("none", "basic", "cutout")
    assert [default_padding(s) for s in (8, 16, 28, 32)] == [1, 2, 4, 4]
    assert [default_cutout_size(s) for s in (8, 28, 32)] == [4, 14, 16]


def test_none_is_identity():
    x = images(3, 8)
    assert augment(x, "none", generator=gen()) is x


@pytest.mark.parametrize("kind", ["basic", "cutout"])
@pytest.mark.parametrize("size, dtype", [(8, torch.float64), (28, torch.float32)])
def test_shape_dtype_kept_and_input_untouched(kind, size, dtype):
    x = images(4, size, channels=3).to(dtype)
    before = x.clone()
    out = augment(x, kind, generator=gen(), mean=(0.1, 0.2, 0.3), std=(0.5, 0.5, 0.5))
    assert out.shape == x.shape and out.dtype == dtype
    assert torch.equal(x, before)


@pytest.mark.parametrize("kind", ["basic", "cutout"])
def test_same_generator_state_same_batch(kind):
    x = images(16, 8)
    a = augment(x, kind, generator=gen(7))
    assert torch.equal(a, augment(x, kind, generator=gen(7)))
    assert not torch.equal(a, augment(x, kind, generator=gen(8)))


@pytest.mark.parametrize("size, with_stats", [(8, True), (8, False), (12, True)])
def test_basic_is_a_padded_crop_with_optional_flip(size, with_stats):
    x = images(48, size, seed=1)
    stats = {"mean": MEAN, "std": STD} if with_stats else {}
    out = augment(x, "basic", generator=gen(2), **stats).numpy()
    padding = default_padding(size)
    seen = set()
    for image, result in zip(x.numpy(), out):
        matches = [key for key, crop in candidates(image, padding, BLACK if with_stats else 0.0)
                   if np.array_equal(crop, result)]
        assert len(matches) == 1  # exact: values are only moved, never recomputed
        seen.add(matches[0])
    tops = {key[0] for key in seen}
    flips = {key[2] for key in seen}
    assert tops == set(range(2 * padding + 1)) and flips == {False, True}  # 48 draws cover every offset


def test_explicit_padding_zero_only_flips():
    x = images(32, 8)
    out = augment(x, "basic", generator=gen(), padding=0)
    for image, result in zip(x, out):
        assert torch.equal(result, image) or torch.equal(result, image.flip(-1))


def test_cutout_is_basic_plus_a_zeroed_square():
    size, n = 8, 64
    s = default_cutout_size(size)
    x = images(n, size, seed=3)
    basic = augment(x, "basic", generator=gen(4), mean=MEAN, std=STD)
    cut = augment(x, "cutout", generator=gen(4), mean=MEAN, std=STD)
    changed = cut != basic
    assert torch.equal(cut[~changed], basic[~changed])
    assert bool((cut[changed] == 0).all())  # normalized 0: the training mean
    full_squares = 0
    for mask in changed[:, 0]:
        rows, cols = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
        assert 1 <= len(rows) <= s and 1 <= len(cols) <= s
        assert len(rows) == rows[-1] - rows[0] + 1 and len(cols) == cols[-1] - cols[0] + 1  # contiguous
        assert int(mask.sum()) == len(rows) * len(cols)  # a rectangle, clipped at the border
        if len(rows) < s:
            assert rows[0] == 0 or rows[-1] == size - 1
        full_squares += len(rows) == s and len(cols) == s
    # centre uniform over 8 rows/cols, a full square needs both in 2..6: probability (5/8)^2 ~ 0.39
    assert 10 <= full_squares <= 45


def test_cutout_size_override_and_zero():
    x = images(8, 8, seed=5)
    basic = augment(x, "basic", generator=gen(6), mean=MEAN, std=STD)
    assert torch.equal(augment(x, "cutout", generator=gen(6), mean=MEAN, std=STD, cutout_size=0), basic)
    whole = augment(x, "cutout", generator=gen(6), mean=MEAN, std=STD, cutout_size=16)
    assert bool((whole == 0).all())  # a 16 px square centred anywhere on an 8 px image covers it


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda: augment(images(2, 8), "mixup", generator=gen()), ValueError, "unknown augmentation 'mixup'"),
        (lambda: augment(images(2, 8), "basic", generator=0), TypeError, "generator must be a torch.Generator"),
        (lambda: augment(images(2, 8)[0], "basic", generator=gen()), ValueError, r"shape \(1, 8, 8\)"),
        (lambda: augment(torch.zeros(2, 1, 8, 8, dtype=torch.uint8), "basic", generator=gen()), ValueError,
         "floating-point"),
        (lambda: augment(images(2, 8), "basic", generator=gen(), mean=MEAN), ValueError, "both mean and std"),
        (lambda: augment(images(2, 8), "basic", generator=gen(), mean=MEAN, std=(0.0,)), ValueError,
         "std must be > 0"),
        (lambda: augment(images(2, 8), "basic", generator=gen(), padding=-1), ValueError, "padding must be"),
    ],
)
def test_bad_arguments(call, error, message):
    with pytest.raises(error, match=message):
        call()
