"""Tensor-level augmentation ops on float32 [C, H, W] crops with any channel count (no torchvision).

Every op takes its random parameters explicitly; drawing them (from the per-sample generator) is the job of
dinocell/data/transforms.py. Geometric ops work on any [C, H, W] tensor, so a bool mask moves with its image.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import torch
import torch.nn.functional as F

CROP_ASPECT_RATIO = (3 / 4, 4 / 3)  # random-resized-crop aspect range of DINO / torchvision


def sample_crop_box(
    height: int, width: int, scale: Sequence[float], rng: random.Random, ratio: Sequence[float] = CROP_ASPECT_RATIO
) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a random-resized-crop box: area share in `scale`, aspect in `ratio`; centre crop after
    10 failed tries (torchvision/DINO semantics)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def resize(image: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Bilinear resize with antialiasing (a downscale averages instead of skipping pixels)."""
    size = (size, size) if isinstance(size, int) else size
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    return F.interpolate(image[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0]


def box_downsample_2x(image: torch.Tensor) -> torch.Tensor:
    """2 x 2 box average (an odd last row/column is dropped): one cheap pass that makes later antialiased resizes of
    strongly downscaled crops read 4x less data."""
    h, w = image.shape[-2] // 2 * 2, image.shape[-1] // 2 * 2
    x = image[..., :h, :w]
    rows = x[..., 0::2, :] + x[..., 1::2, :]  # row pairs first: contiguous inner loop, 2x faster than 4 strided adds
    return (rows[..., 0::2] + rows[..., 1::2]).mul_(0.25)


def resize_mask(mask: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Resize a bool mask like its image (area-weighted), then keep pixels that are at least half inside."""
    return resize(mask.float(), size) >= 0.5


def flip_rotate(x: torch.Tensor, hflip: bool, vflip: bool, quarter_turns: int) -> torch.Tensor:
    """Horizontal/vertical flips then `quarter_turns` counter-clockwise 90-degree rotations of [C, H, W]."""
    dims = [d for d, flag in ((-1, hflip), (-2, vflip)) if flag]
    if dims:
        x = torch.flip(x, dims)
    if quarter_turns % 4:
        x = torch.rot90(x, quarter_turns, dims=(-2, -1))
    return x


def adjust_intensity(
    x: torch.Tensor, brightness: torch.Tensor, contrast: torch.Tensor, gamma: torch.Tensor
) -> torch.Tensor:
    """Per-channel gamma (sign-preserving power), contrast around the channel mean, then brightness factor; [C] each."""
    x = torch.copysign(torch.exp(torch.log(x.abs()) * gamma.view(-1, 1, 1)), x)  # |x|**gamma, 2x faster than pow
    mean = x.mean(dim=(-2, -1), keepdim=True)
    return (mean + (x - mean) * contrast.view(-1, 1, 1)) * brightness.view(-1, 1, 1)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur (radius 3 sigma, reflect padding) of every channel, as a weighted sum of shifted
    slices: on CPU this is ~3x faster than a grouped conv2d."""
    radius = max(1, min(int(math.ceil(3 * sigma)), min(x.shape[-2:]) - 1))
    weights = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, dtype=torch.float64) / sigma) ** 2)
    weights = (weights / weights.sum()).tolist()
    height, width = x.shape[-2:]
    padded = F.pad(x[None], (radius, radius, radius, radius), mode="reflect")[0]
    rows = padded[..., 0:width] * weights[0]
    for i, weight in enumerate(weights[1:], start=1):
        rows.add_(padded[..., i : i + width], alpha=weight)
    out = rows[..., 0:height, :] * weights[0]
    for i, weight in enumerate(weights[1:], start=1):
        out.add_(rows[..., i : i + height, :], alpha=weight)
    return out


def add_gaussian_noise(x: torch.Tensor, std: float, generator: torch.Generator) -> torch.Tensor:
    """Additive zero-mean Gaussian noise in intensity units."""
    return x + std * torch.randn(x.shape, generator=generator, dtype=x.dtype)


def solarize(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """Invert (1 - x) the intensities at or above `threshold`; meant for data in [0, 1]."""
    return torch.where(x >= threshold, 1.0 - x, x)


_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], dtype=torch.float64)
_FROM_YIQ = torch.linalg.inv(_TO_YIQ)


def _luma(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma [H, W] of a [3, H, W] RGB tensor (the Y row of YIQ)."""
    return 0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2]


def rgb_to_grayscale(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma of a [3, H, W] RGB tensor, kept as 3 identical channels."""
    return _luma(x).expand(3, -1, -1).clone()


def rgb_color_jitter(
    x: torch.Tensor, brightness: float, contrast: float, saturation: float, hue: float
) -> torch.Tensor:
    """DINO-style colour jitter of a [3, H, W] RGB tensor in [0, 1]: factors for brightness, contrast, saturation and
    a hue shift in turns (fraction of a full circle), applied in that order. The hue shift rotates the chroma plane
    of YIQ, a cheap tensor-only stand-in for the HSV hue shift of torchvision."""
    x = (x * brightness).clamp(0, 1)
    grey_mean = _luma(x).mean()
    x = (grey_mean + (x - grey_mean) * contrast).clamp(0, 1)
    grey = _luma(x)
    x = (grey + (x - grey) * saturation).clamp(0, 1)
    if hue:
        cos, sin = math.cos(2 * math.pi * hue), math.sin(2 * math.pi * hue)
        rotate = torch.tensor([[1.0, 0.0, 0.0], [0.0, cos, -sin], [0.0, sin, cos]], dtype=torch.float64)
        matrix = (_FROM_YIQ @ rotate @ _TO_YIQ).to(x.dtype)
        x = torch.einsum("ij,jhw->ihw", matrix, x).clamp(0, 1)
    return x


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(x - mean) / std per channel."""
    mean_t = torch.as_tensor(mean, dtype=x.dtype).view(-1, 1, 1)
    std_t = torch.as_tensor(std, dtype=x.dtype).view(-1, 1, 1)
    return (x - mean_t) / std_t
