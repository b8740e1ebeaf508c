"""Jigsaw puzzles (Noroozi & Favaro 2016): which permutation of the 3 x 3 grid of tiles was applied?

A sample, for an S x S crop (S = image_size, 225 in the paper):

1. resize the image so its short side is S * 256 / 225 (256 at S = 225) and cut a random S x S
   square; with probability `grayscale_prob` make it grey (PIL's luma, back to 3 equal channels);
2. split the square into a grid x grid array of cells of c = S // grid px (75 at S = 225; the
   leftover S - grid * c px are shared equally between the borders), numbered row-major:

       0 1 2
       3 4 5
       6 7 8

3. in every cell cut a tile of t px (t = c * 64 // 75 by default: 64 in a 75 px cell) at a random
   offset, so neighbouring tiles are separated by a random gap and the trunk cannot solve the
   puzzle by matching edges or continuing straight lines across borders;
4. normalise every tile on its own: ImageNet mean/std (as `ssl extract` feeds the trunk), then
   `per_image_normalise` (zero mean, unit std over the tile's pixels) so brightness and contrast
   shared by neighbouring tiles give nothing away;
5. draw a permutation index uniformly from the permutation set (see `permutations.py`) and shuffle.

Permutation p: position i of the shuffled stack holds the tile cut from cell p[i], i.e.
`shuffled = tiles[p]`; `unshuffle(shuffled, p)` restores cell order. The target is the index of p
in the set.

Tile replacement (`max_replaced` > 0, used by Jigsaw++): after shuffling, a uniformly random
number in 0..max_replaced of positions is overwritten with tiles of a second image (`other`), cut
the same way; following the authors' Caffe code each replacement comes from a random cell of the
second image. The target stays the permutation index: the network must solve the puzzle from
the tiles that remain. The second image follows the first one's grey-scale draw, so a colour
mismatch does not point at the foreign tiles.

On the batch (what training runs; `build_sample` above is the per-image definition it is tested
against): the loader delivers uint8 squares of R = round(S * 256 / 225) px (the short side of step 1,
centre square kept), and `batch_transform()` draws every sample's crop, grey-scale, tile offsets,
permutation and replacements from the step's generator and cuts all B x T tiles with one gather. A
replaced tile comes from another image of the same batch (a random one, never the sample itself
unless the batch holds one image), at a random cell of that image's own random crop. For a
non-square image the crop of step 1 moves inside its centre R x R square only.

Head (the paper's context-free network): a shared fc6 per tile (flatten the trunk map -> Linear ->
ReLU), the fc6 vectors concatenated in position order, fc7 (Linear -> ReLU -> Dropout), fc8 -> one
logit per permutation. The paper's widths are 1024 and 4096 on AlexNet's 256 x 1 x 1 pool5 of a
64 px tile; by default fc6 = min(1024, 4 x trunk features) and fc7 = min(4096, 4 x fc6) so thin
low-resolution trunks get a head of matching size (4096 / (9 x 1024) ~ 4 / 9 as in the paper).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from numbers import Real
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from ssl_cli.errors import UserError
from ssl_cli.pretext.base import ClassificationTask, TaskBatch, TaskInfo, per_image_normalise
from ssl_cli.pretext.crops import to_normalised_tensor
from ssl_cli.pretext.on_batch import (cut_squares, imagenet_normalise, integers, other_images, pil_grey,
                                      random_subsets, square_images)
from ssl_cli.pretext.handcrafted.permutations import GRIDS, load_permutations, min_pairwise_hamming, select_permutations

# The paper's geometry: 256 px short side, 225 px crop, 75 px cells, 64 px tiles.
PAPER_RESIZE, PAPER_CROP, PAPER_CELL, PAPER_TILE = 256, 225, 75, 64
MIN_TILE_SIZE = 8  # the lowres ResNets still have a 1 x 1 map at 8 px
FC6_MAX, FC7_MAX = 1024, 4096  # the paper's head widths
HEAD_DROPOUT = 0.5


def default_tile_size(cell: int) -> int:
    """The paper's tile / cell ratio (64 / 75) for a cell of `cell` px."""
    return cell * PAPER_TILE // PAPER_CELL


