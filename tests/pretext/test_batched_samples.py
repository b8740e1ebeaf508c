"""The handcrafted samples cut on the batch (`batch_transform`) against their per-image definitions
(`build_sample`, replayed with the same random choices), their targets, and their determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ssl_cli.data.batch_augment import step_generator
from ssl_cli.data.colour import rgb_to_lab
from ssl_cli.data.resized import to_uint8
from ssl_cli.data.toy import draw_toy_image
from ssl_cli.pretext.base import TaskBatch
from ssl_cli.pretext.contrastive.pirl import PIRLTask
from ssl_cli.pretext.crops import square_crop
from ssl_cli.pretext.handcrafted.colorization import AB_RANGE, ColorizationTask
from ssl_cli.pretext.handcrafted.context import ContextTask
from ssl_cli.pretext.handcrafted.inpainting import InpaintingTask
from ssl_cli.pretext.handcrafted.jigsaw import JigsawTask, batch_tiles, cut_tiles, shuffle_tiles
from ssl_cli.pretext.handcrafted.jigsawpp import JigsawPlusPlusTask
from ssl_cli.pretext.handcrafted.rotation import RotationTask
from ssl_cli.pretext.on_batch import pil_grey

CPU = torch.device("cpu")


class Replay:
    """A stand-in for np.random.Generator that hands out given values in order, so `build_sample` makes
    the sample of the random choices the batched path drew."""

    def __init__(self, *values):
        self.values = list(values)

    def _next(self):
        return self.values.pop(0)

    def random(self):
        return self._next()

    def integers(self, *args, size=None, **kwargs):
        return self._next()

    def choice(self, *args, **kwargs):
        return self._next()

    def standard_normal(self, *args, **kwargs):
        return self._next()


def noise_images(count: int, size: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)) for _ in range(count)]


def as_batch(images: list[Image.Image], size: int) -> torch.Tensor:
    """What the loader delivers: uint8 (B, 3, size, size)."""
    return torch.stack([to_uint8(image, size) for image in images])


def numpy(values: torch.Tensor) -> np.ndarray:
    return values.numpy().astype(np.int64)


def test_pil_grey_is_pil_luma_exactly():
    image = noise_images(1, 16)[0]
    want = torch.from_numpy(np.asarray(image.convert("L").convert("RGB")).copy()).permute(2, 0, 1)
    assert torch.equal(pil_grey(to_uint8(image, 16)), want)


@pytest.mark.parametrize("task", [
    JigsawTask(image_size=48, tile_size=15, permutations=20, grayscale_prob=0.5),
    JigsawPlusPlusTask(image_size=48, tile_size=15, permutations=20),
    JigsawPlusPlusTask(image_size=64, permutations=30, max_replaced=3, grayscale_prob=0.3),
], ids=["jigsaw", "jigsawpp", "jigsawpp-3-replaced"])
def test_puzzles_equal_the_per_image_puzzles_of_the_same_draws(task):
    # 40 px images: the loader's resize to R (step 1) runs in to_uint8 here and in random_crop per image
    images = noise_images(6, 40)
    batch = task.batch_sample(as_batch(images, task.base_size()), draws := task.draw(6, step_generator(3, 1, 2, CPU)))
    assert isinstance(batch, TaskBatch) and batch.inputs.shape == (6, 9, 3, task.tile_px, task.tile_px)
    assert batch.targets.dtype == torch.int64 and torch.equal(batch.targets, draws.labels)
    assert draws.grey.any() and not draws.grey.all() and (draws.replaced.any() or not task.max_replaced)
    for b, image in enumerate(images):
        top, left = numpy(draws.crop[b])
        grey_draw = task.grayscale_prob + (-0.5 if draws.grey[b] else 0.5)  # below the probability: grey
        values = [grey_draw, left, top, numpy(draws.offsets[b])]
        other = None
        if task.max_replaced:
            other = images[int(draws.other[b])]
            assert int(draws.other[b]) != b, "a replaced tile comes from another image of the batch"
            other_top, other_left = numpy(draws.other_crop[b])
            other_offsets = np.zeros((9, 2), dtype=np.int64)
            count = int(draws.replaced[b].sum())
            cells = numpy(draws.source_cells[b, :count])
            other_offsets[cells] = numpy(draws.other_offsets[b, :count])
            values += [other_left, other_top, other_offsets, int(draws.labels[b]), count,
                       numpy(draws.positions[b, :count]), cells]
        else:
            values += [int(draws.labels[b])]
        inputs, target = task.build_sample(image, Replay(*values), other)
        assert int(target) == int(batch.targets[b])
        assert torch.allclose(batch.inputs[b], inputs, atol=1e-4), f"sample {b}"


def test_jigsawpp_draws_replace_0_to_2_tiles_and_greys_70_percent():
    task = JigsawPlusPlusTask(image_size=48, tile_size=15, permutations=20)
    draws = task.draw(3000, step_generator(0, 0, 0, CPU))
    histogram = np.bincount(draws.replaced.sum(1).numpy(), minlength=3)
    assert len(histogram) == 3 and (abs(histogram / 3000 - 1 / 3) < 0.04).all(), histogram
    assert abs(draws.grey.float().mean().item() - 0.7) < 0.03
    assert (draws.other != torch.arange(3000)).all()
    first = draws.positions[draws.replaced[:, 1]]
    assert (first[:, 0] != first[:, 1]).all(), "two replaced tiles overwrite two positions"
    assert set(draws.labels.tolist()) == set(range(20))
    margin, room = task.base_size() - task.image_size, task.cell_size - task.tile_px
    assert draws.crop.min() == 0 and draws.crop.max() == margin
    assert draws.offsets.min() == 0 and draws.offsets.max() == room


def test_a_batch_of_one_takes_its_foreign_tiles_from_itself():
    task = JigsawPlusPlusTask(image_size=48, tile_size=15, permutations=20)
    batch = task.batch_transform()(as_batch(noise_images(1, 40), task.base_size()), step_generator(0, 0, 0, CPU))
    assert batch.inputs.shape == (1, 9, 3, 15, 15) and torch.isfinite(batch.inputs).all()


@pytest.mark.parametrize("options", [{}, {"color_drop": False}, {"gap": 3, "jitter": 2, "patch_size": 10}])
def test_context_pairs_equal_the_per_image_pairs_of_the_same_draws(options):
    task = ContextTask(image_size=48, **options)
    images = noise_images(5, 48)
    labels, shifts, kept, noise = task.draw(5, step_generator(1, 0, 4, CPU))
    batch = task.batch_sample(as_batch(images, 48), labels, shifts, kept, noise)
    p = task.patch_size
    assert batch.inputs.shape == (5, 2, 3, p, p) and torch.equal(batch.targets, labels)
    for b, image in enumerate(images):
        values = [0, 0, int(labels[b]), numpy(shifts[b].flatten())]
        if task.color_drop:
            for patch in range(2):
                values += [int(kept[b, patch]), noise[b, patch].numpy()]
        inputs, target, _ = task.build_sample_with_positions(image, Replay(*values))
        assert int(target) == int(labels[b])
        assert torch.allclose(batch.inputs[b], inputs, atol=1e-4), f"sample {b}"


@pytest.mark.parametrize("mask", ["center", "random-block"])
def test_inpainting_masks_equal_the_per_image_masks_of_the_same_draws(mask):
    task = InpaintingTask(image_size=32, mask=mask)
    images = noise_images(6, 32)
    squares = task.draw(6, step_generator(0, 2, 0, CPU))
    batch = task.batch_sample(as_batch(images, 32), squares)
    assert batch.inputs.shape == (6, 3, 32, 32) and batch.targets.shape == (6, 4, 32, 32)
    for b, image in enumerate(images):
        top, left, side = (int(v) for v in squares[b])
        assert 8 <= side <= 16 and 0 <= top <= 32 - side and 0 <= left <= 32 - side
        values = [0, 0] + ([] if mask == "center" else [side, np.array([top, left])])
        inputs, target = task.build_sample(image, Replay(*values))
        assert torch.allclose(batch.inputs[b], inputs, atol=1e-5) and torch.allclose(batch.targets[b], target, atol=1e-5)
        assert int(target[3].sum()) == side * side


def test_random_blocks_cover_every_side_and_position():
    squares = InpaintingTask(image_size=32, mask="random-block").draw(4000, step_generator(0, 0, 0, CPU))
    assert set(squares[:, 2].tolist()) == set(range(8, 17))
    assert squares[:, 0].min() == 0 and (squares[:, 0] + squares[:, 2]).max() == 32


def test_rotation_by_k_is_torch_rot90_and_the_per_image_sample():
    task = RotationTask(image_size=16)
    images = noise_images(8, 16)
    ks = torch.tensor([0, 1, 2, 3, 3, 2, 1, 0])
    batch = task.batch_sample(as_batch(images, 16), ks)
    assert torch.equal(batch.targets, ks)
    for b, image in enumerate(images):
        inputs, target = task.build_sample(image, Replay(0, 0, int(ks[b])))
        assert int(target) == int(ks[b]) and torch.allclose(batch.inputs[b], inputs, atol=1e-6)
    upright = task.batch_sample(as_batch(images, 16), torch.zeros(8, dtype=torch.int64)).inputs
    for b in range(8):
        assert torch.equal(batch.inputs[b], torch.rot90(upright[b], int(ks[b]), dims=(-2, -1)))


@pytest.mark.parametrize("options, size", [({}, 32), ({"bins": 8, "output_stride": 2}, 40),
                                           ({"output_stride": 1}, 16)])
def test_colorization_samples_equal_the_per_image_samples(options, size):
    task = ColorizationTask(image_size=size, **options)
    # 40 px noise (resized to the task's size by the loader here and by square_crop per image), a toy
    # image (smooth colour on a grey background) and a grey square
    toy, grey = Image.fromarray(draw_toy_image(1, 1, 4, 40, 0)), Image.new("RGB", (40, 40), (90, 90, 90))
    images = noise_images(5, 40) + [toy, grey]
    batch = task.batch_sample(as_batch(images, size))
    t = task.target_size()
    assert batch.inputs.shape == (7, 3, size, size) and batch.inputs.dtype == torch.float32
    assert batch.targets.shape == (7, t, t) and batch.targets.dtype == torch.int64
    width = 2 * AB_RANGE / task.bins
    for b, image in enumerate(images):
        inputs, target = task.build_sample(image, Replay(0, 0))  # square_crop of a square: offsets 0, 0
        assert torch.allclose(batch.inputs[b], inputs, atol=1e-6), f"sample {b}"
        # The same classes, except where a block's mean ab sits on a bin edge to rounding: grey (a = b = 0
        # up to noise of 1e-14 either side of the edge at 0), where either neighbouring class is as right.
        lab = rgb_to_lab(np.asarray(square_crop(image, size, Replay(0, 0), True)))
        ab = lab[..., 1:].reshape(t, task.output_stride, t, task.output_stride, 2).mean(axis=(1, 3))
        position = (ab + AB_RANGE) / width
        on_edge = torch.from_numpy((np.abs(position - np.round(position)) < 1e-9).any(axis=-1))
        assert b >= 5 or not on_edge.any(), "noise blocks never sit on an edge"
        assert torch.equal(batch.targets[b][~on_edge], target[~on_edge]), f"sample {b}"
        cells = [torch.stack([classes // task.bins, classes % task.bins]) for classes in (batch.targets[b], target)]
        assert (cells[0] - cells[1]).abs().max() <= 1  # on an edge: a neighbouring cell
    grey = batch.targets[-1].unique().tolist()
    centre = task.bins // 2
    assert set(grey) <= {a * task.bins + c for a in (centre - 1, centre) for c in (centre - 1, centre)}


def test_colorization_batch_is_the_same_for_every_step():
    """No draw is random on a square: the sample is a pure function of the images, whatever the generator."""
    task = ColorizationTask(image_size=32)
    images = as_batch(noise_images(8, 32), 32)
    first = task.batch_transform()(images, step_generator(5, 1, 3, CPU))
    for generator in (step_generator(5, 1, 3, CPU), step_generator(5, 2, 4, CPU), step_generator(6, 0, 0, CPU)):
        again = ColorizationTask(image_size=32).batch_transform()(images, generator)
        assert isinstance(again, TaskBatch)
        assert torch.equal(first.inputs, again.inputs) and torch.equal(first.targets, again.targets)


def test_pirl_tiles_equal_cut_tiles_of_the_same_draws():
    """`batch_tiles` draws the crop, then the offsets: replayed here from a generator of the same seed."""
    size, tile, base = 48, 15, 55
    images = noise_images(4, 40)
    order = torch.stack([torch.randperm(9, generator=torch.Generator().manual_seed(b)) for b in range(4)])
    tiles = batch_tiles(as_batch(images, base), size, 3, tile, torch.Generator().manual_seed(7), order)
    replay = torch.Generator().manual_seed(7)
    crop = torch.randint(base - size + 1, (4, 1, 2), generator=replay)
    offsets = torch.randint(16 - tile + 1, (4, 9, 2), generator=replay)
    for b, image in enumerate(images):
        top, left = numpy(crop[b, 0])
        want = shuffle_tiles(cut_tiles(image, size, 3, tile, Replay(left, top, numpy(offsets[b]))), order[b])
        assert torch.allclose(tiles[b], want, atol=1e-5)


TASKS = {
    "jigsaw": (lambda: JigsawTask(image_size=48, tile_size=15, permutations=20), 55),
    "jigsawpp": (lambda: JigsawPlusPlusTask(image_size=48, tile_size=15, permutations=20), 55),
    "context": (lambda: ContextTask(image_size=32), 32),
    "inpainting": (lambda: InpaintingTask(image_size=32, mask="random-block"), 32),
    "rotation": (lambda: RotationTask(image_size=32), 32),
}


@pytest.mark.parametrize("name", list(TASKS))
def test_the_batch_is_a_pure_function_of_seed_epoch_and_step(name):
    make, size = TASKS[name]
    task = make()
    images = as_batch(noise_images(16, size), size)
    transform = task.batch_transform()
    first = transform(images, step_generator(5, 1, 3, CPU))
    again = make().batch_transform()(images, step_generator(5, 1, 3, CPU))
    assert torch.equal(first.inputs, again.inputs) and torch.equal(first.targets, again.targets)
    for other in (step_generator(5, 1, 4, CPU), step_generator(5, 2, 3, CPU), step_generator(6, 1, 3, CPU)):
        assert not torch.equal(transform(images, other).inputs, first.inputs)


def test_pirl_batch_transform_is_deterministic_and_shaped():
    task = PIRLTask(image_size=32, views="grey")
    images = as_batch(noise_images(8, 32), 32)
    view, tiles = task.batch_transform()(images, step_generator(0, 0, 1, CPU))
    again = task.batch_transform()(images, step_generator(0, 0, 1, CPU))
    assert view.shape == (8, 3, 32, 32) and tiles.shape == (8, 9, 3, task.tile_px, task.tile_px)
    assert torch.equal(view, again[0]) and torch.equal(tiles, again[1])


JIGSAWPP = ["pretext", "--task", "jigsawpp", "--arch", "alexnet_lowres", "--width", "0.25", "--image-size", "48",
            "--task-option", "tile_size=15", "--task-option", "permutations=20", "--batch-size", "16", "--lr", "0.005",
            "--workers", "0", "--device", "cpu", "--no-progress", "--deterministic", "--seed", "0"]


def test_killed_jigsawpp_run_resumes_to_the_same_weights(toy_dir, tmp_path, killed_then_resumed):
    out = tmp_path / "jigsawpp.pt"
    reference = killed_then_resumed([*JIGSAWPP, "--data", str(toy_dir), "--epochs", "4"], out, epochs=4, timeout=240)
    want, got = torch.load(reference, weights_only=True), torch.load(out, weights_only=True)
    assert got["meta"]["task"] == "jigsawpp" and got["meta"]["per_image_normalise"]
    for part in ("model", "head"):
        assert all(torch.equal(want[part][key], got[part][key]) for key in want[part]), part
