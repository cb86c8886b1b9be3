"""Configuration: merge order, _base_ chains, override types, unknown keys with suggestions, type and value errors,
and the default YAML kept in step with the typed schema."""

from __future__ import annotations

import dataclasses
import pathlib
import re

import pytest
from omegaconf import OmegaConf

import dinocell
from dinocell.commands.common import load_checked_config
from dinocell.config import ConfigError, SSLConfig, config_to_yaml, load_config, save_config, validate_config
from dinocell.config.loading import leaves
from dinocell.config.schema import section_types

DEFAULT_YAML = pathlib.Path(dinocell.__file__).parent / "configs" / "ssl_default_config.yaml"


def write(path: pathlib.Path, text: str) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_defaults_alone_are_valid_and_the_yaml_documents_exactly_the_schema():
    cfg = load_config()
    assert isinstance(cfg, SSLConfig) and cfg.train.dataset_path == "SyntheticCellPainting"
    yaml_defaults = OmegaConf.to_container(OmegaConf.load(DEFAULT_YAML))
    assert yaml_defaults == OmegaConf.to_container(OmegaConf.structured(SSLConfig))  # same keys, same values
    assert set(dict(leaves(yaml_defaults))) == set(section_types())
    # every key has its one-line comment in the YAML (the documentation users read)
    for line in DEFAULT_YAML.read_text().splitlines():
        if re.match(r"^  \w+: \S", line):
            assert "#" in line, f"undocumented key in the default YAML: {line.strip()}"


def test_merge_order_default_then_base_chain_then_file_then_command_line(tmp_path):
    write(tmp_path / "bases/root.yaml", "train:\n  batch_size_per_gpu: 8\n  seed: 1\noptim:\n  epochs: 5\n")
    write(tmp_path / "bases/mid.yaml", "_base_: root.yaml\ntrain:\n  seed: 2\n")
    exp = write(tmp_path / "exp.yaml", "_base_: bases/mid.yaml\noptim:\n  epochs: 7\n")
    cfg = load_config(exp, ["optim.epochs=9", "crops.local_crops_number=6"])
    assert cfg.train.batch_size_per_gpu == 8  # from the grand-parent
    assert cfg.train.seed == 2  # parent beats grand-parent
    assert cfg.optim.epochs == 9  # command line beats the file (7) and its base (5)
    assert cfg.crops.local_crops_number == 6
    assert cfg.optim.lr == 1.0e-3  # untouched default
    assert "_base_" not in config_to_yaml(cfg)


def test_override_types(tmp_path):
    cfg = load_config(
        overrides=[
            "train.batch_size_per_gpu=32",
            "crops.global_crops_scale=[0.4,1]",
            "optim.lr=1",
            "student.pretrained_weights=/w/teacher_checkpoint.pth",
            "student.layerscale=null",
            "train.dataset_path=ImageFolder:root=/data/imgs:channels=1",
            "crops.channel_mean=[0.5,0.5,0.5,0.5,1]",
            "crops.channel_std=[0.2,0.2,0.2,0.2,0.2]",
        ]
    )
    assert cfg.crops.channel_mean == [0.5, 0.5, 0.5, 0.5, 1.0] and isinstance(cfg.crops.channel_mean[4], float)
    assert cfg.train.batch_size_per_gpu == 32
    assert cfg.crops.global_crops_scale == [0.4, 1.0] and isinstance(cfg.crops.global_crops_scale[1], float)
    assert isinstance(cfg.optim.lr, float) and cfg.optim.lr == 1.0
    assert cfg.student.pretrained_weights == "/w/teacher_checkpoint.pth"
    assert cfg.student.layerscale is None
    assert cfg.train.dataset_path == "ImageFolder:root=/data/imgs:channels=1"


