"""The configuration schema: one typed dataclass per YAML section, each with its own value rules.

These dataclasses are the settings the modules take (`MultiCropTransform(cfg.crops, ...)`,
`build_backbone(cfg.student.arch, **cfg.student.backbone_kwargs())`, `build_optimizer(groups, cfg.optim)`), so a key is
declared, typed and checked in exactly one place. `dinocell/configs/ssl_default_config.yaml` is their documented face
(a test keeps the two in step). Names that belong to another layer (backbone architectures, dataset strings) are
checked by that layer when a command starts (dinocell.commands.common), so this module imports no other part of
dinocell.

Each section's `problems()` yields `(key, message)` for every impossible value; `SSLConfig.problems()` adds the rules
that relate sections. The loader (dinocell.config.loading) turns the first one into a ConfigError naming the value and
where it was set.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any

Problems = Iterator[tuple[str, str]]

GLOBAL_CROP_GROUPS = ("global1", "global2")  # DINO's two global crops, each with its own augmentation settings
CROP_GROUPS = (*GLOBAL_CROP_GROUPS, "local")
CHANNEL_VIEWS = ("all", "mean", "single")
CENTERINGS = ("sinkhorn_knopp", "centering")
METHODS = ("dino", "simclr")  # DINO + iBOT + KoLeo (student/teacher), or SimCLR (NT-Xent on two views)
BEST_METRICS = {"val_loss": "min", "knn_top1": "max"}  # checkpointing.best_metric -> which direction is better
PARALLELISMS = ("ddp", "fsdp")  # a whole model per process (DDP), or sharded over the processes (FSDP2)
AUTOCAST_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}  # config name -> torch dtype name
# lr scaling with the global batch: rule -> factor of optim.lr
SCALING_RULES: dict[str, Callable[[int], float]] = {
    "sqrt_wrt_1024": lambda global_batch: math.sqrt(global_batch / 1024),
    "linear_wrt_256": lambda global_batch: global_batch / 256,
    "none": lambda global_batch: 1.0,
}


def _choice(value: str, choices: Any) -> Iterator[str]:
    """The message for a value outside `choices` (with the closest choice), or nothing."""
    if value not in choices:
        import difflib

        close = difflib.get_close_matches(str(value), list(choices), n=1)
        yield f"must be one of {', '.join(choices)}" + (f"; closest '{close[0]}'" if close else "")


def _positive(section: Any, *names: str) -> Problems:
    for name in names:
        value = getattr(section, name)
        if value is not None and value <= 0:
            yield name, "must be > 0"


def _non_negative(section: Any, *names: str) -> Problems:
    for name in names:
        value = getattr(section, name)
        if value is not None and value < 0:
            yield name, "must be >= 0"


def _unit_interval(section: Any, *names: str) -> Problems:
    for name in names:
        if not 0.0 <= getattr(section, name) <= 1.0:
            yield name, "must lie in [0, 1]"


def _ordered_range(section: Any, name: str, low_bound: float, *, at_most_one: bool = False, strict: bool = False):
    """A [low, high] pair with low_bound <= low (or < with `strict`) <= high (<= 1 with `at_most_one`)."""
    pair = getattr(section, name)
    ok = len(pair) == 2 and (pair[0] > low_bound if strict else pair[0] >= low_bound) and pair[0] <= pair[1]
    if ok and at_most_one:
        ok = pair[1] <= 1.0
    if not ok:
        bound = f"{low_bound:g} {'<' if strict else '<='} low <= high" + (" <= 1" if at_most_one else "")
        yield name, f"must be [low, high] with {bound}"


def _prefixed(prefix: str, problems: Problems) -> Problems:
    for key, message in problems:
        yield f"{prefix}.{key}", message


@dataclass
class StudentConfig:
    """The backbone: its architecture and the arguments `dinocell.models.build_backbone` takes."""

    arch: str = "vit_small"
    patch_size: int = 16
    in_chans: int = 5
    n_storage_tokens: int = 4
    drop_path_rate: float = 0.0
    layerscale: float | None = 1.0e-5
    pos_embed_rope_shift_coords: float | None = None
    pos_embed_rope_jitter_coords: float | None = None
    pos_embed_rope_rescale_coords: float | None = 2.0
    pretrained_weights: str | None = None

    @property
    def is_vit(self) -> bool:
        """ViT architectures are named vit_*; the other family (resnet*) has no patches, tokens or RoPE."""
        return self.arch.startswith("vit_")

    def backbone_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of `build_backbone(self.arch, ...)` (training-only options are inert in eval mode)."""
        if not self.is_vit:
            return {"in_chans": self.in_chans}
        return {
            "patch_size": self.patch_size,
            "in_chans": self.in_chans,
            "n_storage_tokens": self.n_storage_tokens,
            "drop_path_rate": self.drop_path_rate,
            "layerscale_init": self.layerscale,
            "pos_embed_rope_shift_coords": self.pos_embed_rope_shift_coords,
            "pos_embed_rope_jitter_coords": self.pos_embed_rope_jitter_coords,
            "pos_embed_rope_rescale_coords": self.pos_embed_rope_rescale_coords,
        }

    def problems(self) -> Problems:
        yield from _positive(self, "patch_size", "in_chans", "layerscale")
        yield from _non_negative(self, "n_storage_tokens", "pos_embed_rope_shift_coords")
        yield from _unit_interval(self, "drop_path_rate")
        for name in ("pos_embed_rope_jitter_coords", "pos_embed_rope_rescale_coords"):
            value = getattr(self, name)  # a factor drawn log-uniformly from [1/value, value]
            if value is not None and value < 1:
                yield name, "must be >= 1 (a factor drawn from [1/value, value]) or null"


