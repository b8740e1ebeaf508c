"""One strict pydantic model per stage, resolved in one place: YAML defaults, then flags.

`resolve` is the only way a stage config is built, so every bad field is named in one error,
and a user's value is stored as given (never rescaled in place).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from ssl_cli.data.spec import SOURCE_FORMS, check_source
from ssl_cli.errors import UserError
from ssl_cli.models.catalog import CATALOG, unknown_arch
from ssl_cli.pretext.registry import TASKS, unknown_task

# Fields naming an image source, and fields naming an input file. The command line checks that they
# exist before anything heavy loads (`resolve(..., check_inputs=True)`); `ssl run` does not, because
# an earlier stage may write them.
SOURCE_FIELDS = ("data", "eval_data", "monitor_data", "assign_data", "labelled", "unlabelled")
FILE_FIELDS = ("model", "weights", "features", "clusters", "labels", "teacher")


NO_EVALUATION = "none"  # `ssl train --eval-data none`


def _checking_inputs(info: ValidationInfo) -> bool:
    return bool(info.context and info.context.get("check_inputs"))


class StageConfig(BaseModel):
    """Fields shared by every stage. `DISPLAY_ONLY` fields never enter the fingerprint."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    DISPLAY_ONLY: ClassVar[frozenset[str]] = frozenset({"out", "force", "progress", "device", "workers"})

    out: Path = Field(description="output file")
    force: bool = Field(False, description="replace an output made with other settings (the old file stays until "
                        "the new one is complete)")
    progress: bool = Field(True, description="show progress bars")
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    workers: int = Field(2, ge=0, le=256, description="DataLoader worker processes")

    # Paths of inputs: their content enters the fingerprint through the inputs' own fingerprints,
    # so a moved project folder or a relative-vs-absolute spelling does not make outputs stale.
    INPUT_PATHS: ClassVar[frozenset[str]] = frozenset({"data", "model", "weights", "features", "clusters", "labels",
                                                       "assign_data", "neighbours"})

    def result_config(self) -> dict[str, Any]:
        """The fields that change the result: what the fingerprint covers."""
        return self.model_dump(mode="json", exclude=set(self.DISPLAY_ONLY | self.INPUT_PATHS))

    def recorded_config(self) -> dict[str, Any]:
        """What an artifact records as its config: the settings this run used. `--force` is an action, not a
        setting, and fields a method ignores are left out (see `unused_fields`)."""
        return self.model_dump(mode="json", exclude={"force", *self.unused_fields()})

    def unused_fields(self) -> tuple[str, ...]:
        return ()

    @classmethod
    def rule_problems(cls, values: dict[str, Any]) -> list[str]:
        """Rules between settings, read from the values passed, so they are reported together with every
        field's own error (an after-validator would run only once every field is valid)."""
        return []

    @model_validator(mode="wrap")
    @classmethod
    def _rules_with_fields(cls, values: Any, handler: Any) -> Any:
        problems = cls.rule_problems(values) if isinstance(values, dict) else []
        try:
            validated = handler(values)
        except ValidationError as error:
            if not problems:
                raise
            rules = [{"type": "value_error", "loc": (), "input": values, "ctx": {"error": ValueError(problem)}}
                     for problem in problems]
            raise ValidationError.from_exception_data(cls.__name__, [*error.errors(), *rules]) from None
        if problems:
            raise ValueError("; ".join(problems))
        return validated

    @field_validator(*SOURCE_FIELDS, check_fields=False)
    @classmethod
    def _source_exists(cls, value: Any, info: ValidationInfo) -> Any:
        if value is not None and _checking_inputs(info) and not (info.field_name == "eval_data" and value == NO_EVALUATION):
            check_source(str(value), "--" + info.field_name.replace("_", "-"))
        return value

    @field_validator("arch", "student_arch", check_fields=False)
    @classmethod
    def _known_arch(cls, value: Any) -> Any:
        if value is not None and value not in CATALOG:
            raise ValueError(unknown_arch(value))
        return value

    @field_validator(*FILE_FIELDS, check_fields=False)
    @classmethod
    def _file_exists(cls, value: Any, info: ValidationInfo) -> Any:
        if value is not None and _checking_inputs(info):
            path = Path(value)
            if not path.exists():
                raise ValueError(f"{path} does not exist")
            if path.is_dir():
                raise ValueError(f"{path} is a folder; pass a file")
        return value

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if value in ("auto", "cpu", "cuda") or (value.startswith("cuda:") and value[5:].isdigit()):
            return value
        raise ValueError("must be auto, cpu, cuda or cuda:N")


