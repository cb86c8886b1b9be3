"""Multi-crop transform (2 global + N local crops) with channel views, CT masked crops, and the eval transform.

Speed matters (a 5 x 1080 x 1080 field feeds 10 crops): each crop's box is cut first, the channel view is taken on
that region (a mean or single view shrinks the data 5x before anything else), and only then is it resized with one
antialiased interpolation; all ops are whole-tensor torch calls. A crop that shrinks by PYRAMID_MIN_FACTOR or more is
cut from a 2x box-downsampled copy of the field (made once per sample), which reads 4x less data; its box then
snaps to even pixels (at most one source pixel of shift, far below one output pixel).

Channel rule (every crop ends with exactly `in_chans` channels): a view gives either all C channels of the sample
(`all`) or one channel (`mean` = average of the channels, `single` = one random channel). One channel is replicated
to `in_chans`; `all` into a 1-channel model becomes `mean`; `all` with C != in_chans (and neither is 1) is an error.
Settings that do not fit the data (channel counts, masks, RGB colour augmentation) raise ConfigError: the fix is a
config key, and training checks the first sample before it starts (dinocell.train.preflight).
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence

import torch

from dinocell.config.loading import ConfigError
from dinocell.config.schema import GLOBAL_CROP_GROUPS, CropsConfig
from dinocell.pipeline.augmentations import (
    add_gaussian_noise,
    adjust_intensity,
    box_downsample_2x,
    flip_rotate,
    gaussian_blur,
    normalize,
    resize,
    resize_mask,
    rgb_color_jitter,
    rgb_to_grayscale,
    sample_crop_box,
    solarize,
)
from dinocell.pipeline.gpu_augmentations import DEVICE_AUGMENTATION_KEY, PendingCrop
from dinocell.pipeline.photometric import PhotometricParams, draw_photometric
from dinocell.pipeline.samplers import SeedStream, derive_seed

PYRAMID_MIN_FACTOR = 3.0  # use the half-resolution field when the crop box is >= 3x its output size


def resolve_view(view: str, n_channels: int, in_chans: int, where: str) -> str:
    """Apply the channel rule: the effective view for a sample with `n_channels` fed to an `in_chans` model."""
    if view != "all" or n_channels in (in_chans, 1):
        return view
    if in_chans == 1:
        return "mean"
    raise ConfigError(
        f"{where}=all gives {n_channels} channels but student.in_chans={in_chans}: set student.in_chans={n_channels} "
        "(or 1), or use a 'mean' / 'single' view, which is replicated to any channel count"
    )


def take_view(
    region: torch.Tensor, view: str, channel: int, mean: Sequence[float] | None, std: Sequence[float] | None
) -> tuple[torch.Tensor, list[float] | None, list[float] | None]:
    """The view's channels of a [C, h, w] region plus the mean/std that normalise them.

    A mean view is normalised with the average of its channels' means and stds (documented approximation).
    """
    if view == "all":
        picked = region
    elif view == "single":
        picked = region[channel : channel + 1]
    else:
        picked = region.mean(dim=0, keepdim=True)
    if mean is None or std is None:
        return picked, None, None
    if view == "all":
        return picked, list(mean), list(std)
    if view == "single":
        return picked, [mean[channel]], [std[channel]]
    return picked, [sum(mean) / len(mean)], [sum(std) / len(std)]


def to_in_chans(x: torch.Tensor, in_chans: int) -> torch.Tensor:
    """Replicate a 1-channel crop to the model's channel count (other counts were matched by resolve_view)."""
    return x.expand(in_chans, -1, -1) if x.shape[0] == 1 and in_chans != 1 else x


