"""Jigsaw and Jigsaw++: tiles, permutations, replacement, grey-scale, options, head and training."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import functional as TF

from ssl_cli.data.toy import draw_toy_image
from ssl_cli.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from ssl_cli.errors import UserError
from ssl_cli.models.registry import build_model
from ssl_cli.pretext.base import PretextNetwork, per_image_normalise
from ssl_cli.pretext.handcrafted.jigsaw import JigsawTask, random_crop, unshuffle
from ssl_cli.pretext.handcrafted.jigsawpp import JigsawPlusPlusTask
from ssl_cli.pretext.handcrafted.permutations import min_pairwise_hamming, save_permutations, select_permutations
from ssl_cli.pretext.registry import task_class


@pytest.fixture(scope="module")
def noise_image() -> Image.Image:
    """Colourful noise, not square: no tile is constant and no tile is grey."""
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, size=(70, 90, 3), dtype=np.uint8))


def small_task(**options) -> JigsawTask:
    return JigsawTask(**({"image_size": 48, "permutations": 10} | options))


def reference_tiles(task: JigsawTask, image: Image.Image, seed: int) -> torch.Tensor:
    """The tiles in cell order, cut independently of `cut_tiles` with torchvision's conversions,
    replaying the rng in `build_sample`'s order: grey draw, crop, tile positions."""
    rng = np.random.default_rng(seed)
    rng.random()
    pixels = TF.normalize(TF.to_tensor(random_crop(image, task.image_size, rng)), IMAGENET_MEAN, IMAGENET_STD)
    t = task.tile_size()
    return torch.stack([per_image_normalise(pixels[:, top:top + t, left:left + t])
                        for top, left in task.tile_positions(rng)])


def test_unshuffle_undoes_the_permutation(noise_image):
    task = small_task(image_size=64)
    for seed in range(6):
        inputs, target = task.build_sample(noise_image, np.random.default_rng(seed))
        tiles = reference_tiles(task, noise_image, seed)
        perm = task.permutations[int(target)]
        assert inputs.shape == (9, 3, 17, 17) and inputs.dtype == torch.float32
        assert torch.allclose(unshuffle(inputs, perm), tiles, atol=1e-5)
        for position in range(9):  # position i holds the tile of cell perm[i]
            assert torch.allclose(inputs[position], tiles[perm[position]], atol=1e-5)
        if not np.array_equal(perm, np.arange(9)):
            assert not torch.allclose(inputs, tiles, atol=1e-5)


def test_paper_geometry_at_the_default_size(noise_image):
    task = JigsawTask()
    assert (task.image_size, task.cell_size, task.tile_size(), len(task.permutations)) == (225, 75, 64, 1000)
    assert random_crop(noise_image, 225, np.random.default_rng(0)).size == (225, 225)
    inputs, target = task.build_sample(noise_image, np.random.default_rng(0))
    assert inputs.shape == (9, 3, 64, 64) and target.shape == () and target.dtype == torch.int64
    means, stds = inputs.mean(dim=(1, 2, 3)), inputs.std(dim=(1, 2, 3))
    assert torch.allclose(means, torch.zeros(9), atol=1e-4) and torch.allclose(stds, torch.ones(9), atol=1e-3)


def test_tiles_move_inside_their_cells():
    task = small_task(image_size=50)  # 16 px cells, 13 px tiles, a 1 px border
    cell, t = task.cell_size, task.tile_size()
    positions = np.stack([task.tile_positions(np.random.default_rng(seed)) for seed in range(200)])
    rows, columns = np.divmod(np.arange(9), 3)
    offsets = positions - (1 + cell * np.stack([rows, columns], axis=1))
    assert offsets.min() == 0 and offsets.max() == cell - t, "every offset in 0..cell - tile is used"


def test_labels_cover_the_permutation_set(noise_image):
    task = small_task(image_size=32)
    labels = [int(task.build_sample(noise_image, np.random.default_rng(seed))[1]) for seed in range(150)]
    assert set(labels) == set(range(10))


