"""crops.gpu_augmentations: the per-crop ops of the CPU reference after geometry (photometric ops, mask,
normalisation, channel replication) applied to a whole batch of crops at once on the training device.

Split of the work: the loader workers cut each crop (box, channel view, resize, flips and turns) and draw its
photometric parameters from the crop's own random stream with `draw_photometric` (dinocell.pipeline.photometric, the
draw the CPU reference uses too), so the same seed and position give the same parameters on both paths and runs stay
reproducible and exactly resumable. Per crop the worker records a `PendingCrop`; collate stacks the crops and turns
their records into a `DeviceAugmentation` (a few small tensors per crop tensor: `PendingOps`), which travels in
`SSLBatch.device_augmentation` through pinned memory to the device, where `SSLBatch.finish_crops` (called by the
training step and the validation) applies it in a fixed number of whole-batch kernels (no per-crop launches, no host
synchronisation), in the reference's order: intensity (gamma, contrast, brightness), RGB colour jitter and grayscale,
Gaussian blur, solarisation, noise; then the mask of masked crops, normalisation, replication to `in_chans`.

What crosses to the device is the crops at their view's channels: a `mean` or `single` view is one channel, and its
replication to the model's `in_chans` happens on the device (5x fewer bytes to pin and copy for the JUMP recipe). A
crop tensor whose groups mix 1-channel and all-channel views (e.g. global1 `all`, global2 `mean`) replicates its
1-channel crops in the worker instead, with their per-channel factors, and their noise is drawn once per pixel and
shared by the channels, as the reference adds noise before replicating.

Fidelity to the CPU reference, crop by crop: every op agrees to float rounding (tests/test_gpu_augmentations.py,
<= 1e-5; the blur sums its taps in another order). Noise is the one exception: the reference seeds a CPU generator per
crop, the device draws the noise of the whole batch in one call from a generator seeded with all the batch's noise
seeds. Its noise therefore matches the reference in distribution (zero mean, the crop's own std), not value by value,
and is still reproducible (same batch -> same noise).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from dinocell.pipeline.augmentations import _FROM_YIQ, _TO_YIQ, _luma
from dinocell.pipeline.photometric import PhotometricParams
from dinocell.pipeline.samplers import derive_seed

# the transform's output key (per sample) that collate turns into SSLBatch.device_augmentation
DEVICE_AUGMENTATION_KEY = "device_augmentation"


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
    noise_shared: torch.Tensor  # [B] bool: one noise value per pixel for all channels (a replicated 1-channel crop)

    @classmethod
    def stack(
        cls,
        params: Sequence[PhotometricParams],
        device: torch.device | str = "cpu",
        shared_noise: Sequence[bool] | None = None,
    ) -> PhotometricBatch:
        """One host-to-device copy per field; call it in the loader (pinned memory) or just before the step.
        `shared_noise`: per crop, whether its channels are copies of one channel (default: none is)."""

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
            noise_shared=tensor(list(shared_noise or [False] * len(params)), torch.bool),
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
            noise = torch.where(_per_crop(p.noise_shared), noise[:, :1], noise)
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


@dataclass(frozen=True)
class PendingCrop:
    """What remains to do to one crop a loader worker cut with crops.gpu_augmentations, in the reference's order."""

    photometric: PhotometricParams | None  # None: crops.photometric_aug=false
    mask: torch.Tensor | None  # bool [1, S, S]: the pixels a masked crop keeps; None: an unmasked crop
    mean: list[float] | None  # normalisation of the crop's view channels (crops.channel_mean/std); None: none
    std: list[float] | None