class ExtractConfig(StageConfig):
    # batch size changes only throughput, so it stays out of the fingerprint like workers
    DISPLAY_ONLY: ClassVar[frozenset[str]] = StageConfig.DISPLAY_ONLY | {"batch_size"}

    data: str = Field(description="image source: folder, images .h5, or fashion-mnist:DIR[:train|test]")
    model: Path | None = Field(None, description="ssl-cli checkpoint to extract from (gives arch and input size)")
    arch: str | None = Field(None, description="architecture when no --model is given (random init or --weights)")
    weights: Path | None = Field(None, description="local state dict for --arch")
    layer: str | None = Field(None, description="named layer to read (default: the arch's feature layer)")
    pool: Literal["avg", "max", "none"] = Field("avg", description="spatial pooling of conv maps")
    pool_size: int = Field(1, ge=1, le=16, description="conv maps are pooled to pool_size x pool_size")
    image_size: int | None = Field(None, ge=8, le=1024, description="input size for --arch (default: the arch's)")
    width: float | None = Field(None, gt=0, le=4, description="channel multiplier of a *_lowres alexnet/vgg --arch (default: the arch's)")
    batch_size: int = Field(64, ge=1, le=65536, description="images per batch")
    dtype: Literal["float32", "float16"] = Field("float32", description="storage type of the features")
    seed: int = Field(0, description="seed of a randomly initialised --arch")

    @classmethod
    def rule_problems(cls, values: dict[str, Any]) -> list[str]:
        given = {name for name, value in values.items() if value is not None}
        if ("model" in given) == ("arch" in given):
            return ["give exactly one of --model CKPT (a trained network) or --arch NAME"]
        if "model" in given and given & {"weights", "image_size", "width"}:
            return ["--model already records its weights, input size and width; drop --weights/--image-size/--width"]
        return []

    def result_config(self) -> dict[str, Any]:
        # An unset width is left out, so features extracted before --width existed keep their
        # fingerprint; a set one also enters through the network's arch_kwargs.
        config = super().result_config()
        if self.width is None:
            config.pop("width")
        return config


KMEANS_FIELDS = ("pca_dim", "pca_sample", "niter", "max_points_per_centroid", "backend", "gpu", "chunk_rows")
SCAN_FIELDS = ("model", "data", "assign_data", "layer", "pool_size", "neighbours", "neighbours_k", "neighbours_method",
               "heads", "entropy_weight", "scan_epochs", "self_label", "self_label_epochs", "threshold", "batch_size",
               "lr", "self_label_lr", "scan_backbone", "backbone_lr")