def test_replaced_tiles_come_from_the_other_image(noise_image):
    task = small_task(max_replaced=2)
    assert task.needs_other_image and not small_task().needs_other_image
    other = Image.new("RGB", (60, 60), (255, 0, 0))  # flat: every channel of its tiles is constant
    counts = []
    for seed in range(180):
        inputs, target = task.build_sample(noise_image, np.random.default_rng(seed), other)
        counts.append(int((inputs.flatten(2).std(dim=2).amax(dim=1) < 1e-4).sum()))
        assert 0 <= int(target) < 10
    histogram = np.bincount(counts, minlength=3)
    assert len(histogram) == 3 and (histogram > 40).all(), f"0, 1 and 2 replaced tiles about equally: {histogram}"
    with pytest.raises(ValueError, match="second image"):
        task.build_sample(noise_image, np.random.default_rng(0))


def is_grey(tile: torch.Tensor) -> bool:
    """A grey crop gives three channels that are affine images of one another."""
    flat = tile.flatten(1)
    standardised = (flat - flat.mean(dim=1, keepdim=True)) / flat.std(dim=1, keepdim=True)
    return bool((standardised - standardised[0]).abs().max() < 1e-3)


@pytest.mark.parametrize("probability", [0.0, 0.7, 1.0])
def test_grey_scale_frequency(noise_image, probability):
    task = small_task(image_size=32, grayscale_prob=probability)
    grey = [is_grey(task.build_sample(noise_image, np.random.default_rng(seed))[0][0]) for seed in range(400)]
    assert abs(np.mean(grey) - probability) < 0.06


def test_jigsawpp_defaults_come_from_the_paper():
    task = JigsawPlusPlusTask(image_size=48)
    assert (len(task.permutations), task.min_hamming, task.max_replaced, task.grayscale_prob) == (701, 3, 2, 0.7)
    assert task.min_hamming_reached >= 3 and task.needs_other_image and task.name == "jigsawpp"
    assert not JigsawPlusPlusTask(image_size=48, permutations=10, max_replaced=0).needs_other_image
    assert task_class("jigsaw") is JigsawTask and task_class("jigsawpp") is JigsawPlusPlusTask


def test_too_small_an_image_names_the_minimum():
    assert JigsawTask.min_image_size == 30
    with pytest.raises(UserError, match="minimum image size is 30"):
        small_task(image_size=29)
    with pytest.raises(UserError, match="minimum image size is 63"):
        small_task(image_size=62, tile_size=20)
    assert small_task(image_size=63, tile_size=20).tile_size() == 20
    assert small_task(image_size=30).tile_size() == 8


@pytest.mark.parametrize("options, fragment", [
    ({"grayscale_prob": 1.5}, r"grayscale_prob must be a number in \[0, 1\]"),
    ({"max_replaced": 9}, "max_replaced must be an integer in 0..8"),
    ({"permutations": 1}, "permutations must be an integer in 2..362880"),
    ({"grid": 4}, "grid must be one of 2, 3"),
    ({"tile_size": 4}, "tile_size must be an integer >= 8"),
    ({"min_hamming": 10}, "min_hamming must be an integer in 0..9"),
    ({"permutation_seed": -1}, "permutation_seed must be an integer >= 0"),
    ({"fc6_width": 0}, "fc6_width must be an integer >= 1"),
    ({"permutations": 100, "min_hamming": 8}, "lower min_hamming"),
])
def test_bad_options_name_the_option_and_range(options, fragment):
    with pytest.raises(UserError, match=fragment):
        small_task(**options)


