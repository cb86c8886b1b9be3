"""Load, merge, validate and save the training configuration.

Merge order: the default YAML (dinocell/configs/ssl_default_config.yaml) <- `--config-file` (which may extend another
file through `_base_: other.yaml`, resolved relative to itself, recursively) <- command-line dotlist overrides.

The schema is the default YAML itself: every key a user sets must exist there, and its value must have the type of
the default value (an int is accepted where a float is expected). Keys whose default is null, or that may be set to
null, are typed in NULLABLE_TYPES below. Value rules (positive sizes, ordered ranges, enum choices, a dataset string
that parses) are checked for the keys that exist, so sections other parts add are validated by type automatically;
two naming conventions apply to every key: `*probability*` lies in [0, 1], `*_range` is [low, high], 0 <= low <= high.
"""

from __future__ import annotations

import difflib
import pathlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from omegaconf import DictConfig, OmegaConf

DEFAULT_CONFIG = pathlib.Path(__file__).parent / "configs" / "ssl_default_config.yaml"
BASE_KEY = "_base_"

# key -> type its non-null value must have, for keys that may be null ((list, float): a list of numbers)
NULLABLE_TYPES: dict[str, Any] = {
    "crops.channel_mean": (list, float),
    "crops.channel_std": (list, float),
    "student.layerscale": float,
    "student.pos_embed_rope_shift_coords": float,
    "student.pos_embed_rope_jitter_coords": float,
    "student.pos_embed_rope_rescale_coords": float,
    "student.pretrained_weights": str,
}

ARCHS = ("vit_test", "vit_tiny", "vit_small", "vit_small_plus", "vit_base", "vit_large", "vit_huge_plus", "vit_7b")
CHOICES: dict[str, tuple[str, ...]] = {
    "student.arch": ARCHS,
    "train.centering": ("sinkhorn_knopp", "centering"),
    "optim.scaling_rule": ("sqrt_wrt_1024", "linear_wrt_256", "none"),
    "compute_precision.autocast_dtype": ("bf16", "fp16", "fp32"),
}
POSITIVE = (
    "student.patch_size",
    "student.in_chans",
    "dino.head_n_prototypes",
    "dino.head_bottleneck_dim",
    "dino.head_nlayers",
    "dino.head_hidden_dim",
    "ibot.head_n_prototypes",
    "ibot.head_bottleneck_dim",
    "ibot.head_nlayers",
    "ibot.head_hidden_dim",
    "teacher.teacher_temp",
    "teacher.warmup_teacher_temp",
    "train.batch_size_per_gpu",
    "train.OFFICIAL_EPOCH_LENGTH",
    "train.log_every",
    "train.max_consecutive_nonfinite",
    "optim.epochs",
    "optim.lr",
    "crops.global_crops_size",
    "crops.local_crops_size",
    "checkpointing.period",
    "checkpointing.max_to_keep",
    "evaluation.knn_k",
    "evaluation.knn_temperature",
    "optim.layerwise_decay",
)
NON_NEGATIVE = (
    "teacher.momentum_teacher",
    "teacher.final_momentum_teacher",
    "optim.adamw_beta1",
    "optim.adamw_beta2",
    "student.n_storage_tokens",
    "student.drop_path_rate",
    "teacher.warmup_teacher_temp_epochs",
    "dino.loss_weight",
    "dino.koleo_loss_weight",
    "ibot.loss_weight",
    "train.num_workers",
    "train.seed",
    "optim.min_lr",
    "optim.warmup_epochs",
    "optim.weight_decay",
    "optim.weight_decay_end",
    "optim.clip_grad",
    "optim.patch_embed_lr_mult",
    "optim.freeze_last_layer_epochs",
    "crops.local_crops_number",
    "evaluation.eval_period_iterations",
)
AT_MOST_ONE = (
    "student.drop_path_rate",
    "teacher.momentum_teacher",
    "teacher.final_momentum_teacher",
    "ibot.mask_sample_probability",
    "optim.adamw_beta1",
    "optim.adamw_beta2",
    "optim.layerwise_decay",
)
# dataset strings parsed (not built) by the registry; "" means "none" where the YAML says so
DATASET_STRINGS = ("train.dataset_path", "evaluation.knn_train_dataset", "evaluation.knn_test_dataset")
# ranges [low, high] with 0 < low <= high <= 1 (ratios may start at 0)
UNIT_RANGES = {"crops.global_crops_scale": False, "crops.local_crops_scale": False, "ibot.mask_ratio_min_max": True}


class ConfigError(ValueError):
    """A configuration key that does not exist, or a value of the wrong type or out of range."""


