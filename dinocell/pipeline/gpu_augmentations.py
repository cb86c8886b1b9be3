"""Batched photometric augmentations on the training device: the per-crop ops of the CPU reference
(`MultiCropTransform._photometric` in dinocell/data/transforms.py) applied to a whole batch of crops at once.

Split of the work: the loader keeps cutting crops on the CPU, and for each crop draws its photometric parameters
from the crop's own random stream (`random.Random(derive_seed(seed, SeedStream.CROPS, position))`) with
`draw_photometric`, which consumes that stream exactly as the reference does, draw for draw. `PhotometricBatch.stack`
turns a batch's parameters into a few small tensors; `apply_photometric` then applies them on the device in a fixed
number of whole-batch kernels (no per-crop launches, no host synchronisation). Same seed and position -> same
parameters as the CPU path, so runs stay reproducible and exactly resumable.

Fidelity to the CPU reference, crop by crop: intensity (gamma, contrast, brightness), RGB colour jitter and
grayscale, Gaussian blur and solarisation agree to float rounding (tests/test_gpu_augmentations.py, <= 1e-5).
Noise is the one exception: the reference seeds a CPU generator per crop, the device draws the noise of the whole
batch in one call from a generator seeded with all the batch's noise seeds. Its noise therefore matches the reference
in distribution (zero mean, the crop's own std), not value by value, and is still reproducible (same batch -> same
noise).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dinocell.config.schema import CropsConfig
from dinocell.pipeline.augmentations import _FROM_YIQ, _TO_YIQ, _luma
from dinocell.pipeline.samplers import derive_seed
from dinocell.pipeline.transforms import RGB_GRAYSCALE_PROBABILITY, RGB_JITTER_PROBABILITY


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
    """Everything `_photometric` draws for one crop; a flag False means the op is skipped (its values unused)."""

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
    """The parameters of one crop of `group` with `n_channels` channels, drawn in the reference's order: every value
    is drawn whether or not its op fires, so the stream stays aligned with the CPU path."""
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
        raise ValueError(
            f"crops.rgb_color_aug=true needs 3-channel RGB crops but crop group {group} has {n_channels} "
            "channel(s); set crops.rgb_color_aug=false for non-RGB data or use channel view 'all' on RGB images"
        )
    jitter = rng.random() < RGB_JITTER_PROBABILITY
    *factors, hue = strengths  # crops.rgb_color_jitter: brightness, contrast, saturation, hue
    brightness, contrast, saturation = (rng.uniform(1 - strength, 1 + strength) for strength in factors)
    hue_shift = rng.uniform(-hue, hue)
    return ColorParams(jitter, brightness, contrast, saturation, hue_shift, rng.random() < RGB_GRAYSCALE_PROBABILITY)


@dataclass(frozen=True)
class PhotometricBatch:
    """The parameters of a batch of crops as tensors on the device ([B] flags and values, [B, C] intensity factors,
    [B, 3, 3] colour matrices), plus the host-side numbers the kernels' shapes depend on."""

    intensity: torch.Tensor
    brightness: torch.Tensor
    contrast: torch.Tensor
    gamma: torch.Tensor
    color: dict[str, torch.Tensor] | None
    blur: torch.Tensor
    sigma: torch.Tensor
    blur_radius: torch.Tensor  # per crop, as the reference computes it (before the clamp to the crop size)
    max_blur_radius: int  # over the blurred crops; 0 = no crop is blurred
    solarize: torch.Tensor
    noise: torch.Tensor
    noise_std: torch.Tensor
    noise_seed: int | None  # one seed for the batch's noise draw; None = no crop gets noise

    @classmethod
    def stack(cls, params: Sequence[PhotometricParams], device: torch.device | str = "cpu") -> PhotometricBatch:
        """One host-to-device copy per field; call it in the loader (pinned memory) or just before the step."""

        def tensor(values, dtype=torch.float32) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)

        radii = [_blur_radius(p.sigma) for p in params]
        color = None
        if params[0].color is not None:
            colors = [p.color for p in params]
            hue = torch.tensor([c.hue for c in colors], dtype=torch.float64)
            color = {
                "jitter": tensor([c.jitter for c in colors], torch.bool),
                "factors": tensor([[c.brightness, c.contrast, c.saturation] for c in colors]),
                "hue_matrix": _hue_matrices(hue).to(device, non_blocking=True),
                "grayscale": tensor([c.grayscale for c in colors], torch.bool),
            }
        noise_seeds = [p.noise_seed for p in params if p.noise]
        return cls(
            intensity=tensor([p.intensity for p in params], torch.bool),
            brightness=tensor([p.brightness for p in params]),
            contrast=tensor([p.contrast for p in params]),
            gamma=tensor([p.gamma for p in params]),
            color=color,
            blur=tensor([p.blur for p in params], torch.bool),
            sigma=tensor([p.sigma for p in params]),
            blur_radius=tensor(radii, torch.int64),
            max_blur_radius=max((r for r, p in zip(radii, params) if p.blur), default=0),
            solarize=tensor([p.solarize for p in params], torch.bool),
            noise=tensor([p.noise for p in params], torch.bool),
            noise_std=tensor([p.noise_std for p in params]),
            noise_seed=derive_seed(*noise_seeds) if noise_seeds else None,
        )