def minimum_image_size(grid: int, tile_size: int | None) -> int:
    """Smallest S whose cells hold a tile with room to move (c >= t + 1); t >= MIN_TILE_SIZE by default."""
    if tile_size is not None:
        return grid * (tile_size + 1)
    cell = math.ceil(MIN_TILE_SIZE * PAPER_CELL / PAPER_TILE)
    return grid * cell  # default_tile_size(cell) >= MIN_TILE_SIZE and cell >= that + 1


def shuffle_tiles(tiles: torch.Tensor, perm: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(T, ...) tiles in cell order -> (T, ...) with position i holding the tile of cell perm[i]."""
    return tiles[torch.as_tensor(perm, dtype=torch.int64)]


def unshuffle(tiles: torch.Tensor, perm: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Undo `shuffle_tiles`: (T, ...) in permuted order -> (T, ...) in cell order."""
    restored = torch.empty_like(tiles)
    restored[torch.as_tensor(perm, dtype=torch.int64)] = tiles
    return restored


def random_crop(image: Image.Image, size: int, rng: np.random.Generator) -> Image.Image:
    """Resize so the short side is size * 256 / 225, then cut a random size x size RGB square."""
    image = image.convert("RGB")
    width, height = image.size
    short = round(size * PAPER_RESIZE / PAPER_CROP)
    scale = short / min(width, height)
    resized = (max(short, round(width * scale)), max(short, round(height * scale)))
    if resized != (width, height):
        image = image.resize(resized, Image.BILINEAR)
    left, top = int(rng.integers(resized[0] - size + 1)), int(rng.integers(resized[1] - size + 1))
    return image.crop((left, top, left + size, top + size))


def tile_positions(image_size: int, grid: int, cell_size: int, tile_size: int, rng: np.random.Generator) -> np.ndarray:
    """(grid^2, 2) int64 (top, left) of every cell's tile in an image_size crop, cells in row-major
    order: the grid of cells is centred in the crop and each tile sits at a random place in its cell."""
    border = (image_size - grid * cell_size) // 2
    rows, columns = np.divmod(np.arange(grid * grid), grid)
    corners = border + cell_size * np.stack([rows, columns], axis=1)
    return corners + rng.integers(cell_size - tile_size + 1, size=(grid * grid, 2))


def cut_tiles(image: Image.Image, image_size: int, grid: int, tile_size: int, rng: np.random.Generator,
              grey: bool = False) -> torch.Tensor:
    """Steps 1-4 of Noroozi & Favaro: PIL image -> (grid^2, 3, t, t) float32 tiles in cell order, with
    ImageNet mean/std (not yet normalised tile by tile): a random image_size crop, a grid of cells,
    a tile at a random place in each cell."""
    crop = random_crop(image, image_size, rng)
    if grey:
        crop = crop.convert("L").convert("RGB")
    pixels = to_normalised_tensor(crop)
    return torch.stack([pixels[:, top:top + tile_size, left:left + tile_size]
                        for top, left in tile_positions(image_size, grid, image_size // grid, tile_size, rng)])


def cell_corners(image_size: int, grid: int, cell_size: int, device: torch.device | None = None) -> torch.Tensor:
    """(grid^2, 2) int64 (top, left) of every cell in an image_size crop, row-major, the grid centred."""
    border = (image_size - grid * cell_size) // 2
    cells = torch.arange(grid * grid, device=device)
    return border + cell_size * torch.stack([cells // grid, cells % grid], dim=1)


def resize_to(images: torch.Tensor, size: int) -> torch.Tensor:
    """(B, 3, H, W) -> float (B, 3, size, size) in [0, 255], bilinear (antialiased when shrinking)."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images.float()
    return torch.nn.functional.interpolate(images.float(), size=(size, size), mode="bilinear", align_corners=False,
                                           antialias=size < images.shape[-1])


def batch_tiles(images: torch.Tensor, image_size: int, grid: int, tile_size: int, generator: torch.Generator,
                permutations: torch.Tensor) -> torch.Tensor:
    """`cut_tiles` on a batch, then shuffled: images (B, 3, R, R) uint8 (R >= image_size, the short side of
    step 1) -> (B, T, 3, t, t) float32 with ImageNet mean/std, position i of sample b holding the tile of
    cell permutations[b, i]; a random image_size crop and random tile offsets per sample (PIRL's tiles)."""
    batch, cells, cell = len(images), grid * grid, image_size // grid
    crop = integers(images.shape[-1] - image_size + 1, (batch, 1, 2), generator)
    offsets = integers(cell - tile_size + 1, (batch, cells, 2), generator)
    at = crop + cell_corners(image_size, grid, cell, images.device)[permutations] \
        + torch.gather(offsets, 1, permutations[..., None].expand(-1, -1, 2))
    sources = torch.arange(batch, device=images.device)[:, None].expand(batch, cells)
    return imagenet_normalise(cut_squares(images, sources, at[..., 0], at[..., 1], tile_size))


@dataclass(frozen=True)
class PuzzleDraws:
    """The random choices of a batch of B puzzles of T tiles (M = max_replaced), all int64 or bool tensors.

    grey (B,): the sample (and its foreign tiles) is grey; crop (B, 2): (top, left) of the S x S crop in
    the R x R square; offsets (B, T, 2): each cell's tile inside its cell; labels (B,): permutation index;
    replaced (B, M): replacement slot m is used (the first 0..M slots of each sample); positions (B, M):
    the position a slot overwrites; other (B,): the image of the batch the foreign tiles come from;
    other_crop (B, 2), source_cells (B, M), other_offsets (B, M, 2): where in that image each one is cut.
    """

    grey: torch.Tensor
    crop: torch.Tensor
    offsets: torch.Tensor
    labels: torch.Tensor
    replaced: torch.Tensor
    positions: torch.Tensor
    other: torch.Tensor
    other_crop: torch.Tensor
    source_cells: torch.Tensor
    other_offsets: torch.Tensor


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class JigsawHead(nn.Module):
    """(B * T, C, h, w) trunk maps of B puzzles of T tiles, in position order -> (B, n) logits."""

    def __init__(self, trunk_features: int, tiles: int, permutations: int, fc6: int, fc7: int):
        super().__init__()
        self.tiles, self.fc6_width = tiles, fc6
        self.fc6 = nn.Sequential(nn.Linear(trunk_features, fc6), nn.ReLU(inplace=True))
        self.fc7 = nn.Sequential(nn.Linear(tiles * fc6, fc7), nn.ReLU(inplace=True), nn.Dropout(HEAD_DROPOUT))
        self.fc8 = nn.Linear(fc7, permutations)

    def forward(self, trunk_maps: torch.Tensor) -> torch.Tensor:
        per_tile = self.fc6(trunk_maps.flatten(1))  # (B * T, fc6)
        return self.fc8(self.fc7(per_tile.reshape(-1, self.tiles * self.fc6_width)))


class JigsawTask(ClassificationTask):
    """inputs (T, 3, t, t) = the T = grid^2 tiles in permuted order; target () int64 = permutation index."""

    name = "jigsaw"
    per_image_normalise = True  # Noroozi & Favaro normalise every tile on its own
    min_image_size = minimum_image_size(3, None)  # 30: with the defaults (3 x 3 grid, derived tile size)
    default_permutations = 1000  # Noroozi & Favaro's set size

    def __init__(self, image_size: int = PAPER_CROP, permutations: int | None = None,
                 permutation_file: str | Path | None = None, min_hamming: int | None = None, grid: int = 3,
                 tile_size: int | None = None, grayscale_prob: float = 0.0, max_replaced: int = 0,
                 permutation_seed: int = 0, fc6_width: int | None = None, fc7_width: int | None = None):
        """Options (each refused with a UserError naming it and its valid range):

        image_size: side of the square crop; at least `minimum_image_size(grid, tile_size)`.
        permutations: size of the permutation set, 2..(grid^2)! [1000; jigsawpp 701]; with a
            permutation_file it defaults to (and must equal) the file's count.
        permutation_file: a set written by `ssl permutations` instead of selecting one here.
        min_hamming: refuse a set whose closest two permutations differ in fewer positions.
        grid: cells per side, 2 or 3.
        tile_size: tile side in px, >= 8 and < the cell side [cell * 64 // 75].
        grayscale_prob: probability of making the whole image grey, in [0, 1].
        max_replaced: replace 0..max_replaced tiles with tiles of a second image, 0..grid^2 - 1.
        permutation_seed: seed of the greedy selection (first permutation, tie-breaks).
        fc6_width, fc7_width: head widths [min(1024, 4 x trunk features), min(4096, 4 x fc6)].
        """
        super().__init__(image_size)
        self.grid = self._check_grid(grid)
        self.cells = self.grid * self.grid
        self.cell_size, self.tile_px = self._check_geometry(image_size, tile_size)
        if not isinstance(grayscale_prob, Real) or isinstance(grayscale_prob, bool) or not 0 <= grayscale_prob <= 1:
            raise UserError(f"{self.name}: grayscale_prob must be a number in [0, 1], got {grayscale_prob!r}")
        self.grayscale_prob = float(grayscale_prob)
        if not _is_int(max_replaced) or not 0 <= max_replaced < self.cells:
            raise UserError(f"{self.name}: max_replaced must be an integer in 0..{self.cells - 1} for a "
                            f"{grid} x {grid} grid, got {max_replaced!r}")
        self.max_replaced = max_replaced
        self.needs_other_image = max_replaced > 0
        for option, width in (("fc6_width", fc6_width), ("fc7_width", fc7_width)):
            if width is not None and (not _is_int(width) or width < 1):
                raise UserError(f"{self.name}: {option} must be an integer >= 1 (or left unset), got {width!r}")
        self.fc6_width, self.fc7_width = fc6_width, fc7_width
        self.permutation_file = None if permutation_file is None else str(permutation_file)
        self.permutation_seed = permutation_seed
        self.min_hamming = min_hamming
        self.permutations = self._permutation_set(permutations)
        self.min_hamming_reached = min_pairwise_hamming(self.permutations)

    # --- option checks -------------------------------------------------------------------------

    def _check_grid(self, grid: object) -> int:
        if not _is_int(grid) or grid not in GRIDS:
            raise UserError(f"{self.name}: grid must be one of {', '.join(map(str, GRIDS))}, got {grid!r}")
        return grid

    def _check_geometry(self, image_size: object, tile_size: object) -> tuple[int, int]:
        """-> (cell side, tile side) in px."""
        if tile_size is not None and (not _is_int(tile_size) or tile_size < MIN_TILE_SIZE):
            raise UserError(f"{self.name}: tile_size must be an integer >= {MIN_TILE_SIZE} (or left unset for "
                            f"cell * 64 // 75), got {tile_size!r}")
        needed = minimum_image_size(self.grid, tile_size)
        if not _is_int(image_size):
            raise UserError(f"{self.name}: image_size must be an integer >= {needed}, got {image_size!r}")
        if image_size < needed:
            tiles = f"{tile_size} px tiles" if tile_size is not None else f"tiles of at least {MIN_TILE_SIZE} px"
            raise UserError(f"{self.name}: image_size {image_size!r} is too small for a {self.grid} x {self.grid} "
                            f"grid of {tiles}: the minimum image size is {needed} (cells of at least tile_size + 1 "
                            "px so every tile can move inside its cell)")
        cell = image_size // self.grid
        return cell, default_tile_size(cell) if tile_size is None else tile_size

    def _permutation_set(self, permutations: object) -> np.ndarray:
        total = math.factorial(self.cells)
        if permutations is not None and (not _is_int(permutations) or not 2 <= permutations <= total):
            raise UserError(f"{self.name}: permutations must be an integer in 2..{total} for a {self.grid} x "
                            f"{self.grid} grid, got {permutations!r}")
        if self.min_hamming is not None and (not _is_int(self.min_hamming) or not 0 <= self.min_hamming <= self.cells):
            raise UserError(f"{self.name}: min_hamming must be an integer in 0..{self.cells} for a {self.grid} x "
                            f"{self.grid} grid, got {self.min_hamming!r}")
        if not _is_int(self.permutation_seed) or self.permutation_seed < 0:
            raise UserError(f"{self.name}: permutation_seed must be an integer >= 0, got {self.permutation_seed!r}")
        if self.permutation_file is None:
            count = self.default_permutations if permutations is None else permutations
            try:
                return select_permutations(count, self.grid, self.min_hamming, self.permutation_seed)
            except UserError as error:
                raise UserError(f"{self.name}: {error}") from None
        perms = load_permutations(self.permutation_file)
        if perms.shape[1] != self.cells:
            raise UserError(f"{self.name}: permutation file {self.permutation_file} is for a "
                            f"{math.isqrt(perms.shape[1])} x {math.isqrt(perms.shape[1])} grid but grid is "
                            f"{self.grid}; pass the matching grid or write a set with `ssl permutations`")
        if permutations is not None and permutations != len(perms):
            raise UserError(f"{self.name}: permutations is {permutations} but {self.permutation_file} holds "
                            f"{len(perms)}; leave permutations unset to use the file's set")
        reached = min_pairwise_hamming(perms)
        if self.min_hamming is not None and reached < self.min_hamming:
            raise UserError(f"{self.name}: permutation file {self.permutation_file} reaches a minimum Hamming "
                            f"distance of only {reached}, below min_hamming {self.min_hamming}; lower min_hamming "
                            "or write a smaller set with `ssl permutations --min-hamming`")
        return perms

    # --- the interface -------------------------------------------------------------------------

    def info(self) -> TaskInfo:
        return TaskInfo(self.name, {
            "grid": self.grid, "tile_size": self.tile_px, "permutations": len(self.permutations),
            "permutation_file": self.permutation_file, "permutation_seed": self.permutation_seed,
            "min_hamming": self.min_hamming, "min_hamming_reached": self.min_hamming_reached,
            "grayscale_prob": self.grayscale_prob, "max_replaced": self.max_replaced,
            "fc6_width": self.fc6_width, "fc7_width": self.fc7_width,
            "permutation_set": self.permutations.tolist(),
        })

    def tile_size(self) -> int:
        return self.tile_px

    def classes(self) -> int:
        return len(self.permutations)

    def tile_positions(self, rng: np.random.Generator) -> np.ndarray:
        """(T, 2) int64 (top, left) of every cell's tile in the S x S crop, cells in row-major order."""
        return tile_positions(self.image_size, self.grid, self.cell_size, self.tile_px, rng)

    def cut_tiles(self, image: Image.Image, rng: np.random.Generator, grey: bool = False) -> torch.Tensor:
        """Steps 1-4: PIL image -> (T, 3, t, t) float32 tiles in cell order, each normalised on its own."""
        return per_image_normalise(cut_tiles(image, self.image_size, self.grid, self.tile_px, rng, grey))

    def build_from_tiles(self, tiles: torch.Tensor, rng: np.random.Generator,
                         other_tiles: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Step 5 and tile replacement: (T, 3, t, t) tiles in cell order -> (inputs, target)."""
        label = int(rng.integers(len(self.permutations)))
        shuffled = shuffle_tiles(tiles, self.permutations[label])  # a copy: safe to overwrite below
        if self.max_replaced > 0:
            if other_tiles is None:
                raise ValueError(f"{self.name} with max_replaced > 0 needs the tiles of a second image")
            count = int(rng.integers(self.max_replaced + 1))
            positions = rng.choice(self.cells, size=count, replace=False)
            sources = rng.choice(self.cells, size=count, replace=False)
            shuffled[torch.as_tensor(positions)] = other_tiles[torch.as_tensor(sources)]
        return shuffled.contiguous(), torch.tensor(label, dtype=torch.int64)

    def build_sample(self, image: Image.Image, rng: np.random.Generator,
                     other: Image.Image | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        grey = bool(rng.random() < self.grayscale_prob)
        tiles = self.cut_tiles(image, rng, grey)
        other_tiles = None
        if self.max_replaced > 0:
            if other is None:
                raise ValueError(f"{self.name} with max_replaced > 0 needs a second image (needs_other_image)")
            other_tiles = self.cut_tiles(other, rng, grey)
        return self.build_from_tiles(tiles, rng, other_tiles)

    # --- on the batch (what training runs) ----------------------------------------------------------

    def base_size(self) -> int:
        """R, the side of the uint8 squares the loader delivers: step 1's short side, round(S * 256 / 225)."""
        return round(self.image_size * PAPER_RESIZE / PAPER_CROP)

    def dataset(self, source, seed: int):
        return square_images(source, self.base_size())

    def batch_transform(self):
        def puzzles(images: torch.Tensor, generator: torch.Generator) -> TaskBatch:
            return self.batch_sample(images, self.draw(len(images), generator))

        return puzzles

    def draw(self, batch: int, generator: torch.Generator) -> PuzzleDraws:
        """Every random choice of `batch` puzzles, from `generator` (on the batch's device)."""
        device, cells, most = generator.device, self.cells, self.max_replaced
        margin = self.base_size() - self.image_size + 1
        grey = torch.rand(batch, generator=generator, device=device) < self.grayscale_prob
        crop = integers(margin, (batch, 2), generator)
        offsets = integers(self.cell_size - self.tile_px + 1, (batch, cells, 2), generator)
        labels = integers(len(self.permutations), (batch,), generator)
        count = integers(most + 1, (batch, 1), generator)
        replaced = torch.arange(most, device=device) < count
        return PuzzleDraws(grey, crop, offsets, labels, replaced, random_subsets(batch, cells, most, generator),
                           other_images(batch, generator), integers(margin, (batch, 2), generator),
                           random_subsets(batch, cells, most, generator),
                           integers(self.cell_size - self.tile_px + 1, (batch, most, 2), generator))

    def batch_sample(self, images: torch.Tensor, draws: PuzzleDraws) -> TaskBatch:
        """uint8 (B, 3, R, R) -> TaskBatch((B, T, 3, t, t) tiles in permuted order, (B,) permutation indices):
        steps 2-5 and tile replacement of `build_sample`, for the whole batch at once."""
        batch, device = len(images), images.device
        corners = cell_corners(self.image_size, self.grid, self.cell_size, device)
        perms = torch.as_tensor(self.permutations, device=device)[draws.labels]  # (B, T): cell of each position
        at = draws.crop[:, None] + corners[perms] + torch.gather(draws.offsets, 1, perms[..., None].expand(-1, -1, 2))
        sources = torch.arange(batch, device=device)[:, None].repeat(1, self.cells)
        if self.max_replaced:
            rows = torch.arange(batch, device=device)[:, None].expand_as(draws.positions)[draws.replaced]
            columns = draws.positions[draws.replaced]
            foreign = draws.other_crop[:, None] + corners[draws.source_cells] + draws.other_offsets
            at[rows, columns] = foreign[draws.replaced]
            sources[rows, columns] = draws.other[rows]
        tiles = cut_squares(images, sources, at[..., 0], at[..., 1], self.tile_px)
        if self.grayscale_prob:
            tiles = torch.where(draws.grey.view(-1, 1, 1, 1, 1), pil_grey(tiles), tiles)
        return TaskBatch(per_image_normalise(imagenet_normalise(tiles)), draws.labels)

    def head_widths(self, trunk_shape: tuple[int, int, int]) -> tuple[int, int]:
        """(fc6, fc7) for a trunk map of shape (C, h, w): the options, or the defaults derived from it."""
        channels, height, width = trunk_shape
        fc6 = self.fc6_width or min(FC6_MAX, 4 * channels * height * width)
        return fc6, self.fc7_width or min(FC7_MAX, 4 * fc6)

    def build_head(self, trunk_shape: tuple[int, int, int]) -> nn.Module:
        channels, height, width = trunk_shape
        fc6, fc7 = self.head_widths(trunk_shape)
        return JigsawHead(channels * height * width, self.cells, len(self.permutations), fc6, fc7)

    def forward(self, trunk: Callable[[torch.Tensor], torch.Tensor], head: nn.Module,
                inputs: torch.Tensor) -> torch.Tensor:
        """(B, T, 3, t, t) -> (B, n) logits; the trunk runs once on all B * T tiles (shared weights)."""
        return head(trunk(inputs.flatten(0, 1)))