@dataclass(frozen=True)
class PendingOps:
    """The pending work of one stacked crop tensor [B, c, S, S] (c: the views' channel count, 1 or in_chans)."""

    photometric: PhotometricBatch | None
    keep: torch.Tensor | None  # bool [B, 1, S, S]: pixels kept (all True for unmasked crops); None: no masked crop
    mean: torch.Tensor | None  # [B, c, 1, 1]
    std: torch.Tensor | None

    @classmethod
    def stack(cls, crops: Sequence[torch.Tensor], pending: Sequence[PendingCrop]) -> tuple[torch.Tensor, PendingOps]:
        """Stack a worker's crops (in batch order) and their records. Crops of 1 channel next to crops of more are
        replicated to the larger count here, their per-channel factors and normalisation with them."""
        if not crops:
            return torch.empty(0), cls(None, None, None, None)
        channels = max(crop.shape[0] for crop in crops)
        shared = [crop.shape[0] < channels for crop in crops]  # a replicated 1-channel crop
        stacked = torch.stack([crop.expand(channels, -1, -1) for crop in crops])
        photometric = None
        if pending[0].photometric is not None:
            params = [_widen(p.photometric, channels) for p in pending]
            photometric = PhotometricBatch.stack(params, shared_noise=shared)
        keep = None
        masks = [p.mask for p in pending]
        if (template := next((m for m in masks if m is not None), None)) is not None:
            keep = torch.stack([torch.ones_like(template) if m is None else m for m in masks])
        mean = std = None
        if pending[0].mean is not None:
            mean, std = (torch.tensor([_repeat(getattr(p, name), channels) for p in pending])[..., None, None]
                         for name in ("mean", "std"))
        return stacked, cls(photometric, keep, mean, std)

    def apply(self, crops: torch.Tensor, solarization_threshold: float, in_chans: int) -> torch.Tensor:
        """The pending ops on the stacked crops (already on the device): photometric ops, mask, normalisation,
        replication of 1-channel crops to in_chans; outside autocast, in fp32 like the reference."""
        x = crops
        if self.photometric is not None:
            x = apply_photometric(x, self.photometric, solarization_threshold)
        if self.keep is not None:
            x = x * self.keep
        if self.mean is not None:
            x = (x - self.mean) / self.std
        return x.expand(-1, in_chans, -1, -1) if x.shape[1] == 1 and in_chans != 1 else x


def _repeat(values: Sequence[float], channels: int) -> list[float]:
    """A 1-channel crop's values for its replicated channels; other crops' values as they are."""
    return list(values) * channels if len(values) == 1 else list(values)


def _widen(p: PhotometricParams, channels: int) -> PhotometricParams:
    """The parameters of a 1-channel crop replicated to `channels`: the same factor for every copy."""
    if len(p.brightness) == channels:
        return p
    return replace(p, **{name: tuple(_repeat(getattr(p, name), channels)) for name in ("brightness", "contrast",
                                                                                       "gamma")})


@dataclass(frozen=True)
class DeviceAugmentation:
    """SSLBatch.device_augmentation: the pending work of the batch's global and local crop tensors."""

    global_crops: PendingOps
    local_crops: PendingOps
    in_chans: int
    solarization_threshold: float

    @classmethod
    def collate(cls, samples: Sequence[dict], n_global: int, n_local: int) -> tuple[torch.Tensor, torch.Tensor,
                                                                                     DeviceAugmentation]:
        """(global crops, local crops, their pending work) of transformed samples, crop-major like collate's
        reference path; an empty [0, in_chans, L, L]-like local tensor is left to the caller."""
        pending = [s[DEVICE_AUGMENTATION_KEY] for s in samples]
        stacked = {}
        for key, n in (("global_crops", n_global), ("local_crops", n_local)):
            stacked[key] = PendingOps.stack([s[key][c] for c in range(n) for s in samples],
                                            [p[key][c] for c in range(n) for p in pending])
        first = pending[0]
        aug = cls(stacked["global_crops"][1], stacked["local_crops"][1], first["in_chans"],
                  first["solarization_threshold"])
        return stacked["global_crops"][0], stacked["local_crops"][0], aug

    def finish(self, global_crops: torch.Tensor, local_crops: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The finished (global, local) crops, as the CPU path would have made them."""
        threshold = self.solarization_threshold
        return (self.global_crops.apply(global_crops, threshold, self.in_chans),
                self.local_crops.apply(local_crops, threshold, self.in_chans))