@dataclass
class TeacherConfig:
    momentum_teacher: float = 0.992
    final_momentum_teacher: float = 1.0
    warmup_teacher_temp: float = 0.04
    teacher_temp: float = 0.07
    warmup_teacher_temp_epochs: int = 30

    def problems(self) -> Problems:
        yield from _unit_interval(self, "momentum_teacher", "final_momentum_teacher")
        yield from _positive(self, "warmup_teacher_temp", "teacher_temp")
        yield from _non_negative(self, "warmup_teacher_temp_epochs")


@dataclass
class DinoConfig:
    loss_weight: float = 1.0
    global_ignore_diagonal: bool = True
    head_n_prototypes: int = 65536
    head_bottleneck_dim: int = 256
    head_nlayers: int = 3
    head_hidden_dim: int = 2048
    koleo_loss_weight: float = 0.1
    koleo_loss_distributed: bool = True

    def problems(self) -> Problems:
        yield from _positive(self, "head_n_prototypes", "head_bottleneck_dim", "head_nlayers", "head_hidden_dim")
        yield from _non_negative(self, "loss_weight", "koleo_loss_weight")


@dataclass
class IBotConfig:
    loss_weight: float = 1.0
    mask_sample_probability: float = 0.5
    mask_ratio_min_max: list[float] = field(default_factory=lambda: [0.1, 0.5])
    separate_head: bool = True
    head_n_prototypes: int = 65536
    head_bottleneck_dim: int = 256
    head_nlayers: int = 3
    head_hidden_dim: int = 2048

    def problems(self) -> Problems:
        yield from _non_negative(self, "loss_weight")
        yield from _unit_interval(self, "mask_sample_probability")
        yield from _ordered_range(self, "mask_ratio_min_max", 0.0, at_most_one=True)
        yield from _positive(self, "head_n_prototypes", "head_bottleneck_dim", "head_nlayers", "head_hidden_dim")


@dataclass
class SimCLRConfig:
    """SimCLR (method: simclr): the projection head on the backbone feature and NT-Xent's temperature."""

    temperature: float = 0.1
    head_nlayers: int = 2
    head_hidden_dim: int = 2048
    head_out_dim: int = 128
    head_batchnorm: bool = True
    sync_batchnorm: bool = True

    def problems(self) -> Problems:
        yield from _positive(self, "temperature", "head_nlayers", "head_hidden_dim", "head_out_dim")