class ClusterConfig(StageConfig):
    method: Literal["kmeans", "scan"] = Field("kmeans", description="kmeans on --features, or scan (a pretext "
                                              "--model's neighbours, clustering heads, self-labelling) on --data")
    features: Path | None = Field(None, description="features.h5 from `ssl extract` (kmeans)")
    k: int = Field(ge=2, description="number of clusters")
    pca_dim: int | Literal["auto"] = Field(
        "auto", description="PCA dimensions, whitened, before k-means: auto = 2 x (k - 1) capped at 256, at the "
        "feature dimension and at a tenth of the PCA rows (bench/pca_default.py); a number fixes it; 0 = no PCA")
    pca_sample: int = Field(100_000, ge=1, description="rows sampled to fit the PCA")
    niter: int = Field(20, ge=1, le=10_000, description="k-means iterations")
    seed: int = Field(0, description="seed of the k-means initialisation and the PCA sample")
    max_points_per_centroid: int = Field(256, ge=1, description="k-means trains on at most k x this many rows")
    backend: Literal["faiss", "torch"] = Field("faiss", description="faiss, or torch (CPU/CUDA, all-reduce under "
                                               "torchrun)")
    gpu: Literal["auto", "on", "off"] = Field("auto", description="faiss on GPUs: auto (all visible), on, off")
    chunk_rows: int | None = Field(None, ge=1, description="rows read from disk at a time (default: 64 MiB of features)")
    # --method scan
    model: Path | None = Field(None, description="scan: the pretext checkpoint whose features find the neighbours")
    data: str | None = Field(None, description="scan: the images to cluster (the heads train on them)")
    assign_data: str | None = Field(None, description="scan: images the clusters file assigns (default: --data), e.g. "
                                    "the test split of SCAN's protocol")
    layer: str | None = Field(None, description="scan: the layer read (default: the checkpoint's feature layer)")
    pool_size: int = Field(1, ge=1, le=16, description="scan: the layer's map is average-pooled to this side")
    neighbours: Path | None = Field(None, description="scan: the neighbours file (default: scan-cache/neighbours-<hash>"
                                    ".h5 beside --out, keyed by the features, --neighbours-k and "
                                    "--neighbours-method; reused when up to date)")
    neighbours_k: int = Field(20, ge=1, description="scan: nearest neighbours of every image")
    neighbours_method: Literal["auto", "exact", "ivf", "hnsw"] = Field(
        "auto", description="scan: how the neighbours are mined: exact (N^2 cosine), ivf (a faiss IVF index, nprobe "
        "set for recall@K >= 0.95; on faiss's GPUs), hnsw (faiss, CPU); auto = exact up to 100000 images, else ivf")
    heads: int = Field(10, ge=1, le=100, description="scan: clustering heads trained at once; the lowest-loss one is kept")
    entropy_weight: float = Field(5.0, ge=0, description="scan: weight of the entropy of the mean prediction")
    scan_epochs: int = Field(30, ge=1, le=10_000, description="scan: epochs of the SCAN step")
    self_label: bool = Field(True, description="scan: self-labelling on confident images after the SCAN step")
    self_label_epochs: int = Field(10, ge=1, le=10_000, description="scan: epochs of self-labelling")
    threshold: float = Field(0.99, gt=0, lt=1, description="scan: confidence that makes an image a self-label")
    self_label_lr: float = Field(1e-4, gt=0, le=10, description="scan: AdamW learning rate of self-labelling (SCAN's "
                                 "1e-4; a linear head on frozen features drifts to a few clusters at 1e-2)")
    batch_size: int = Field(256, ge=1, le=65536, description="scan: images per step")
    lr: float = Field(1e-3, gt=0, le=10, description="scan: AdamW learning rate of the heads")
    scan_backbone: Literal["train", "frozen"] = Field(
        "train", description="scan: train = SCAN as published: the SCAN step and self-labelling train the pretext "
        "network up to --layer with the heads, on augmented images (writes <stem>.network.pt); frozen = heads on the "
        "frozen network's cached features (no network forward in the SCAN step)")
    backbone_lr: float = Field(1e-4, gt=0, le=10, description="scan, --scan-backbone train: AdamW learning rate of the "
                               "network's layers in both steps (SCAN's 1e-4; the heads keep --lr, then --self-label-lr)")
    DISPLAY_ONLY: ClassVar[frozenset[str]] = StageConfig.DISPLAY_ONLY | {"gpu", "chunk_rows", "neighbours"}

    @classmethod
    def rule_problems(cls, values: dict[str, Any]) -> list[str]:
        if values.get("method", "kmeans") != "scan":
            if values.get("features") is None:
                return ["k-means clusters --features; pass --features FEATURES.h5 (or --method scan with --model "
                        "and --data)"]
            given = [name for name in SCAN_FIELDS if values.get(name) is not None]
            return [f"--{given[0].replace('_', '-')} belongs to --method scan; k-means reads --features"] if given else []
        if values.get("model") is None or values.get("data") is None:
            return ["--method scan needs --model (a pretext checkpoint) and --data (the images to cluster)"]
        if values.get("features") is not None:
            return ["--method scan extracts its own features from --model; drop --features"]
        return []

    def unused_fields(self) -> tuple[str, ...]:
        unused = ("method", *SCAN_FIELDS) if self.method == "kmeans" else KMEANS_FIELDS
        if self.method == "scan" and not self.self_label:
            unused += ("self_label_epochs", "threshold", "self_label_lr")
        if self.method == "scan" and self.scan_backbone == "frozen":
            unused += ("backbone_lr",)
        return unused

    def result_config(self) -> dict[str, Any]:
        # k-means outputs keep the fingerprint they had before --method existed
        config = super().result_config()
        for name in self.unused_fields():
            config.pop(name, None)
        if config.get("neighbours_method") == "auto":  # SCAN outputs from before the option keep their fingerprint
            config.pop("neighbours_method")
        if config.get("scan_backbone") == "frozen":  # the frozen SCAN of before the option keeps its fingerprint
            config.pop("scan_backbone")
        return config

    @field_validator("pca_dim", mode="before")
    @classmethod
    def _pca_dim(cls, value: Any) -> int | str:
        # One message for both spellings (a flag arrives as text), instead of one error per union member.
        if value == "auto":
            return value
        if isinstance(value, str) and value.strip().isdigit():
            return int(value)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
        raise ValueError("must be auto or a whole number >= 0 (0 = no PCA)")