class MultiCropTransform:
    """`transform(sample, position)` -> {"global_crops": [2 x [in_chans, G, G]], "local_crops": [N x [in_chans, L, L]]};
    every random choice comes from (seed, position) only. `in_chans` is the model's channel count.

    With crops.gpu_augmentations the crops stop after geometry and channel view ([view channels, S, S]: 1 or all),
    and the output gains DEVICE_AUGMENTATION_KEY: per crop what remains to do (photometric parameters, mask,
    normalisation), which collate stacks into SSLBatch.device_augmentation for the training step's device.
    """

    def __init__(self, crops: CropsConfig, *, in_chans: int, seed: int) -> None:
        self.s = crops
        self.in_chans = in_chans
        self.seed = seed

    def __call__(self, sample: Mapping, position: int) -> dict:
        s = self.s
        image: torch.Tensor = sample["image"]
        mask: torch.Tensor | None = sample.get("mask")
        n_channels = image.shape[0]
        if s.channel_mean is not None and len(s.channel_mean) != n_channels:
            raise ConfigError(
                f"crops.channel_mean has {len(s.channel_mean)} values but sample {sample['id']!r} has {n_channels} "
                f"channels; give {n_channels} values (one per dataset channel) or null"
            )
        if s.num_masked_local_crops and mask is None:
            raise ConfigError(
                f"crops.local_masked_crops_fraction={s.local_masked_crops_fraction} needs a sample 'mask', but sample "
                f"{sample['id']!r} has none; use a dataset with masks (e.g. CTDataset) or set the fraction to 0.0"
            )
        rng = random.Random(derive_seed(self.seed, SeedStream.CROPS, position))
        field = _Field(image)
        global_crops = [
            self._crop(field, None, group, s.global_crops_size, s.global_crops_scale, rng)
            for group in GLOBAL_CROP_GROUPS
        ]
        local_crops = [
            self._crop(
                field, mask if i < s.num_masked_local_crops else None, "local", s.local_crops_size, s.local_crops_scale,
                rng,
            )
            for i in range(s.local_crops_number)
        ]
        if not s.gpu_augmentations:
            return {"global_crops": global_crops, "local_crops": local_crops}
        return {
            "global_crops": [crop for crop, _ in global_crops],
            "local_crops": [crop for crop, _ in local_crops],
            DEVICE_AUGMENTATION_KEY: {
                "global_crops": [pending for _, pending in global_crops],
                "local_crops": [pending for _, pending in local_crops],
                "in_chans": self.in_chans,
                "solarization_threshold": s.solarization_threshold,
            },
        }

    def _crop(
        self,
        field: _Field,
        mask: torch.Tensor | None,
        group: str,
        size: int,
        scale: Sequence[float],
        rng: random.Random,
    ) -> torch.Tensor | tuple[torch.Tensor, PendingCrop]:
        """One crop; `mask` given = a masked crop (pixels outside the mask are zeroed before normalisation). With
        crops.gpu_augmentations: the crop after geometry and channel view, and what remains to do on the device."""
        s = self.s
        n_channels, height, width = field.image.shape
        top, left, h, w = sample_crop_box(height, width, scale, rng)
        view = resolve_view(s.channel_views[group], n_channels, self.in_chans, f"crops.channel_views.{group}")
        channel = rng.randrange(n_channels)
        crop, mean, std = take_view(field.region(top, left, h, w, size), view, channel, s.channel_mean, s.channel_std)
        crop = resize(crop, size)
        hflip, vflip, turns = rng.random() < 0.5, rng.random() < 0.5, rng.randrange(4)
        geometry = (s.horizontal_flips and hflip, s.vertical_flips and vflip, turns if s.rotate90 else 0)
        crop = flip_rotate(crop, *geometry)
        params = draw_photometric(s, group, crop.shape[0], rng) if s.photometric_aug else None
        crop_mask = None
        if mask is not None:
            crop_mask = flip_rotate(resize_mask(mask[:, top : top + h, left : left + w], size), *geometry)
        if s.gpu_augmentations:
            return crop, PendingCrop(params, crop_mask, mean, std)
        if params is not None:
            crop = apply_photometric_params(crop, params, s.solarization_threshold)
        if crop_mask is not None:
            crop = crop * crop_mask
        if mean is not None:
            crop = normalize(crop, mean, std)
        return to_in_chans(crop, self.in_chans)

    def _photometric(self, crop: torch.Tensor, group: str, rng: random.Random) -> torch.Tensor:
        """The CPU reference of one crop's photometric ops, with the parameters `draw_photometric` draws from `rng`."""
        params = draw_photometric(self.s, group, crop.shape[0], rng)
        return apply_photometric_params(crop, params, self.s.solarization_threshold)


def apply_photometric_params(crop: torch.Tensor, p: PhotometricParams, solarization_threshold: float) -> torch.Tensor:
    """The photometric ops of one [C, H, W] crop, in order: intensity (gamma, contrast, brightness), RGB colour jitter
    and grayscale, Gaussian blur, solarisation, additive noise (from a CPU generator seeded by the crop's seed)."""
    if p.intensity:
        crop = adjust_intensity(crop, *(torch.tensor(f) for f in (p.brightness, p.contrast, p.gamma)))
    if p.color is not None:
        if p.color.jitter:
            crop = rgb_color_jitter(crop, p.color.brightness, p.color.contrast, p.color.saturation, p.color.hue)
        if p.color.grayscale:
            crop = rgb_to_grayscale(crop)
    if p.blur:
        crop = gaussian_blur(crop, p.sigma)
    if p.solarize:
        crop = solarize(crop, solarization_threshold)
    if p.noise:
        crop = add_gaussian_noise(crop, p.noise_std, torch.Generator().manual_seed(p.noise_seed))
    return crop


class _Field:
    """A sample's image plus its lazily made half-resolution copy, shared by the sample's crops."""

    def __init__(self, image: torch.Tensor) -> None:
        self.image = image
        self._half: torch.Tensor | None = None

    def region(self, top: int, left: int, h: int, w: int, out_size: int) -> torch.Tensor:
        """The box's pixels, from the half-resolution copy when the box is >= PYRAMID_MIN_FACTOR x `out_size`."""
        if min(h, w) < PYRAMID_MIN_FACTOR * out_size:
            return self.image[:, top : top + h, left : left + w]
        if self._half is None:
            self._half = box_downsample_2x(self.image)
        return self._half[:, top // 2 : top // 2 + h // 2, left // 2 : left // 2 + w // 2]


class EvalTransform:
    """Deterministic eval view for k-NN features: shorter side resized to `size`, centre crop, the 'all' view mapped
    to `in_chans` by the channel rule, the same normalisation. `transform(sample)` -> sample with the new image."""

    def __init__(
        self, size: int, in_chans: int, channel_mean: Sequence[float] | None, channel_std: Sequence[float] | None
    ) -> None:
        self.size = size
        self.in_chans = in_chans
        self.channel_mean = channel_mean
        self.channel_std = channel_std

    def __call__(self, sample: Mapping) -> dict:
        image: torch.Tensor = sample["image"]
        n_channels, height, width = image.shape
        factor = self.size / min(height, width)
        new_h, new_w = max(self.size, round(height * factor)), max(self.size, round(width * factor))
        view = resolve_view("all", n_channels, self.in_chans, "evaluation channel view")
        crop, mean, std = take_view(image, view, 0, self.channel_mean, self.channel_std)
        crop = resize(crop, (new_h, new_w))
        top, left = (new_h - self.size) // 2, (new_w - self.size) // 2
        crop = crop[:, top : top + self.size, left : left + self.size]
        if mean is not None:
            crop = normalize(crop, mean, std)
        out = {key: value for key, value in sample.items() if key != "mask"}
        out["image"] = to_in_chans(crop, self.in_chans).contiguous()
        return out