def load_config(config_file: str | pathlib.Path | None = None, overrides: Sequence[str] = ()) -> DictConfig:
    """Default YAML <- `config_file` (and its `_base_` chain) <- dotlist `overrides`; validated and resolved."""
    default = OmegaConf.load(DEFAULT_CONFIG)
    layers: list[tuple[DictConfig, str]] = []
    if config_file is not None:
        layers += _file_layers(pathlib.Path(config_file), ())
    if overrides:
        try:
            layers.append((OmegaConf.from_dotlist(list(overrides)), "the command line"))
        except Exception as err:
            raise ConfigError(f"could not parse command-line overrides {list(overrides)}: {err}") from None
    origins: dict[str, str] = {}
    reference = OmegaConf.to_container(default)
    for layer, origin in layers:
        plain = OmegaConf.to_container(layer)
        _check_known_keys(plain, reference, origin)
        origins.update({key: origin for key, _ in _leaves(plain)})
    cfg = OmegaConf.merge(default, *(layer for layer, _ in layers))
    OmegaConf.resolve(cfg)
    validate_config(cfg, origins)
    return cfg


def validate_config(cfg: DictConfig, origins: dict[str, str] | None = None) -> None:
    """Raise ConfigError for an unknown key, a wrong type, or an impossible value; `origins` maps keys to sources."""
    origins = origins or {}
    reference = OmegaConf.to_container(OmegaConf.load(DEFAULT_CONFIG))
    _check_known_keys(OmegaConf.to_container(cfg), reference, "the configuration")
    _check_types(cfg, reference, origins)
    values = dict(_leaves(OmegaConf.to_container(cfg, resolve=True)))

    def fail(key: str, message: str) -> None:
        source = f" (set in {origins[key]})" if key in origins else ""
        raise ConfigError(f"{key}={values[key]!r}{source}: {message}")

    for key, choices in CHOICES.items():
        if key in values and values[key] not in choices:
            close = difflib.get_close_matches(str(values[key]), choices, n=1)
            fail(key, f"must be one of {', '.join(choices)}" + (f"; closest '{close[0]}'" if close else ""))
    for key in POSITIVE:
        if values.get(key) is not None and values[key] <= 0:
            fail(key, "must be > 0")
    for key in NON_NEGATIVE:
        if values.get(key) is not None and values[key] < 0:
            fail(key, "must be >= 0")
    for key in AT_MOST_ONE:
        if values.get(key) is not None and values[key] > 1:
            fail(key, "must be <= 1")
    for key, value in values.items():  # naming conventions of the YAML, so new keys get the rule too
        if "probability" in key and value is not None and not 0 <= value <= 1:
            fail(key, "a probability must lie in [0, 1]")
    for key, zero_ok in UNIT_RANGES.items():
        if key in values:
            pair = values[key]
            ordered = len(pair) == 2 and (pair[0] >= 0 if zero_ok else pair[0] > 0) and pair[0] <= pair[1] <= 1
            if not ordered:
                bound = "0 <=" if zero_ok else "0 <"
                fail(key, f"must be [low, high] with {bound} low <= high <= 1")
    for key, message in _relation_errors(values):
        fail(key, message)
    for key in DATASET_STRINGS:
        if values.get(key) or key == "train.dataset_path" and key in values:
            _check_dataset_string(key, values[key], fail)
    _check_crop_settings(cfg, origins)


def config_to_yaml(cfg: DictConfig) -> str:
    """The resolved configuration as YAML text (what `--print-config` shows and config.yaml holds)."""
    return OmegaConf.to_yaml(cfg, resolve=True)


def save_config(cfg: DictConfig, path: str | pathlib.Path) -> pathlib.Path:
    """Write the resolved configuration (atomically: a crash never leaves half a file)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(config_to_yaml(cfg))
    tmp.replace(path)
    return path


def _relation_errors(values: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(key, message) for values that contradict each other; a rule applies when its keys exist."""
    crops = ("crops.global_crops_size", "crops.local_crops_size", "crops.local_crops_number", "student.patch_size")
    if not all(k in values for k in crops):
        return
    global_size, local_size, n_local, patch = (values[k] for k in crops)
    if patch and global_size % patch:
        yield "crops.global_crops_size", f"is not a multiple of student.patch_size={patch}"
    if n_local > 0 and local_size >= global_size:
        yield "crops.local_crops_size", f"local crops must be smaller than global crops ({global_size} px)"
    if n_local > 0 and patch and local_size % patch:
        yield "crops.local_crops_size", f"is not a multiple of student.patch_size={patch}"


