"""Jigsaw++ (Noroozi, Vinjimoor, Favaro & Pirsiavash 2018, "Boosting Self-Supervised Learning via
Knowledge Transfer"): the jigsaw puzzle made harder so the trunk learns more.

Everything of `JigsawTask` (geometry, per-tile normalisation, head, what a permutation means)
holds; only the defaults differ, each from the paper:

- 701 permutations whose closest two differ in at least 3 positions (`permutations=701`,
  `min_hamming=3`); the greedy selection here reaches more than 3 at 701, so the check passes;
- 0 to 2 tiles replaced by tiles of another random image (`max_replaced=2`): the network must
  solve the puzzle from the remaining tiles, and cannot trust every tile to belong;
- the image grey-scale 70% of the time (`grayscale_prob=0.7`), against colour shortcuts such
  as chromatic aberration;
- every tile normalised to zero mean and unit std on its own (as in `JigsawTask`).

All of them stay options (`--permutations`, `--min-hamming`, `--max-replaced`,
`--grayscale-prob`, ...). With `max_replaced=0` no second image is loaded.
"""

from __future__ import annotations

from pathlib import Path

from ssl_cli.pretext.handcrafted.jigsaw import PAPER_CROP, JigsawTask


class JigsawPlusPlusTask(JigsawTask):
    """`JigsawTask` with the Jigsaw++ defaults: inputs (9, 3, t, t), target () int64 = permutation index."""

    name = "jigsawpp"
    needs_other_image = True  # with the default max_replaced = 2; the instance attribute follows the option
    default_permutations = 701

    def __init__(self, image_size: int = PAPER_CROP, permutations: int | None = None,
                 permutation_file: str | Path | None = None, min_hamming: int | None = 3, grid: int = 3,
                 tile_size: int | None = None, grayscale_prob: float = 0.7, max_replaced: int = 2,
                 permutation_seed: int = 0, fc6_width: int | None = None, fc7_width: int | None = None):
        """Options as `JigsawTask`; defaults permutations=701, min_hamming=3, grayscale_prob=0.7, max_replaced=2."""
        super().__init__(image_size=image_size, permutations=permutations, permutation_file=permutation_file,
                         min_hamming=min_hamming, grid=grid, tile_size=tile_size, grayscale_prob=grayscale_prob,
                         max_replaced=max_replaced, permutation_seed=permutation_seed, fc6_width=fc6_width,
                         fc7_width=fc7_width)