def test_unknown_keys_name_the_source_and_the_closest_key(tmp_path):
    suggestion = r"'train\.batch_size' in the command line\. Did you mean 'train\.batch_size_per_gpu'"
    with pytest.raises(ConfigError, match=suggestion):
        load_config(overrides=["train.batch_size=3"])
    with pytest.raises(ConfigError, match=r"'trian\.seed' in the command line\. Did you mean 'train\.seed'"):
        load_config(overrides=["trian.seed=3"])
    exp = write(tmp_path / "exp.yaml", "crops:\n  local_crop_number: 4\n")
    suggestion = r"'crops\.local_crop_number' in config file '.*exp\.yaml'\. Did you mean 'crops\.local_crops_number'"
    with pytest.raises(ConfigError, match=suggestion):
        load_config(exp)
    write(tmp_path / "base.yaml", "optim:\n  learning_rate: 0.1\n")
    child = write(tmp_path / "child.yaml", "_base_: base.yaml\n")
    with pytest.raises(ConfigError, match=r"'optim\.learning_rate' in config file '.*base\.yaml'"):
        load_config(child)
    with pytest.raises(ConfigError, match=r"'train' in the command line is a section"):
        load_config(overrides=["train=3"])


def test_base_errors(tmp_path):
    write(tmp_path / "a.yaml", "_base_: b.yaml\n")
    write(tmp_path / "b.yaml", "_base_: a.yaml\n")
    with pytest.raises(ConfigError, match=r"cycle: .*a\.yaml -> .*b\.yaml -> .*a\.yaml"):
        load_config(tmp_path / "a.yaml")
    write(tmp_path / "c.yaml", "_base_: missing.yaml\n")
    with pytest.raises(ConfigError, match=r"missing\.yaml' does not exist \(named as _base_ in .*c\.yaml\)"):
        load_config(tmp_path / "c.yaml")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.batch_size_per_gpu=abc", r"batch_size_per_gpu='abc' \(set in the command line\): expected an integer"),
        ("train.batch_size_per_gpu=1.5", "expected an integer"),
        ("train.batch_size_per_gpu=0", r"train\.batch_size_per_gpu=0 .*must be > 0"),
        ("crops.local_crops_number=-1", "must be >= 0"),
        ("optim.lr=-1e-3", r"optim\.lr=-0\.001 .*must be > 0"),
        ("dino.koleo_loss_weight=true", "expected a number"),
        ("crops.global_crops_scale=[0.5,0.4]", r"crops\.global_crops_scale=\[0\.5, 0\.4\].*0 < low <= high <= 1"),
        ("crops.local_crops_scale=[0.05,1.5]", "0 < low <= high <= 1"),
        ("crops.global_crops_scale=[0.5]", "0 < low <= high <= 1"),
        ("crops.global_crops_scale=[a,b]", "expected a list of numbers"),
        ("ibot.mask_ratio_min_max=[0.6,0.5]", "0 <= low <= high <= 1"),
        ("ibot.mask_sample_probability=1.5", r"must lie in \[0, 1\]"),
        ("crops.local_crops_size=224", r"crops\.local_crops_size=224 .*smaller than global crops \(224 px\)"),
        ("crops.global_crops_size=100", r"crops\.global_crops_size=100 .*not a multiple of student\.patch_size=16"),
        ("crops.local_crops_size=100", r"crops\.local_crops_size=100 .*not a multiple of student\.patch_size=16"),
        ("train.centering=sinkhorn", r"centering='sinkhorn'.*sinkhorn_knopp, centering; closest 'sinkhorn_knopp'"),
        ("optim.scaling_rule=sqrt", "must be one of sqrt_wrt_1024, linear_wrt_256, none"),
        ("compute_precision.autocast_dtype=bf_16", "closest 'bf16'"),
        ("student.pretrained_weights=3", r"expected a string or null"),
        ("evaluation.knn_k=[0]", r"knn_k=\[0\] .*non-empty list of different neighbour counts, each > 0"),
        ("evaluation.knn_k=[20,20]", "different neighbour counts"),
        ("evaluation.knn_k=[]", "non-empty list"),
        ("evaluation.knn_k=20", r"knn_k=20 .*expected a list of integers; one value is a list of one: \[20\]"),
        ("evaluation.knn_train_dataset=SyntheticCellPainting", r"knn_test_dataset='': k-NN needs both"),
        ("evaluation.viz_num_images=0", "viz_num_images=0 .*must be > 0"),
        ("logging.trackio_project=' '", "trackio_project=' ' .*must name a project"),
        ("teacher.momentum_teacher=1.01", r"momentum_teacher=1\.01 .*must lie in \[0, 1\]"),
        ("optim.adamw_beta2=-0.9", r"must lie in \[0, 1\]"),
        ("optim.layerwise_decay=1.5", "must be <= 1"),
        ("optim.layerwise_decay=0", "must be > 0"),
        ("crops.blur_probability.local=1.5", r"crops\.blur_probability\.local=1\.5 .*probability must lie in \[0, 1\]"),
        ("crops.intensity_aug_probability=-0.1", r"must lie in \[0, 1\]"),
        ("crops.gamma_range=[1.2,0.8]", r"gamma_range=\[1\.2, 0\.8\] \(set in the command line\): .*0 < low <= high"),
        ("crops.blur_sigma=[2.0,0.1]", r"crops\.blur_sigma=\[2\.0, 0\.1\] .*0 < low <= high"),
        ("crops.noise_std=[-0.1,0.1]", r"noise_std=\[-0\.1, 0\.1\] .*0 <= low <= high"),
        ("crops.channel_views.local=avg", r"channel_views\.local='avg' .*must be one of all, mean, single"),
        ("crops.channel_views.locals=mean", r"key 'crops\.channel_views\.locals'.*mean 'crops\.channel_views\.local'"),
        ("crops.local_masked_crops_fraction=2.0", r"local_masked_crops_fraction=2\.0 .*must lie in \[0, 1\]"),
        ("crops.channel_mean=[0.5,0.5]", r"channel_mean=\[0\.5, 0\.5\] .*must both be null or two lists"),
        ("student.pos_embed_rope_rescale_coords=0.5", "must be >= 1"),
        ("train.dataset_path=", r"dataset_path=None .*an empty value is null, write \"train\.dataset_path=''\""),
        ("method=simclear", r"method='simclear' .*must be one of dino, simclr; closest 'simclr'"),
        ("method=simclr", r"crops\.local_crops_number=8 .*must be 0 with method=simclr: SimCLR trains on the two"),
        ("simclr.temperature=0", r"simclr\.temperature=0\.0 .*must be > 0"),
        ("train.grad_accum_steps=0", r"train\.grad_accum_steps=0 .*must be > 0"),
        ("crops.rgb_color_jitter=[0.8,0.8,0.8]", r"rgb_color_jitter=.*\[brightness, contrast, saturation, hue\]"),
        ("crops.rgb_color_jitter=[0.8,0.8,0.8,0.6]", r"hue in \[0, 0\.5\].*SimCLR \[0\.8, 0\.8, 0\.8, 0\.2\]"),
        ("checkpointing.best_metric=val_acc", r"best_metric='val_acc' .*must be one of val_loss, knn_top1"),
        ("evaluation.val_dataset=SyntheticCellPainting", r"val_dataset='Synthetic.*is set but .*_period_iterations=0"),
        ("evaluation.val_period_iterations=100", r"best_metric='val_loss'.*needs evaluation\.val_dataset"),
        ("train.early_stopping_patience=3", r"early_stopping_patience=3 .*needs validation: set evaluation\.val_"),
        ("train.early_stopping_min_delta=-0.1", r"early_stopping_min_delta=-0\.1 .*must be >= 0"),
    ],
)
def test_wrong_types_and_impossible_values_name_the_key(override, message):
    overrides = [override]
    if override == "method=simclr":
        overrides = ["crops.local_crops_number=8", override]
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=overrides)