def _file_layers(path: pathlib.Path, chain: tuple[pathlib.Path, ...]) -> list[tuple[DictConfig, str]]:
    """The file and its `_base_` ancestors, base first, each with a label naming the file."""
    path = path.expanduser().resolve()
    if path in chain:
        cycle = " -> ".join(str(p) for p in (*chain, path))
        raise ConfigError(f"config files extend each other in a cycle: {cycle}")
    if not path.is_file():
        where = f" (named as {BASE_KEY} in {chain[-1]})" if chain else ""
        raise ConfigError(f"config file '{path}' does not exist{where}")
    layer = OmegaConf.load(path)
    if not isinstance(layer, DictConfig):
        raise ConfigError(f"config file '{path}' must hold a mapping of sections, not a {type(layer).__name__}")
    layers: list[tuple[DictConfig, str]] = []
    if BASE_KEY in layer:
        base = layer.pop(BASE_KEY)
        if not isinstance(base, str):
            raise ConfigError(f"{BASE_KEY} in '{path}' must be one file name, got {base!r}")
        layers = _file_layers(path.parent / base, (*chain, path))
    return [*layers, (layer, f"config file '{path}'")]


def _leaves(node: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, value) for every leaf of a plain nested dict; lists are leaves."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _leaves(value, f"{prefix}{key}.")
    else:
        yield prefix[:-1], node


def _check_known_keys(layer: dict, reference: dict, origin: str, prefix: str = "") -> None:
    for key, value in layer.items():
        dotted = f"{prefix}{key}"
        if key not in reference:
            wrong = next(iter(_leaves(value, f"{dotted}.")))[0] if isinstance(value, dict) and value else dotted
            valid = [k for k, _ in _leaves(reference, prefix)]
            close = difflib.get_close_matches(wrong, valid, n=1, cutoff=0.5) or [
                f"{prefix}{k}" for k in difflib.get_close_matches(str(key), list(reference), n=1, cutoff=0.4)
            ]
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"unknown config key '{wrong}' in {origin}.{hint}")
        if isinstance(reference[key], dict):
            if not isinstance(value, dict):
                raise ConfigError(f"'{dotted}' in {origin} is a section; set its keys, e.g. {dotted}.<key>=...")
            _check_known_keys(value, reference[key], origin, f"{dotted}.")


def _check_types(cfg: DictConfig, reference: dict, origins: dict[str, str]) -> None:
    """Compare every leaf with the type of its default; ints given for floats are stored as floats."""
    defaults = dict(_leaves(reference))
    for key, value in _leaves(OmegaConf.to_container(cfg, resolve=True)):
        if value is None and (key in NULLABLE_TYPES or defaults[key] is None):
            continue
        expected = _expected_type(key, defaults[key])
        if not _is_instance(value, expected):
            source = f" (set in {origins[key]})" if key in origins else ""
            nullable = " or null" if key in NULLABLE_TYPES else ""
            raise ConfigError(f"{key}={value!r}{source}: expected {_type_label(expected)}{nullable}")
        if expected is float and isinstance(value, int):
            OmegaConf.update(cfg, key, float(value))
        elif expected == (list, float) and any(isinstance(v, int) for v in value):
            OmegaConf.update(cfg, key, [float(v) for v in value])


def _expected_type(key: str, default_value: Any) -> Any:
    if key in NULLABLE_TYPES:
        return NULLABLE_TYPES[key]
    if default_value is None:
        return object  # a null default not typed in NULLABLE_TYPES: anything goes (add it to the table)
    if isinstance(default_value, list):
        return (list, type(default_value[0]) if default_value else object)
    return type(default_value)


def _is_instance(value: Any, expected: Any) -> bool:
    if isinstance(expected, tuple):  # (list, item type)
        return isinstance(value, list) and all(_is_instance(v, expected[1]) for v in value)
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, expected)


def _type_label(expected: Any) -> str:
    if isinstance(expected, tuple):
        return f"a list of {_type_label(expected[1])}"
    return {float: "a number", int: "an integer", bool: "true or false", str: "a string"}.get(
        expected, expected.__name__
    )


def _check_crop_settings(cfg: DictConfig, origins: dict[str, str]) -> None:
    """The crop pipeline's own rules (views, per-group probabilities, factor ranges, mean/std) live with it; running
    them here makes a bad value fail at start-up, not after the model is built."""
    if "crops" not in cfg:
        return
    from dinocell.data.loaders import build_crop_settings

    try:
        build_crop_settings(cfg)
    except ValueError as err:
        key = str(err).split("=", 1)[0].split(" ", 1)[0]  # messages start with the key, e.g. "crops.blur_sigma=..."
        sources = sorted({origin for k, origin in origins.items() if k == key or k.startswith(key + ".")})
        raise ConfigError(f"{err}" + (f" (set in {', '.join(sources)})" if sources else "")) from None


def _check_dataset_string(key: str, dataset_str: Any, fail: Callable[[str, str], None]) -> None:
    """Parse (not build) the dataset string, so a typo fails at start-up rather than after model set-up."""
    import dinocell.data  # noqa: F401  (registers the dataset families)
    from dinocell.data.registry import DatasetStringError, parse_dataset_string

    try:
        parse_dataset_string(dataset_str)
    except DatasetStringError as err:
        fail(key, str(err))