@dataclass
class TrainConfig:
    dataset_path: str = "SyntheticCellPainting"
    output_dir: str = "./output"
    batch_size_per_gpu: int = 64
    grad_accum_steps: int = 1
    num_workers: int = 8
    seed: int = 0
    OFFICIAL_EPOCH_LENGTH: int = 1250
    centering: str = "sinkhorn_knopp"
    log_every: int = 10
    max_consecutive_nonfinite: int = 10
    early_stopping_patience: int = 0
    early_stopping_min_delta: float = 0.0
    parallelism: str = "ddp"
    dist_timeout_min: float = 30.0
    compile: bool = False
    activation_checkpointing: bool = False

    def problems(self) -> Problems:
        yield from _positive(
            self, "batch_size_per_gpu", "grad_accum_steps", "OFFICIAL_EPOCH_LENGTH", "log_every",
            "max_consecutive_nonfinite", "dist_timeout_min",
        )
        yield from _non_negative(self, "num_workers", "seed", "early_stopping_patience", "early_stopping_min_delta")
        for message in _choice(self.centering, CENTERINGS):
            yield "centering", message
        for message in _choice(self.parallelism, PARALLELISMS):
            yield "parallelism", message


@dataclass
class OptimConfig:
    """AdamW with DINO-style schedules; `scaled_lr` applies the batch-size scaling rule."""

    epochs: int = 100
    lr: float = 1.0e-3
    scaling_rule: str = "sqrt_wrt_1024"
    min_lr: float = 1.0e-6
    warmup_epochs: int = 10
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    adamw_beta1: float = 0.9
    adamw_beta2: float = 0.999
    clip_grad: float = 3.0
    layerwise_decay: float = 0.9
    patch_embed_lr_mult: float = 0.2
    freeze_last_layer_epochs: int = 1

    def scaled_lr(self, global_batch_size: int) -> float:
        """The peak learning rate actually used: `lr` scaled by `scaling_rule` for the global batch."""
        return self.lr * SCALING_RULES[self.scaling_rule](global_batch_size)

    def problems(self) -> Problems:
        yield from _positive(self, "epochs", "lr", "layerwise_decay")
        yield from _non_negative(
            self, "min_lr", "warmup_epochs", "weight_decay", "weight_decay_end", "clip_grad", "patch_embed_lr_mult",
            "freeze_last_layer_epochs",
        )
        yield from _unit_interval(self, "adamw_beta1", "adamw_beta2")
        if self.layerwise_decay > 1:
            yield "layerwise_decay", "must be <= 1"
        for message in _choice(self.scaling_rule, SCALING_RULES):
            yield "scaling_rule", message


@dataclass
class ChannelViews:
    """Channels each crop group sees: all | mean (average of the channels) | single (one random channel)."""

    global1: str = "all"
    global2: str = "all"
    local: str = "all"

    def __getitem__(self, group: str) -> str:
        return getattr(self, group)


@dataclass
class GroupProbabilities:
    """A chance per crop group (global1, global2, local)."""

    global1: float = 0.0
    global2: float = 0.0
    local: float = 0.0

    def __getitem__(self, group: str) -> float:
        return getattr(self, group)


