"""A network with everything needed to feed it: arch, options, input size and normalisation."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ssl_cli.artifacts.checkpoint import load_checkpoint
from ssl_cli.data.sources import weights_input
from ssl_cli.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from ssl_cli.errors import UserError
from ssl_cli.models.layers import load_weights
from ssl_cli.models.projected import ProjectedNetwork, projected_spec
from ssl_cli.models.registry import ArchSpec, build_model, builder_accepts, get_arch, resolved_kwargs


@dataclass
class Network:
    model: nn.Module
    spec: ArchSpec
    arch_kwargs: dict[str, Any]
    input_size: int
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    inputs: list[dict[str, str]] = field(default_factory=list)  # provenance of the weights
    per_image_normalise: bool = False  # the trunk learned on tiles normalised one by one (jigsaw)
    feature_layer: str | None = None  # the layer the training made meaningful (default for extract)
    input_mode: str = "rgb"  # "lightness": the L channel (colorization); "sobel": Sobel responses (DeepCluster)
    projection: dict[str, int] | None = None  # {"d_in", "width"}: the model is a ProjectedNetwork (SimCLRv2)
    built_with: dict[str, Any] | None = None  # every builder option, defaults filled in (None: the current defaults)

    def resolved_kwargs(self, **overrides: Any) -> dict[str, Any]:
        """Every option the builder took (`overrides` on top): rebuild the same network with these."""
        resolved = dict(self.built_with) if self.built_with is not None else resolved_kwargs(self.spec.name, self.arch_kwargs)
        return resolved | overrides

    def describe(self, **overrides: Any) -> dict[str, Any]:
        """What a checkpoint records so the network can be rebuilt with no other flag; `overrides` (num_classes
        of a new classifier) replace arch options in both records."""
        described = {
            "arch": self.spec.name,
            "arch_kwargs": dict(self.arch_kwargs) | overrides,
            "arch_kwargs_resolved": self.resolved_kwargs(**overrides),
            "input_size": self.input_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "per_image_normalise": self.per_image_normalise,
            "input_mode": self.input_mode,
        }
        if self.projection is not None:
            described["projection"] = {"d_in": self.projection["d_in"], "width": self.projection["width"]}
        return described


def network_from_checkpoint(path: Path) -> Network:
    data = load_checkpoint(path)
    meta = data["meta"]
    for key in ("arch", "input_size"):
        if key not in meta:
            raise UserError(f"{path} does not record '{key}'; it is not a model checkpoint")
    if not isinstance(data.get("model"), dict) or not all(isinstance(v, torch.Tensor) for v in data["model"].values()):
        raise UserError(f"{path} holds no model state dict; pass a checkpoint written by an ssl training stage")
    spec = get_arch(meta["arch"])
    passed = dict(meta.get("arch_kwargs", {}))
    # checkpoints from before arch_kwargs_resolved was recorded rebuild with the current defaults
    built_with = resolved_kwargs(spec.name, builder_accepts(spec.name, meta.get("arch_kwargs_resolved", {})) | passed)
    model, data = rebuilt(spec.name, built_with, data, path)
    projection = meta.get("projection")
    if projection is not None:  # SimCLRv2: read through the projection head's first block
        model, spec = projected_network(model, spec, projection, data)
    else:
        model.load_state_dict(data["model"])
    return Network(
        model, spec, passed, int(meta["input_size"]),
        tuple(meta.get("mean", IMAGENET_MEAN)), tuple(meta.get("std", IMAGENET_STD)),
        inputs=[{"path": str(path), "fingerprint": meta["fingerprint"]}],
        per_image_normalise=bool(meta.get("per_image_normalise", False)),
        feature_layer=meta.get("feature_layer"),
        input_mode=meta.get("input_mode", "rgb"),
        projection=projection,
        built_with=built_with,
    )


def trained_state(model: nn.Module, untrained: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """`model`'s state dict without the submodules named in `untrained` (layers a stage never trains,
    such as torchvision's classifier under a pretext trunk: 470 of VGG16's 528 MB)."""
    return {key: value for key, value in model.state_dict().items() if not key.startswith(tuple(f"{name}." for name in untrained))}


def untrained_record(untrained: tuple[str, ...], seed: int) -> dict[str, Any]:
    """The checkpoint's note of what `trained_state` left out: the modules and the seed their initialisation
    came from (the stage built the whole arch under `torch.manual_seed(seed)`), so a rebuild restores them."""
    return {"modules": list(untrained), "init_seed": int(seed)}


def rebuilt(arch: str, kwargs: dict[str, Any], data: dict[str, Any], path: Path) -> tuple[nn.Module, dict[str, Any]]:
    """A fresh `arch` and the checkpoint `data` whose "model" is whole: the modules a stage left out as untrained
    (meta "untrained") are filled from a build seeded as the stage's own, so they equal what it held."""
    untrained = data["meta"].get("untrained")
    if not untrained:
        return build_model(arch, **kwargs), data
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(untrained.get("init_seed", 0)))
        model = build_model(arch, **kwargs)
    fresh = model.state_dict()
    prefixes = tuple(f"{name}." for name in untrained.get("modules", []))
    missing = [key for key in fresh if key not in data["model"]]
    unexplained = [key for key in missing if not key.startswith(prefixes)]
    if unexplained:
        raise UserError(f"{path} lacks trained tensors {unexplained[:5]} ({len(unexplained)} in all); "
                        "the checkpoint is damaged: rerun the stage that wrote it")
    return model, {**data, "model": {**{key: fresh[key] for key in missing}, **data["model"]}}


def projected_network(backbone: nn.Module, spec: ArchSpec, projection: dict[str, Any],
                      data: dict[str, Any]) -> tuple[ProjectedNetwork, ArchSpec]:
    """A pretext checkpoint (backbone in "model", the block in "head" under `head_prefix`) or a finetuned one
    (the whole ProjectedNetwork in "model", with a classifier) -> the network and its layer names."""
    state = data["model"]
    classes = state["classifier.weight"].shape[0] if "classifier.weight" in state else None
    model = ProjectedNetwork(backbone, int(projection["d_in"]), int(projection["width"]), classes)
    if "head_prefix" in projection:
        prefix = projection["head_prefix"]
        state = {f"backbone.{key}": value for key, value in state.items()} | {
            f"proj1.{key[len(prefix):]}": value for key, value in data["head"].items() if key.startswith(prefix)}
    model.load_state_dict(state)
    return model, projected_spec(spec, classes is not None)


def network_from_arch(arch: str, weights: Path | None, image_size: int | None, seed: int,
                      arch_kwargs: dict[str, Any] | None = None) -> Network:
    """A registry arch, randomly initialised from `seed` or loaded from local `weights`."""
    spec = get_arch(arch)
    size = image_size or spec.input_size
    if size < spec.min_input_size:
        raise UserError(f"--image-size {size} is too small for {arch} (minimum {spec.min_input_size}); "
                        f"use a larger size or a *_lowres arch")
    kwargs = dict(arch_kwargs or {})
    built_with = resolved_kwargs(arch, kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(arch, **kwargs)
    inputs = [{"path": f"arch:{arch}:seed={seed}", "fingerprint": f"init:{arch}:{seed}:{sorted(kwargs.items())}"}]
    if weights is not None:
        load_weights(model, weights)
        inputs = [weights_input(weights)]
    return Network(model, spec, kwargs, size, inputs=inputs, built_with=built_with)