class PseudolabelConfig(StageConfig):
    clusters: Path = Field(description="clusters.h5 from `ssl cluster`")
    features: Path = Field(description="features.h5 to label (may be another dataset than the one clustered)")
    chunk_rows: int | None = Field(None, ge=1, description="rows labelled at a time (default: 64 MiB of features)")
    DISPLAY_ONLY: ClassVar[frozenset[str]] = StageConfig.DISPLAY_ONLY | {"chunk_rows"}


class ToyDataConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    # Fields that do not change the images: never part of the fingerprint or the folder's manifest.
    DISPLAY_ONLY: ClassVar[frozenset[str]] = frozenset({"out", "format", "workers"})
    out: Path = Field(description="a folder to write <class>/<index>.png into, or an .h5/.hdf5 file: one image store "
                      "(images, sample_ids <class>/<index>.png, targets) that every stage reads as --data")
    n: int = Field(400, ge=2, description="number of images")
    classes: int = Field(4, ge=2, le=84, description="number of classes, 2-84")
    size: int = Field(32, ge=16, le=512, description="image side in pixels")
    seed: int = Field(0, ge=0, description="random seed")
    format: Literal["auto", "folder", "h5"] = Field("auto", description="auto: an OUT ending in .h5 or .hdf5 is an "
                                                   "image store, anything else a folder of PNGs")
    workers: int | None = Field(None, ge=1, le=256, description="processes drawing images (default: the CPU count)")

    def result_config(self) -> dict[str, Any]:
        """The fields that change the images: n, classes, size, seed."""
        return self.model_dump(mode="json", exclude=set(self.DISPLAY_ONLY))

    @property
    def store(self) -> bool:
        """Whether OUT is one HDF5 image store rather than a folder of PNGs."""
        if self.format != "auto":
            return self.format == "h5"
        return self.out.suffix.lower() in (".h5", ".hdf5")

    @model_validator(mode="after")
    def _enough_images(self) -> "ToyDataConfig":
        if self.n < self.classes:
            raise ValueError(f"n ({self.n}) must be at least classes ({self.classes})")
        return self


class PackConfig(StageConfig):
    data: str = Field(description=f"images: {SOURCE_FORMS}")
    image_size: int | None = Field(None, ge=8, le=1024, description="resize to this square size (default: keep)")
    limit: int | None = Field(None, ge=1, description="pack only the first N images (a subset for quick experiments)")


def format_validation_error(error: ValidationError, source: str = "", as_flags: bool = True) -> str:
    """Every bad field on one line: '--k: must be >= 2; --niter: not an integer' (or YAML field names)."""
    parts = []
    for item in error.errors():
        field = ".".join(str(piece) for piece in item["loc"]) or "config"
        flag = "--" + field.replace("_", "-") if as_flags else field
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown field"
        elif item["type"] == "missing":
            message = "required (pass it as a flag or in --config)"
        whole = not item["loc"] or message.startswith(flag + " ")  # a rule between settings names its own flags
        parts.append(message if whole else f"{flag}: {message}")
    where = f" in {source}" if source else ""
    return f"invalid settings{where}: " + "; ".join(parts)