def test_validation_needs_the_data_of_its_metric():
    with pytest.raises(ConfigError, match=r"best_metric='knn_top1'.*needs evaluation\.knn_train_dataset and"):
        load_config(overrides=["evaluation.val_period_iterations=10", "checkpointing.best_metric=knn_top1"])
    cfg = load_config(overrides=["evaluation.val_period_iterations=10", "checkpointing.best_metric=knn_top1",
                                 "evaluation.knn_train_dataset=A", "evaluation.knn_test_dataset=B",
                                 "train.early_stopping_patience=2"])
    assert cfg.evaluation.knn_enabled and cfg.train.early_stopping_patience == 2
    cfg = load_config(overrides=["method=simclr", "crops.local_crops_number=0", "student.arch=resnet18"])
    assert cfg.method == "simclr" and cfg.simclr.temperature == 0.1


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("student.arch=vit_smal", "closest 'vit_small'"),
        ("train.dataset_path=Synthetic", r"train\.dataset_path.*unknown dataset 'Synthetic'.*'SyntheticCellPainting'"),
        ("train.dataset_path=SyntheticCellPainting:sise=3", "has no key 'sise'. Did you mean 'size'"),
        ("train.dataset_path=SyntheticCellPainting:size=x", "key 'size' got 'x', expected int"),
        ("evaluation.channel_consistency_dataset=SyntheticCellPainting:split=val",
         r"channel_consistency_dataset=.*'split' got 'val'"),
        ("evaluation.viz_dataset=Synthetic", r"evaluation\.viz_dataset=.*unknown dataset 'Synthetic'"),
    ],
)
def test_names_owned_by_other_layers_are_checked_when_a_command_loads_the_config(override, message):
    load_config(overrides=[override])  # the config alone does not know backbones or datasets
    with pytest.raises(ConfigError, match=message):
        load_checked_config(None, [override])