def test_permutation_file(tmp_path: Path):
    perms = select_permutations(20, seed=5)
    path = save_permutations(tmp_path / "perms.json", perms, min_pairwise_hamming(perms), seed=5)
    task = JigsawTask(image_size=48, permutation_file=str(path))
    assert np.array_equal(task.permutations, perms)
    assert task.info().options["permutation_set"] == perms.tolist()
    with pytest.raises(UserError, match="holds 20"):
        JigsawTask(image_size=48, permutation_file=path, permutations=30)
    with pytest.raises(UserError, match="3 x 3 grid but grid is 2"):
        JigsawTask(image_size=48, permutation_file=path, grid=2)
    with pytest.raises(UserError, match="below min_hamming 9"):
        JigsawTask(image_size=48, permutation_file=path, min_hamming=9)


def test_info_holds_plain_types_and_the_permutation_set():
    task = small_task(max_replaced=1, grayscale_prob=0.5)
    info = task.info()
    assert info.name == "jigsaw"
    options = json.loads(json.dumps(info.options))
    assert options == info.options
    assert options["permutation_set"] == task.permutations.tolist() and options["permutations"] == 10
    assert (options["tile_size"], options["max_replaced"], options["grayscale_prob"]) == (13, 1, 0.5)


def toy_batch(task: JigsawTask, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` puzzles of toy images with distinct labels (seeds tried in order)."""
    samples, seed = [], 0
    while len(samples) < count:
        image = Image.fromarray(draw_toy_image(len(samples), len(samples) % 4, 4, 64, 0))
        inputs, target = task.build_sample(image, np.random.default_rng(seed))
        seed += 1
        if all(int(target) != int(other) for _, other in samples):
            samples.append((inputs, target))
    return torch.stack([s[0] for s in samples]), torch.stack([s[1] for s in samples])


def test_trunk_is_shared_across_tiles_and_puzzles():
    task = small_task(image_size=51, tile_size=16)  # alexnet_lowres needs 16 px
    torch.manual_seed(0)
    network = PretextNetwork(build_model("alexnet_lowres", num_classes=10, width=0.25), task).eval()
    assert task.head_widths(network.trunk_shape) == (256, 1024)  # (64, 1, 1) pool5: 4 x 64, then 4 x 256
    inputs, _ = toy_batch(task, 3)
    with torch.no_grad():
        together = network(inputs)
        apart = torch.cat([network(inputs[i:i + 1]) for i in range(3)])
    assert together.shape == (3, 10) and torch.allclose(together, apart, atol=1e-5)


def test_a_few_steps_lower_the_loss_below_guessing():
    task = small_task(image_size=51, tile_size=16)  # alexnet_lowres needs 16 px; small keeps it fast
    inputs, targets = toy_batch(task, 4)
    torch.manual_seed(0)
    network = PretextNetwork(build_model("alexnet_lowres", num_classes=10, width=0.25), task)
    optimizer = torch.optim.Adam([p for p in network.parameters() if p.requires_grad], lr=1e-3)

    def evaluate() -> float:
        network.eval()
        with torch.no_grad():
            return task.loss(network(inputs), targets).item()

    before = evaluate()
    network.train()
    for _ in range(16):
        loss = task.loss(network(inputs), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = evaluate()
    # Below log 4, the best a network that ignores the tiles can do on 4 distinct labels.
    assert after < 0.8 * math.log(4) < before, (before, after)
    network.eval()
    with torch.no_grad():
        assert task.accuracy(network(inputs), targets) >= 0.75


@pytest.mark.parametrize("arch, task_type", [("alexnet", JigsawTask), ("vgg16", JigsawPlusPlusTask)])
def test_full_size_archs_run_at_225(noise_image, arch, task_type):
    task = task_type()
    torch.manual_seed(0)
    network = PretextNetwork(build_model(arch), task).eval()
    inputs, target = task.build_sample(noise_image, np.random.default_rng(0), noise_image)
    with torch.no_grad():
        output = network(inputs[None])
    assert output.shape == (1, len(task.permutations)) and torch.isfinite(output).all()
    assert torch.isfinite(task.loss(output, target[None]))
    assert task.accuracy(output, target[None]) in (0.0, 1.0)