def load_yaml(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise UserError(f"--config {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise UserError(f"--config {path} is not valid YAML: {str(error).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"--config {path} must hold a mapping of option names to values")
    return {key.replace("-", "_"): value for key, value in data.items()}


def resolve(model: type[BaseModel], config_file: Path | None, flags: dict[str, Any], check_inputs: bool = False) -> Any:
    """Defaults from `config_file`, overridden by the flags the user passed (None = not passed).

    `check_inputs`: also check that input files and image sources exist and that names (tasks,
    archs) are known, without loading torch, so every bad setting is reported in one line."""
    values = load_yaml(config_file) if config_file else {}
    values.update({key: value for key, value in flags.items() if value is not None})
    try:
        return model.model_validate(values, context={"check_inputs": check_inputs})
    except ValidationError as error:
        raise UserError(format_validation_error(error, str(config_file) if config_file else "")) from None


class TrainConfig(StageConfig):
    """Options of the shared training loop, common to every training stage. The defaults are the
    small-image recipe measured in bench/recipes.py (AdamW, one-cycle, an epoch count from the
    dataset size); the papers' ImageNet recipes are a flag away (`--optimizer sgd --lr 0.1 --schedule cosine`).
    Full-size archs without batch norm (vgg16, alexnet) take their papers' SGD recipe instead when neither
    --lr nor --optimizer is set (`train.recipe.with_arch_recipe`). A run whose loss is not finite, or stays
    above 3x its task's chance loss after warm-up, is stopped with advice (`train.loop.DivergenceCheck`)."""

    epochs: int | None = Field(None, ge=1, le=100_000,
                               description="default: enough to see ~60k images, 10 to 100 epochs (60 for 1,000 images, 10 for 60,000)")
    batch_size: int = Field(64, ge=1, le=65536, description="images per batch")
    lr: float = Field(0.002, gt=0, le=10, description="peak learning rate (after warm-up; one-cycle's peak); plain "
                      "vgg16/alexnet: 0.01 with SGD unless --lr or --optimizer is given")
    optimizer: Literal["sgd", "adamw", "lars"] = Field(
        "adamw", description="adamw, sgd, or lars (SimCLR's large-batch SGD: per-layer trust ratio; biases and norm "
        "parameters get neither it nor weight decay); plain vgg16/alexnet: sgd, momentum 0.9, weight decay 5e-4, "
        "cosine, unless --lr or --optimizer is given")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum")
    weight_decay: float = Field(0.05, ge=0, le=1, description="weight decay")
    warmup_epochs: float = Field(0.0, ge=0, description="linear warm-up before a cosine or constant schedule "
                                 "(one-cycle has its own)")
    schedule: Literal["onecycle", "cosine", "constant"] = Field(
        "onecycle", description="onecycle (rise over 30% of the steps, cosine fall), cosine (after --warmup-epochs) "
        "or constant")
    seed: int = Field(0, description="random seed")
    deterministic: bool = Field(False, description="deterministic algorithms: identical weights after a resume")
    compile: bool = Field(False, description="torch.compile the network (a warm-up of seconds to minutes before the "
                          "first step, reported; faster steps where the compiler wins, see bench/README.md)")
    checkpoint_minutes: float = Field(10.0, gt=0, le=10_000, description="inside an epoch, <out>.partial is also "
                                      "written every this many minutes, so a kill -9 loses at most that much of an "
                                      "epoch (ImageNet's take hours); the re-run resumes at that step")
    # how the network runs, not what it learns
    DISPLAY_ONLY: ClassVar[frozenset[str]] = StageConfig.DISPLAY_ONLY | {"compile", "checkpoint_minutes"}


class ClassifierTrainConfig(TrainConfig):
    """A network learning classes from images (supervised, pseudo-labels, finetuning): batched
    augmentation on the device, label smoothing."""

    min_scale: float = Field(1.0, gt=0, le=1, description="smallest area fraction of the random resized crop (1: no crop)")
    shift: float | None = Field(None, ge=0, le=256, description="largest random shift in pixels (default: image side / 14, 2 px at 28-32 px)")
    flip: bool = Field(True, description="random horizontal flips")
    label_smoothing: float = Field(0.1, ge=0, lt=1, description="cross-entropy label smoothing")


class PretextConfig(TrainConfig):
    # the monitor only reads the network: it changes the metrics file, never the weights
    DISPLAY_ONLY: ClassVar[frozenset[str]] = TrainConfig.DISPLAY_ONLY | {"monitor_data", "monitor_every"}

    task: str = Field(description="pretext task, by family: handcrafted (jigsaw, jigsawpp, rotation, context, "
                      "colorization, inpainting), contrastive (simclr, simclr2, moco, moco2, pirl), clustering "
                      "(deepcluster, sela, swav), reconstructive (autoencoder)")
    arch: str = Field(description="backbone architecture")
    data: str = Field(description=f"unlabelled images: {SOURCE_FORMS}")
    width: float | None = Field(None, gt=0, le=4, description="channel multiplier of *_lowres alexnet/vgg")
    image_size: int | None = Field(None, ge=16, le=1024, description="side of the square crop a sample is cut from")
    task_options: dict[str, Any] = Field(default_factory=dict, description="task-specific options")

    @field_validator("task")
    @classmethod
    def _known_task(cls, value: str) -> str:
        if value not in TASKS:
            raise ValueError(unknown_task(value))
        return value
    monitor_data: str | None = Field(None, description="labelled images for the online kNN monitor (top-1 of trunk features)")
    monitor_every: int = Field(1, ge=1, description="epochs between two kNN monitor measurements")


class RetrainConfig(ClassifierTrainConfig):
    labels: Path = Field(description="labels.h5 from `ssl pseudolabel` (joined to --data by sample id)")
    data: str = Field(description=f"the images the labels name: {SOURCE_FORMS}")
    arch: str = Field(description="the target (usually shallower) architecture, trained from scratch")
    width: float | None = Field(None, gt=0, le=4, description="channel multiplier of *_lowres alexnet/vgg")
    image_size: int | None = Field(None, ge=16, le=1024, description="training size (default: the images' own size when the source knows it and the arch takes it; else the arch's input size)")
    sampling: Literal["natural", "uniform"] = Field("natural", description="uniform: every pseudo-label class equally often (DeepCluster)")
    grayscale_prob: float = Field(0.0, ge=0, le=1, description="probability of a grey-scale image")
    color_jitter: float = Field(0.0, ge=0, le=1, description="brightness/contrast/saturation jitter strength")


class SupervisedConfig(ClassifierTrainConfig):
    """`ssl train`: an arch learns labelled images from scratch (the supervised baseline)."""

    DISPLAY_ONLY: ClassVar[frozenset[str]] = ClassifierTrainConfig.DISPLAY_ONLY | {"eval_batch_size"}
    INPUT_PATHS: ClassVar[frozenset[str]] = ClassifierTrainConfig.INPUT_PATHS | {"eval_data"}

    data: str = Field(description="labelled training images (class subfolders, an images .h5 with targets, fashion-mnist:DIR)")
    eval_data: str | None = Field(None, description="labelled evaluation images (default: the test split of a fashion-mnist source; none: no evaluation)")
    arch: str = Field(description="architecture trained from scratch (`ssl archs`; convnet_bn_lowres for small images)")
    width: float | None = Field(None, gt=0, le=4, description="channel multiplier of *_lowres alexnet/vgg (default: the arch's)")
    dropout: float | None = Field(None, ge=0, lt=1, description="dropout of the classifier's linear layers (default: the arch's)")
    image_size: int | None = Field(None, ge=16, le=1024, description="training size (default: the images' own size when the source knows it and the arch takes it, e.g. 28 for fashion-mnist; else the arch's input size)")
    labels_per_class: int | None = Field(None, ge=1, description="train on a deterministic subset of N images per class (by --seed)")
    eval_batch_size: int = Field(256, ge=1)


class FinetuneConfig(ClassifierTrainConfig):
    DISPLAY_ONLY: ClassVar[frozenset[str]] = ClassifierTrainConfig.DISPLAY_ONLY | {"eval_batch_size"}

    model: Path = Field(description="checkpoint to evaluate (pretext, retrain or any ssl-cli model)")
    data: str = Field(description="labelled training images (targets from class subfolders or the dataset)")
    eval_data: str | None = Field(None, description="labelled evaluation images (default: the source's test split)")
    mode: Literal["full", "linear", "knn"] = Field("linear", description="full finetuning, linear probes per "
                                                   "layer, or cosine kNN")
    layers: list[str] | None = Field(None, description="linear: layers probed at once (default: the arch's conv layers); knn: the first is used")
    freeze_through: str | None = Field(None, description="full: keep this layer and every earlier one fixed")
    labels_per_class: int | None = Field(None, ge=1, description="train on a deterministic subset of N images per class")
    linear_dims: int = Field(9216, ge=16, description="linear: conv maps are average-pooled to at most this many values")
    linear_norm: bool = Field(True, description="linear: standardise every pooled value before its classifier (a batch "
                              "norm without scale or shift, as in MAE's linear probe), so a layer whose activations are "
                              "20x smaller is probed as well at the same learning rate")
    knn_k: int = Field(20, ge=1, description="knn: neighbours that vote")
    knn_temperature: float = Field(0.07, gt=0, description="knn: votes weighted by exp(cosine / T)")
    image_size: int | None = Field(None, ge=16, le=1024, description="default: the checkpoint's input size")
    eval_batch_size: int = Field(256, ge=1)


class SelfTrainConfig(TrainConfig):
    """Teacher-student rounds (Noisy Student). Field groups say which round files each setting reaches,
    so that adding rounds or changing the pseudo-label policy keeps what it does not affect."""

    DISPLAY_ONLY: ClassVar[frozenset[str]] = TrainConfig.DISPLAY_ONLY | {"eval_batch_size"}
    INPUT_PATHS: ClassVar[frozenset[str]] = TrainConfig.INPUT_PATHS | {"labelled", "unlabelled", "eval_data", "teacher"}
    POLICY: ClassVar[frozenset[str]] = frozenset({"threshold", "balance", "soft", "temperature"})
    STUDENT_ONLY: ClassVar[frozenset[str]] = frozenset({"student_arch", "student_width", "unlabelled_weight",
                                                        "unlabelled_ratio"})

    out: Path = Field(description="output folder: round-0 .. round-R, summary.json")
    batch_size: int = Field(64, ge=1, le=65536, description="labelled images per batch; each brings "
                            "--unlabelled-ratio pseudo-labelled ones")
    labelled: str = Field(description="labelled images (class subfolders or a labelled dataset)")
    unlabelled: str = Field(description="images the teacher labels (their own labels, if any, are never used)")
    eval_data: str | None = Field(None, description="labelled evaluation images (default: the labelled source's test split)")
    teacher: Path | None = Field(None, description="first teacher checkpoint (default: round 0 trains one on the labelled images)")
    rounds: int = Field(2, ge=0, le=100, description="self-training rounds after round 0 (0: only the labelled-only model)")
    arch: str | None = Field(None, description="architecture trained here (default: the teacher's)")
    student_arch: str | None = Field(None, description="students' architecture, same or larger than the teacher (default: --arch)")
    width: float | None = Field(None, gt=0, le=4, description="channel multiplier of *_lowres alexnet/vgg for --arch")
    student_width: float | None = Field(None, gt=0, le=4, description="channel multiplier of the students (default: --width)")
    image_size: int | None = Field(None, ge=16, le=1024, description="training crop size (default: the arch's input size)")
    labels_per_class: int | None = Field(None, ge=1, description="use a deterministic subset of N labelled images per class")
    threshold: float = Field(0.3, ge=0, le=1, description="keep pseudo-labels whose confidence is at least this")
    balance: int | None = Field(None, ge=1, description="keep the N most confident images per class, repeating short classes")
    soft: bool = Field(False, description="train on the teacher's probabilities instead of its hard labels")
    temperature: float = Field(1.0, gt=0, description="soft labels: softmax(logits / T)")
    unlabelled_weight: float = Field(1.0, ge=0, description="loss = labelled CE + this x pseudo-labelled CE")
    unlabelled_ratio: int = Field(1, ge=1, le=64, description="pseudo-labelled images per labelled image in a batch")
    randaugment_ops: int = Field(2, ge=0, le=10, description="RandAugment operations per image (0: off)")
    randaugment_magnitude: int = Field(5, ge=0, le=30, description="RandAugment magnitude (0-30); Noisy Student's ImageNet 9 is scaled down for small images: at 28 px, 2 ops at 9 with a 0.2 crop cost 6 points of top-1 (bench/recipes.py, measured with the per-image PIL ops that the batched ops now reproduce exactly), 2 at 5 about none")
    dropout: float = Field(0.5, ge=0, lt=1, description="dropout before the classifier's linear layers")
    stochastic_depth: float = Field(0.2, ge=0, lt=1, description="ResNets: drop probability of the last block (linear in depth)")
    min_scale: float = Field(1.0, gt=0, le=1, description="smallest area fraction of the random resized crop (1: no crop)")
    shift: float | None = Field(None, ge=0, le=256, description="largest random shift in pixels (default: image side / 14, 2 px at 28-32 px)")
    flip: bool = Field(True, description="random horizontal flips")
    eval_batch_size: int = Field(256, ge=1)