@dataclass
class CropsConfig:
    """The multi-crop pipeline's settings (dinocell.pipeline.transforms.MultiCropTransform takes them as they are)."""

    global_crops_size: int = 224
    global_crops_scale: list[float] = field(default_factory=lambda: [0.32, 1.0])
    local_crops_number: int = 8
    local_crops_size: int = 96
    local_crops_scale: list[float] = field(default_factory=lambda: [0.05, 0.32])
    horizontal_flips: bool = True
    vertical_flips: bool = True
    rotate90: bool = False
    channel_views: ChannelViews = field(default_factory=ChannelViews)
    local_masked_crops_fraction: float = 0.0
    photometric_aug: bool = True
    intensity_aug_probability: float = 0.8
    brightness_range: list[float] = field(default_factory=lambda: [0.6, 1.4])
    contrast_range: list[float] = field(default_factory=lambda: [0.6, 1.4])
    gamma_range: list[float] = field(default_factory=lambda: [0.8, 1.25])
    blur_probability: GroupProbabilities = field(default_factory=lambda: GroupProbabilities(1.0, 0.1, 0.5))
    blur_sigma: list[float] = field(default_factory=lambda: [0.1, 2.0])
    solarization_probability: GroupProbabilities = field(default_factory=lambda: GroupProbabilities(0.0, 0.2, 0.0))
    solarization_threshold: float = 0.5
    noise_probability: GroupProbabilities = field(default_factory=GroupProbabilities)
    noise_std: list[float] = field(default_factory=lambda: [0.0, 0.05])
    rgb_color_aug: bool = False
    rgb_color_jitter: list[float] = field(default_factory=lambda: [0.4, 0.4, 0.2, 0.1])
    channel_mean: list[float] | None = None
    channel_std: list[float] | None = None
    gpu_augmentations: bool = False

    @property
    def num_masked_local_crops(self) -> int:
        """Local crops (the first ones) whose pixels outside the sample mask are zeroed."""
        return round(self.local_masked_crops_fraction * self.local_crops_number)

    def problems(self) -> Problems:
        yield from _positive(self, "global_crops_size", "local_crops_size")
        yield from _non_negative(self, "local_crops_number")
        yield from _ordered_range(self, "global_crops_scale", 0.0, at_most_one=True, strict=True)
        yield from _ordered_range(self, "local_crops_scale", 0.0, at_most_one=True, strict=True)
        yield from _unit_interval(self, "local_masked_crops_fraction", "intensity_aug_probability")
        for name in ("brightness_range", "contrast_range", "noise_std"):
            yield from _ordered_range(self, name, 0.0)
        for name in ("gamma_range", "blur_sigma"):  # a power and a Gaussian width must be positive
            yield from _ordered_range(self, name, 0.0, strict=True)
        for group in CROP_GROUPS:
            for message in _choice(self.channel_views[group], CHANNEL_VIEWS):
                yield f"channel_views.{group}", message
            for name in ("blur_probability", "solarization_probability", "noise_probability"):
                if not 0.0 <= getattr(self, name)[group] <= 1.0:
                    yield f"{name}.{group}", "a probability must lie in [0, 1]"
        if (self.channel_mean is None) != (self.channel_std is None) or (
            self.channel_mean is not None and len(self.channel_mean) != len(self.channel_std)
        ):
            yield "channel_mean", "channel_mean and channel_std must both be null or two lists of the same length " \
                "(one value per dataset channel)"
        if self.channel_std is not None and min(self.channel_std, default=1.0) <= 0:
            yield "channel_std", "every std must be > 0"
        jitter = self.rgb_color_jitter
        if len(jitter) != 4 or not all(0.0 <= v <= 1.0 for v in jitter[:3]) or not 0.0 <= jitter[3] <= 0.5:
            yield "rgb_color_jitter", "must be [brightness, contrast, saturation, hue] strengths, the first three in " \
                "[0, 1] and hue in [0, 0.5] (DINO [0.4, 0.4, 0.2, 0.1], SimCLR [0.8, 0.8, 0.8, 0.2])"


@dataclass
class EvaluationConfig:
    """What the trainer measures on the teacher at the start, every eval period and at the end: each task runs when
    its dataset string is set."""

    eval_period_iterations: int = 12500
    knn_train_dataset: str = ""
    knn_test_dataset: str = ""
    knn_k: list[int] = field(default_factory=lambda: [20])
    knn_temperature: float = 0.07
    val_dataset: str = ""
    val_period_iterations: int = 0
    channel_consistency_dataset: str = ""
    viz_dataset: str = ""
    viz_num_images: int = 4

    @property
    def knn_enabled(self) -> bool:
        return bool(self.knn_train_dataset and self.knn_test_dataset)

    def problems(self) -> Problems:
        yield from _non_negative(self, "eval_period_iterations", "val_period_iterations")
        yield from _positive(self, "knn_temperature", "viz_num_images")
        if not self.knn_k or min(self.knn_k) <= 0 or len(set(self.knn_k)) < len(self.knn_k):
            yield "knn_k", "must be a non-empty list of different neighbour counts, each > 0 (e.g. [10, 20])"
        if bool(self.knn_train_dataset) != bool(self.knn_test_dataset):
            yield "knn_test_dataset" if self.knn_train_dataset else "knn_train_dataset", \
                "k-NN needs both knn_train_dataset and knn_test_dataset (or neither)"
        if self.val_dataset and self.val_period_iterations == 0:
            yield "val_dataset", "is set but evaluation.val_period_iterations=0: set how often to validate (e.g. 500)"


@dataclass
class CheckpointingConfig:
    period: int = 1250
    max_to_keep: int = 3
    best_metric: str = "val_loss"
    save_on_sigterm: bool = True

    def problems(self) -> Problems:
        yield from _positive(self, "period", "max_to_keep")
        for message in _choice(self.best_metric, BEST_METRICS):
            yield "best_metric", message


