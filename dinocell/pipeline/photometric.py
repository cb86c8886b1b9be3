"""The photometric parameters of one crop and the one place where they are drawn.

Both crop paths use `draw_photometric`: the CPU reference (`MultiCropTransform`, which applies the ops to each crop in
the loader worker) and the device path (crops.gpu_augmentations: the worker only draws, and the training step applies
the ops to the whole batch, dinocell.pipeline.gpu_augmentations). Each crop draws from its own random stream
`random.Random(derive_seed(seed, SeedStream.CROPS, position))`, right after its geometry, so both paths see the same
values for the same seed and position.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from dinocell.config.loading import ConfigError
from dinocell.config.schema import CropsConfig

# Chances of colour jitter (strengths: crops.rgb_color_jitter) and grayscale for natural RGB images (DINO and SimCLR).
RGB_JITTER_PROBABILITY = 0.8
RGB_GRAYSCALE_PROBABILITY = 0.2


@dataclass(frozen=True)
class ColorParams:
    """DINO colour jitter of one RGB crop (only drawn with crops.rgb_color_aug)."""

    jitter: bool
    brightness: float
    contrast: float
    saturation: float
    hue: float
    grayscale: bool


@dataclass(frozen=True)
class PhotometricParams:
    """Everything drawn for one crop's photometric ops; a flag False means the op is skipped (its values unused)."""

    intensity: bool
    brightness: tuple[float, ...]  # one factor per crop channel
    contrast: tuple[float, ...]
    gamma: tuple[float, ...]
    color: ColorParams | None
    blur: bool
    sigma: float
    solarize: bool
    noise: bool
    noise_std: float
    noise_seed: int


def draw_photometric(s: CropsConfig, group: str, n_channels: int, rng: random.Random) -> PhotometricParams:
    """The parameters of one crop of `group` with `n_channels` channels. Every value is drawn whether or not its op
    fires, so one probability never shifts the other draws (and a switch changes only its own op)."""
    intensity = rng.random() < s.intensity_aug_probability
    brightness, contrast, gamma = (
        tuple(rng.uniform(*r) for _ in range(n_channels)) for r in (s.brightness_range, s.contrast_range, s.gamma_range)
    )
    color = _draw_color(s.rgb_color_jitter, group, n_channels, rng) if s.rgb_color_aug else None
    blur = rng.random() < s.blur_probability[group]
    sigma = rng.uniform(*s.blur_sigma)
    solarize = rng.random() < s.solarization_probability[group]
    noise = rng.random() < s.noise_probability[group]
    noise_std = rng.uniform(*s.noise_std)
    noise_seed = rng.getrandbits(63)
    return PhotometricParams(
        intensity, brightness, contrast, gamma, color, blur, sigma, solarize, noise, noise_std, noise_seed
    )


def _draw_color(strengths: list[float], group: str, n_channels: int, rng: random.Random) -> ColorParams:
    if n_channels != 3:
        raise ConfigError(
            f"crops.rgb_color_aug=true needs 3-channel RGB crops but crop group {group} has {n_channels} "
            "channel(s); set crops.rgb_color_aug=false for non-RGB data or use channel view 'all' on RGB images"
        )
    jitter = rng.random() < RGB_JITTER_PROBABILITY
    *factors, hue = strengths  # crops.rgb_color_jitter: brightness, contrast, saturation, hue
    brightness, contrast, saturation = (rng.uniform(1 - strength, 1 + strength) for strength in factors)
    hue_shift = rng.uniform(-hue, hue)
    return ColorParams(jitter, brightness, contrast, saturation, hue_shift, rng.random() < RGB_GRAYSCALE_PROBABILITY)