def test_the_validation_dataset_string_is_checked_too():
    overrides = ["evaluation.val_dataset=SyntheticCellPaintin", "evaluation.val_period_iterations=10"]
    with pytest.raises(ConfigError, match=r"evaluation\.val_dataset=.*Did you mean 'SyntheticCellPainting'"):
        load_checked_config(None, overrides)


def test_local_crop_rules_apply_only_when_there_are_local_crops():
    cfg = load_config(overrides=["crops.local_crops_number=0", "crops.local_crops_size=300", "student.patch_size=14"])
    assert cfg.crops.local_crops_size == 300


def test_file_values_are_attributed_to_the_file(tmp_path):
    exp = write(tmp_path / "exp.yaml", "crops:\n  global_crops_size: 64\n  local_crops_size: 64\n")
    with pytest.raises(ConfigError, match=r"crops\.local_crops_size=64 \(set in config file '.*exp\.yaml'\)"):
        load_config(exp)


def test_validate_config_checks_a_config_built_elsewhere():
    cfg = load_config()
    cfg.optim.epochs = -1
    with pytest.raises(ConfigError, match=r"optim\.epochs=-1: must be > 0"):
        validate_config(cfg)
    cfg = load_config()
    cfg.crops.blur_probability.global2 = 2.0
    with pytest.raises(ConfigError, match=r"crops\.blur_probability\.global2=2\.0: a probability must lie in"):
        validate_config(cfg)


def test_save_and_print_round_trip(tmp_path):
    cfg = load_config(overrides=["train.seed=5", "train.dataset_path=SyntheticCellPainting:size=10"])
    path = save_config(cfg, tmp_path / "run/config.yaml")
    assert path.read_text() == config_to_yaml(cfg)
    assert not list(path.parent.glob("*.tmp"))
    reloaded = load_config(path)  # a saved config is a valid --config-file
    assert reloaded == cfg and dataclasses.asdict(reloaded)["train"]["seed"] == 5


def test_sections_are_the_settings_the_modules_take():
    cfg = load_config(overrides=["optim.lr=2e-3", "optim.scaling_rule=linear_wrt_256", "student.patch_size=8"])
    assert cfg.optim.scaled_lr(512) == pytest.approx(4e-3)
    assert load_config(overrides=["optim.scaling_rule=sqrt_wrt_1024"]).optim.scaled_lr(256) == pytest.approx(5e-4)
    assert load_config(overrides=["optim.scaling_rule=none"]).optim.scaled_lr(7) == 1e-3
    assert cfg.student.backbone_kwargs()["patch_size"] == 8 and cfg.crops.blur_probability["global2"] == 0.1
    assert load_config(overrides=["crops.local_masked_crops_fraction=0.5"]).crops.num_masked_local_crops == 4


@pytest.mark.parametrize("recipe", sorted((pathlib.Path(__file__).parents[1] / "configs").rglob("*.yaml")), ids=str)
def test_every_shipped_recipe_is_a_valid_config(recipe):
    load_config(recipe)
