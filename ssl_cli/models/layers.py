"""Reading a named layer: a network truncated after it, with bounded spatial pooling."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor

from ssl_cli.errors import UserError
from ssl_cli.models.registry import ArchSpec, check_layer


class LayerReader(nn.Module):
    """(B, 3, H, W) images -> (B, D) features of one named layer.

    Conv maps (B, C, h, w) are pooled to (B, C * s * s) with `pool` in {avg, max} and s =
    `pool_size`, or flattened whole with `pool="none"`; vectors pass through.
    """

    def __init__(self, model: nn.Module, spec: ArchSpec, layer: str, pool: str = "avg", pool_size: int = 1):
        super().__init__()
        node = check_layer(spec, layer)
        self.body = create_feature_extractor(model, return_nodes={node: "out"})
        self.pool, self.pool_size = pool, pool_size

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self.body(images)["out"]
        if out.dim() == 4 and self.pool != "none":
            pooled = F.adaptive_avg_pool2d if self.pool == "avg" else F.adaptive_max_pool2d
            out = pooled(out, self.pool_size)
        return out.flatten(1)


def load_weights(model: nn.Module, path: Path) -> list[str]:
    """Load a local state dict (plain or inside an ssl checkpoint's 'model'), strictly except for
    classifier layers whose shapes differ. Returns the names of the tensors left at init."""
    if not path.exists():
        raise UserError(f"--weights {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any failure means the same thing to the user
        raise UserError(f"--weights {path} is not a torch state dict ({type(error).__name__}); pass a .pt/.pth file") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"--weights {path} does not hold a state dict of tensors")
    own = model.state_dict()
    unknown = [key for key in state if key not in own]
    if unknown:
        raise UserError(f"--weights {path} does not fit this arch: unexpected tensors {unknown[:5]} ({len(unknown)} in all)")
    skipped = [key for key, value in state.items() if own[key].shape != value.shape]
    missing = [key for key in own if key not in state]
    load = {key: value for key, value in state.items() if key not in skipped}
    model.load_state_dict(load, strict=False)
    return skipped + missing
