"""The batched RandAugment against torchvision's per-image RandAugment operations on the same parameters."""

from __future__ import annotations

import pytest
import torch
from torchvision.transforms import InterpolationMode, RandAugment
from torchvision.transforms.autoaugment import _apply_op

from ssl_cli.data.batch_augment import step_generator
from ssl_cli.data.randaugment import GEOMETRIC, OPS, BatchRandAugment, magnitudes


def images(height: int = 20, width: int = 24, count: int = 28, seed: int = 0) -> torch.Tensor:
    """uint8 (count, 3, H, W): half uniform noise (every nearest-neighbour rounding shows), half smooth
    gradients with a narrow range (AutoContrast and Equalize have something to stretch)."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randint(0, 256, (count // 2, 3, height, width), generator=generator, dtype=torch.uint8)
    ramp = torch.linspace(60, 140, width).view(1, 1, 1, width) + torch.linspace(0, 40, height).view(1, 1, height, 1)
    tint = torch.randint(0, 60, (count - count // 2, 3, 1, 1), generator=generator)
    smooth = (ramp + tint).clamp(0, 255).to(torch.uint8)
    return torch.cat([noise, smooth])


def torchvision_op(image: torch.Tensor, op: str, bin_: int, negative: bool) -> torch.Tensor:
    """torchvision's RandAugment applying `op` at magnitude bin `bin_` (negated when `negative`) to one image."""
    magnitudes_, signed = RandAugment()._augmentation_space(31, tuple(image.shape[-2:]))[op]
    magnitude = float(magnitudes_[bin_].item()) if magnitudes_.ndim > 0 else 0.0
    if signed and negative:
        magnitude = -magnitude
    return _apply_op(image, op, magnitude, interpolation=InterpolationMode.NEAREST, fill=None)


def test_magnitude_bins_are_torchvisions():
    space = RandAugment()._augmentation_space(31, (20, 24))
    table = magnitudes(31, 20, 24)
    assert set(space) == set(OPS)
    for op, (values, _) in space.items():
        assert table[op] == ([float(v) for v in values.tolist()] if values.ndim > 0 else []), op


@pytest.mark.parametrize("bin_", [0, 5, 9, 30])
def test_every_op_in_one_mixed_batch_equals_torchvisions_per_image_op(bin_):
    # Both sides compute the same float32 expressions (blends truncated, warps and blurs rounded, the
    # warp matrix in double as torchvision does), so they agree exactly; a tolerance of 1 grey level
    # on colour ops would allow for a float32 sum order that differs between a batch and one image.
    batch = images()
    ops = torch.arange(len(OPS)).repeat(2)  # every op twice, positive then negative, in one batch
    negative = torch.arange(2 * len(OPS)) >= len(OPS)
    out = BatchRandAugment(1, bin_).round(batch, ops, negative)
    for i in range(len(batch)):
        want = torchvision_op(batch[i], OPS[int(ops[i])], bin_, bool(negative[i]))
        assert torch.equal(out[i], want), (OPS[int(ops[i])], bool(negative[i]), (out[i].int() - want.int()).abs().max())


def test_equalize_and_autocontrast_leave_a_constant_image_alone():
    flat = torch.full((2, 3, 8, 8), 77, dtype=torch.uint8)
    out = BatchRandAugment(1, 9).round(flat, torch.tensor([OPS.index("Equalize"), OPS.index("AutoContrast")]),
                                       torch.zeros(2, dtype=torch.bool))
    assert torch.equal(out, flat)
    for i, op in enumerate(("Equalize", "AutoContrast")):
        assert torch.equal(out[i], torchvision_op(flat[i], op, 9, False))


def test_two_ops_per_image_compose_like_torchvision_in_sequence():
    batch = images(count=16, seed=3)
    augment = BatchRandAugment(2, 9)
    generator = step_generator(0, 0, 0, torch.device("cpu"))
    ops = torch.randint(len(OPS), (2, len(batch)), generator=generator)
    negative = torch.randint(2, (2, len(batch)), generator=generator).bool()
    out = augment(batch, step_generator(0, 0, 0, torch.device("cpu")))
    for i in range(len(batch)):
        want = batch[i]
        for r in range(2):
            want = torchvision_op(want, OPS[int(ops[r, i])], 9, bool(negative[r, i]))
        assert torch.equal(out[i], want)


def test_each_image_draws_its_own_ops():
    batch = images(16, 16, count=64, seed=1)
    out = BatchRandAugment(1, 9)(batch, step_generator(0, 0, 0, torch.device("cpu")))
    ops = torch.randint(len(OPS), (1, 64), generator=step_generator(0, 0, 0, torch.device("cpu")))[0]
    assert len(ops.unique()) >= 10  # 64 draws over 14 ops
    # the same image repeated gets different noise in different slots
    same = batch[:1].expand(64, -1, -1, -1).contiguous()
    noised = BatchRandAugment(2, 9)(same, step_generator(0, 0, 1, torch.device("cpu")))
    assert len({bytes(image.flatten().tolist()) for image in noised}) > 32
    assert not torch.equal(out, batch)


def test_same_step_same_noise_another_step_other_noise():
    batch = images(count=32, seed=2)
    augment = BatchRandAugment(2, 9)
    first = augment(batch, step_generator(4, 1, 7, torch.device("cpu")))
    again = augment(batch.clone(), step_generator(4, 1, 7, torch.device("cpu")))
    other = augment(batch, step_generator(4, 1, 8, torch.device("cpu")))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_zero_ops_is_the_identity_and_bad_settings_are_refused():
    batch = images(count=4)
    assert BatchRandAugment(0, 9)(batch, step_generator(0, 0, 0, torch.device("cpu"))) is batch
    with pytest.raises(ValueError, match="magnitude"):
        BatchRandAugment(2, 31)
    with pytest.raises(ValueError, match="uint8"):
        BatchRandAugment(2, 9)(batch.float(), step_generator(0, 0, 0, torch.device("cpu")))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_every_op_matches_torchvision_within_a_grey_level():
    # On the GPU the blur's convolution and the contrast mean may sum in another order than on a CPU,
    # which can move a value across a rounding boundary (1 grey level), and a warp's float32 grid may put
    # a sample on the other side of a pixel edge (another pixel): either on at most 1% of the pixels.
    batch = images()
    ops = torch.arange(len(OPS)).repeat(2)
    negative = torch.arange(2 * len(OPS)) >= len(OPS)
    out = BatchRandAugment(1, 9).round(batch.cuda(), ops.cuda(), negative.cuda()).cpu()
    for i in range(len(batch)):
        difference = (out[i].int() - torchvision_op(batch[i], OPS[int(ops[i])], 9, bool(negative[i])).int()).abs()
        op = OPS[int(ops[i])]
        assert (difference > 0).float().mean() <= 0.01 and (op in GEOMETRIC or difference.max() <= 1), op
    generator = step_generator(0, 0, 0, torch.device("cuda"))
    first = BatchRandAugment(2, 9)(batch.cuda(), generator)
    assert torch.equal(first, BatchRandAugment(2, 9)(batch.cuda(), step_generator(0, 0, 0, torch.device("cuda"))))