@dataclass
class ComputePrecisionConfig:
    autocast_dtype: str = "bf16"

    def problems(self) -> Problems:
        for message in _choice(self.autocast_dtype, AUTOCAST_DTYPES):
            yield "autocast_dtype", message


@dataclass
class LoggingConfig:
    """The metric sinks next to the JSON lines and the console (dinocell.logging.sinks)."""

    wandb: bool = False
    wandb_project: str = "dinocell"
    wandb_run_name: str = ""
    tensorboard: bool = False
    trackio: bool = False
    trackio_project: str = "dinocell"

    def problems(self) -> Problems:
        for name in ("wandb_project", "trackio_project"):
            if not getattr(self, name).strip():
                yield name, "must name a project (a non-empty string)"


@dataclass
class SSLConfig:
    """The whole training configuration."""

    method: str = "dino"
    student: StudentConfig = field(default_factory=StudentConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    dino: DinoConfig = field(default_factory=DinoConfig)
    ibot: IBotConfig = field(default_factory=IBotConfig)
    simclr: SimCLRConfig = field(default_factory=SimCLRConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    crops: CropsConfig = field(default_factory=CropsConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    checkpointing: CheckpointingConfig = field(default_factory=CheckpointingConfig)
    compute_precision: ComputePrecisionConfig = field(default_factory=ComputePrecisionConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def problems(self) -> Problems:
        """Every section's problems, then the rules that relate sections."""
        for message in _choice(self.method, METHODS):
            yield "method", message
        for section in fields(self):
            if is_dataclass(value := getattr(self, section.name)):
                yield from _prefixed(section.name, value.problems())
        if self.method == "simclr" and self.crops.local_crops_number > 0:
            yield "crops.local_crops_number", "must be 0 with method=simclr: SimCLR trains on the two global crops " \
                "(its two views, crop groups global1 and global2)"
        if self.method == "simclr" and self.train.parallelism == "fsdp":
            yield "train.parallelism", "fsdp shards DINO's student and teacher; method=simclr trains with ddp (its " \
                "encoders fit one GPU)"
        patch, crops = self.student.patch_size if self.student.is_vit else 0, self.crops
        if patch > 0 and crops.global_crops_size % patch:
            yield "crops.global_crops_size", f"is not a multiple of student.patch_size={patch}"
        if crops.local_crops_number > 0:  # the local-crop rules matter only when there are local crops
            if crops.local_crops_size >= crops.global_crops_size:
                yield "crops.local_crops_size", f"local crops must be smaller than global crops " \
                    f"({crops.global_crops_size} px)"
            if patch > 0 and crops.local_crops_size % patch:
                yield "crops.local_crops_size", f"is not a multiple of student.patch_size={patch}"
        for switch in ("compile", "activation_checkpointing"):
            if getattr(self.train, switch) and not self.student.is_vit:
                yield f"train.{switch}", f"works on ViT blocks; student.arch={self.student.arch} has none (set it to " \
                    "false)"
        yield from self._validation_problems()

    def _validation_problems(self) -> Problems:
        """Validation during training, the best checkpoint and early stopping need their data."""
        ev, metric = self.evaluation, self.checkpointing.best_metric
        if ev.val_period_iterations > 0 and metric == "val_loss" and not ev.val_dataset:
            yield "checkpointing.best_metric", "val_loss needs evaluation.val_dataset (a held-out dataset string); " \
                "or select by knn_top1 with evaluation.knn_train_dataset and knn_test_dataset"
        if ev.val_period_iterations > 0 and metric == "knn_top1" and not ev.knn_enabled:
            yield "checkpointing.best_metric", "knn_top1 needs evaluation.knn_train_dataset and knn_test_dataset"
        if self.train.early_stopping_patience > 0 and ev.val_period_iterations == 0:
            yield "train.early_stopping_patience", "needs validation: set evaluation.val_period_iterations > 0 " \
                "(and evaluation.val_dataset, or the k-NN datasets with checkpointing.best_metric=knn_top1)"


def section_types(schema: type = SSLConfig, prefix: str = "") -> dict[str, Any]:
    """Dotted key -> annotated type for every leaf of a schema dataclass (nested sections flattened)."""
    import typing

    hints = typing.get_type_hints(schema)
    out: dict[str, Any] = {}
    for f in fields(schema):
        hint = hints[f.name]
        if is_dataclass(hint):
            out.update(section_types(hint, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = hint
    return out
