"""Per-image normalisation shared by the datasets: ranges, flat channels, 16-bit inputs."""

import pytest
import torch

from dinocell.data.normalize import minmax_normalize, normalize_image, percentile_normalize, zscore_normalize


def test_percentile_maps_tails_to_the_unit_range_per_channel():
    gen = torch.Generator().manual_seed(0)
    image = torch.stack([torch.rand(300, 300, generator=gen) * 65535, torch.rand(300, 300, generator=gen) * 10 + 5])
    out = percentile_normalize(image, low=1.0, high=99.0)
    assert out.dtype == torch.float32 and out.shape == image.shape
    for c in range(2):
        assert out[c].min() == 0.0 and out[c].max() == 1.0
        # ~1 % of the values clip at each end (subsampled percentiles are within a fraction of a percent)
        assert abs((out[c] == 0).float().mean().item() - 0.01) < 0.003
        assert abs((out[c] == 1).float().mean().item() - 0.01) < 0.003


def test_percentile_keeps_16_bit_resolution_and_zeroes_flat_channels():
    ramp = torch.arange(65536, dtype=torch.float32).reshape(1, 256, 256)
    image = torch.cat([ramp, torch.full_like(ramp, 1234.0)])
    out = percentile_normalize(image, low=0.0, high=100.0)
    assert torch.allclose(out[0], ramp[0] / 65535, atol=1e-6)  # 65536 distinct levels survive
    assert out[0].unique().numel() == 65536
    assert torch.equal(out[1], torch.zeros_like(out[1]))


def test_zscore_and_minmax():
    image = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[0.0, 0.0], [0.0, 0.0]]])
    z = zscore_normalize(image)
    assert torch.allclose(z[0].mean(), torch.tensor(0.0), atol=1e-6)
    assert torch.allclose(z[0].std(unbiased=False), torch.tensor(1.0), atol=1e-5)
    assert torch.equal(z[1], torch.zeros(2, 2))
    m = minmax_normalize(image)
    assert torch.allclose(m[0], torch.tensor([[0.0, 1 / 3], [2 / 3, 1.0]]))
    assert torch.equal(m[1], torch.zeros(2, 2))


def test_unknown_method_names_the_choices():
    with pytest.raises(ValueError, match="'pct' is not one of percentile, zscore, minmax, none"):
        normalize_image(torch.zeros(1, 2, 2), "pct")