def _blur_radius(sigma: float) -> int:
    """Kernel radius of the reference blur (3 sigma, at least 1), before the clamp to the crop size."""
    return max(1, int(math.ceil(3 * sigma)))


def _hue_matrices(hue: torch.Tensor) -> torch.Tensor:
    """[B, 3, 3] RGB -> RGB matrices rotating the YIQ chroma plane by `hue` turns (float64 product, then fp32)."""
    cos, sin = torch.cos(2 * math.pi * hue), torch.sin(2 * math.pi * hue)
    rotate = torch.zeros(len(hue), 3, 3, dtype=torch.float64)
    rotate[:, 0, 0] = 1.0
    rotate[:, 1, 1], rotate[:, 1, 2], rotate[:, 2, 1], rotate[:, 2, 2] = cos, -sin, sin, cos
    matrices = _FROM_YIQ @ rotate @ _TO_YIQ
    matrices[hue == 0] = torch.eye(3, dtype=torch.float64)  # the reference skips a zero shift
    return matrices.float()


def _per_crop(values: torch.Tensor) -> torch.Tensor:
    """[B] or [B, C] -> broadcastable against [B, C, H, W]."""
    return values.view(values.shape[0], -1, 1, 1)


def apply_photometric(crops: torch.Tensor, p: PhotometricBatch, solarization_threshold: float) -> torch.Tensor:
    """The reference's ops in its order (intensity, colour, blur, solarisation, noise) on crops [B, C, H, W] (one
    crop group, fp32, before normalisation); returns a new tensor. Runs outside autocast: the ops need fp32."""
    with torch.autocast(crops.device.type, enabled=False):
        x = crops.float()
        x = torch.where(_per_crop(p.intensity), _intensity(x, p), x)
        if p.color is not None:
            x = _color(x, p.color)
        if p.max_blur_radius:
            x = torch.where(_per_crop(p.blur), _blur(x, p), x)
        x = torch.where(_per_crop(p.solarize) & (x >= solarization_threshold), 1.0 - x, x)
        if p.noise_seed is not None:
            generator = torch.Generator(device=x.device).manual_seed(p.noise_seed)
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = torch.where(_per_crop(p.noise), x + _per_crop(p.noise_std) * noise, x)
        return x


def _intensity(x: torch.Tensor, p: PhotometricBatch) -> torch.Tensor:
    """Per-crop, per-channel gamma (sign-preserving power), contrast around the channel mean, brightness."""
    x = torch.copysign(torch.exp(torch.log(x.abs()) * _per_crop(p.gamma)), x)
    mean = x.mean(dim=(-2, -1), keepdim=True)
    return (mean + (x - mean) * _per_crop(p.contrast)) * _per_crop(p.brightness)


def _batch_luma(x: torch.Tensor) -> torch.Tensor:
    """[B, 1, H, W] luma of [B, 3, H, W] RGB crops (the reference's luma, channel dim first)."""
    return _luma(x.movedim(1, 0)).unsqueeze(1)


def _color(x: torch.Tensor, color: dict[str, torch.Tensor]) -> torch.Tensor:
    """DINO colour jitter (brightness, contrast, saturation, hue, clamped to [0, 1] after each), then grayscale."""
    brightness, contrast, saturation = (_per_crop(f) for f in color["factors"].unbind(1))
    y = (x * brightness).clamp(0, 1)
    grey_mean = _batch_luma(y).mean(dim=(-2, -1), keepdim=True)
    y = (grey_mean + (y - grey_mean) * contrast).clamp(0, 1)
    grey = _batch_luma(y)
    y = (grey + (y - grey) * saturation).clamp(0, 1)
    y = torch.einsum("bij,bjhw->bihw", color["hue_matrix"], y).clamp(0, 1)
    x = torch.where(_per_crop(color["jitter"]), y, x)
    return torch.where(_per_crop(color["grayscale"]), _batch_luma(x).expand_as(x), x)


def _blur(x: torch.Tensor, p: PhotometricBatch) -> torch.Tensor:
    """Separable Gaussian blur with a per-crop sigma: one depthwise convolution per axis over the whole batch, taps
    beyond a crop's own radius weighted 0, so each crop gets the reference's kernel and reflect padding."""
    b, c, h, w = x.shape
    limit = min(h, w) - 1  # reflect padding needs pad < size; the reference clamps the same way
    radius = min(p.max_blur_radius, limit)
    taps = torch.arange(-radius, radius + 1, device=x.device, dtype=torch.float64)
    own_radius = p.blur_radius.clamp(max=limit)[:, None]
    weights = torch.exp(-0.5 * (taps / p.sigma.double()[:, None]) ** 2) * (taps.abs() <= own_radius)
    weights = (weights / weights.sum(dim=1, keepdim=True)).float().repeat_interleave(c, dim=0)  # [B*C, 2r+1]
    padded = F.pad(x.reshape(1, b * c, h, w), (radius, radius, radius, radius), mode="reflect")
    rows = F.conv2d(padded, weights[:, None, None, :], groups=b * c)  # along the width
    return F.conv2d(rows, weights[:, None, :, None], groups=b * c).view(b, c, h, w)  # along the height
