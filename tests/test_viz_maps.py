"""Attention maps, PCA feature maps, crop montages and their pixels, from a tiny model on synthetic cells."""

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from dinocell.data import make_dataset
from dinocell.eval import render
from dinocell.eval.attention_maps import attention_figures, attention_mass_mask, cls_attention_maps, write_attention
from dinocell.eval.montage import crop_montage
from dinocell.eval.pca_maps import fit_pca, patch_tokens, pca_feature_maps, pca_figures, write_pca
from dinocell.layers.attention import TokenGroup
from dinocell.models import build_backbone
from dinocell.pipeline.loaders import build_ssl_transform

PATCH = 8


@pytest.fixture
def backbone():
    torch.manual_seed(0)
    model = build_backbone("vit_test", patch_size=PATCH, in_chans=5, n_storage_tokens=2)
    for p in model.parameters():  # a non-trivial model: random weights well away from init (LayerScale 1e-5)
        p.data.normal_(0, 0.3)
    return model.eval()


@pytest.fixture
def images():
    dataset = make_dataset("SyntheticCellPainting:size=8:image_size=32")
    return torch.stack([dataset[i]["image"] for i in range(3)])


def _grid_size(n_tiles: int, columns: int, tile_h: int, tile_w: int, pad: int = 2) -> tuple[int, int]:
    """(width, height) of a tile grid, computed here independently of tile_grid."""
    columns = min(columns, n_tiles)
    rows = -(-n_tiles // columns)
    return pad + columns * (tile_w + pad), pad + rows * (tile_h + pad)


def test_channel_colours_and_composite():
    colours = render.channel_colours(5)
    np.testing.assert_allclose(colours, [render.STAIN_COLOURS[n] for n in ("DNA", "ER", "RNA", "AGP", "Mito")])
    assert render.channel_colours(1).tolist() == [[1, 1, 1]]
    assert render.channel_colours(3).tolist() == np.eye(3).tolist()
    np.testing.assert_allclose(render.channel_colours(2, ["Mito", "DNA"]), [[1, 0, 1], [0, 0.3, 1]])
    with pytest.raises(ValueError, match="no colour for channel name.*'Nuclei'.*known stains: DNA"):
        render.channel_colours(1, ["Nuclei"])
    image = torch.zeros(5, 4, 4)
    image[4, 1, 2] = 7.0  # only Mito lights one pixel
    picture = render.composite(image)
    assert picture.shape == (4, 4, 3) and picture[1, 2].tolist() == [1.0, 0.0, 1.0]
    assert picture.sum() == 2.0  # nothing else lit


def test_attention_rows_sum_to_one_and_match_the_blocks_own_attention(backbone, images):
    attention = cls_attention_maps(backbone, images)
    assert attention.maps.shape == (3, 2, 4, 4)  # 32 px / patch 8 = 4 x 4 grid, vit_test has 2 heads
    torch.testing.assert_close(attention.maps.sum(dim=(-2, -1)), torch.ones(3, 2))
    assert ((attention.patch_share > 0) & (attention.patch_share < 1)).all()

    # independent reference: softmax(q k^T / sqrt(d)) of the cls row, recomputed from the last block's qkv, and
    # its product with v must reproduce the block's own (SDPA) attention output for the cls token
    last = backbone.blocks[-1]
    with torch.no_grad():
        tokens, rope = backbone._tokens(images, None)
        for block in backbone.blocks[:-1]:
            tokens = block(tokens, rope)
        x = last.norm1(tokens)
        group = TokenGroup(x.shape[0], x.shape[1], rope)
        q, k, v = last.attn._heads(last.attn.qkv(x.flatten(0, 1)), group)
        weights = torch.softmax(q[:, :, :1] @ k.transpose(-2, -1) / q.shape[-1] ** 0.5, dim=-1)  # [B, H, 1, T]
        cls_out = last.attn.proj((weights @ v).transpose(1, 2).reshape(3, 1, -1))
        torch.testing.assert_close(cls_out[:, 0], last.attn(x, [group])[:, 0], atol=1e-5, rtol=1e-4)
    prefix = 1 + backbone.n_storage_tokens
    patches = weights[:, :, 0, prefix:]
    torch.testing.assert_close(attention.patch_share, patches.sum(-1))
    torch.testing.assert_close(attention.maps.flatten(-2), patches / patches.sum(-1, keepdim=True))


def test_mass_mask_keeps_the_fewest_patches_holding_the_share():
    maps = torch.tensor([0.05, 0.5, 0.1, 0.2, 0.15]).reshape(1, 5)
    assert attention_mass_mask(maps, 0.6).tolist() == [[False, True, False, True, False]]  # 0.5 + 0.2 >= 0.6
    assert attention_mass_mask(maps, 0.5).tolist() == [[False, True, False, False, False]]
    assert attention_mass_mask(maps, 1.0).all()
    with pytest.raises(ValueError, match="share must be in \\(0, 1\\], got 0"):
        attention_mass_mask(maps, 0.0)
    maps = torch.rand(50, 6, 7).softmax(-1)  # brute-force check of the rule on random maps
    for one, keep in zip(maps, attention_mass_mask(maps, 0.6)):
        kept, dropped = one[keep], one[~keep]
        assert kept.sum() >= 0.6 * one.sum() - 1e-6
        assert kept.sum() - kept.min() < 0.6 * one.sum()  # one patch fewer would not do
        assert dropped.numel() == 0 or kept.min() >= dropped.max()


def test_attention_figures_are_images_of_the_expected_size(backbone, images, tmp_path):
    attention = cls_attention_maps(backbone, images)
    picture = render.composite(images[0])
    figures = attention_figures(picture, attention, 0, PATCH, mass_share=0.6)
    assert attention_figures(picture, attention, 0, PATCH).masks is None
    paths = write_attention(figures, tmp_path, "synthetic/test/0")
    assert [p.name for p in paths] == ["synthetic_test_0.png", "synthetic_test_0_heads.png",
                                       "synthetic_test_0_heads.gif", "synthetic_test_0_masks.png"]
    side = 32 * render.tile_factor(32)  # 32 px images are enlarged to >= 96 px tiles
    assert side == 96
    tile = (side + render.LABEL_HEIGHT, side)
    with Image.open(paths[0]) as im:
        assert im.format == "PNG" and im.size == _grid_size(2, 2, *tile)
    with Image.open(paths[1]) as im:
        assert im.size == _grid_size(3, 8, *tile)  # image + 2 heads
    with Image.open(paths[2]) as gif:
        assert gif.format == "GIF" and gif.n_frames == 2 and gif.size == (side, side + render.LABEL_HEIGHT)
    with Image.open(paths[3]) as im:
        assert im.size == _grid_size(3, 8, *tile)


def test_pca_maps_lie_in_unit_range_on_the_patch_grid_and_match_sklearn(backbone, images, tmp_path):
    from sklearn.decomposition import PCA

    tokens = patch_tokens(backbone, images)
    assert tokens.shape == (3, 4, 4, 32)
    rgb, foreground = pca_feature_maps(tokens)
    assert rgb.shape == (3, 4, 4, 3) and foreground is None
    assert rgb.min() >= 0 and rgb.max() <= 1 and rgb.max() == 1 and rgb.min() == 0

    flat = tokens.reshape(-1, 32)
    reference = PCA(n_components=3).fit(flat.numpy())
    ours = fit_pca(flat)
    cosines = (ours.components @ torch.from_numpy(reference.components_).float().T).diagonal()
    torch.testing.assert_close(cosines.abs(), torch.ones(3), atol=1e-4, rtol=0)

    rgb, foreground = pca_feature_maps(tokens, foreground_threshold=0.5)
    first = ours.scaled(tokens)[..., 0]
    assert torch.equal(foreground, first > 0.5) and 3 <= int(foreground.sum()) < foreground.numel()
    assert (rgb[~foreground] == 0).all() and rgb.min() >= 0 and rgb.max() <= 1
    _, inverted = pca_feature_maps(tokens, foreground_threshold=0.5, invert=True)
    assert torch.equal(inverted, first < 0.5)
    with pytest.raises(ValueError, match="foreground threshold must be in \\(0, 1\\)"):
        pca_feature_maps(tokens, foreground_threshold=1.5)

    ids = ["a", "b", "c"]
    paths = write_pca(*pca_figures([render.composite(im) for im in images], rgb, PATCH, ids), tmp_path, ids)
    tile = (96 + render.LABEL_HEIGHT, 96)
    assert [p.name for p in paths] == ["a_pca.png", "b_pca.png", "c_pca.png", "pca_grid.png"]
    with Image.open(paths[0]) as im:
        assert im.size == _grid_size(2, 2, *tile)
    with Image.open(paths[-1]) as im:
        assert im.size == _grid_size(6, 8, *tile)


def test_crop_montage_shows_field_channels_and_every_crop():
    from dinocell.config import load_config

    cfg = load_config(None, ["student.in_chans=5", "crops.global_crops_size=32", "crops.local_crops_size=16",
                             "crops.local_crops_number=3", "crops.channel_views.local=mean"])
    dataset = make_dataset("SyntheticCellPainting:size=8:image_size=64")
    picture = crop_montage(dataset, build_ssl_transform(cfg), [0, 5], views=dataclasses.asdict(cfg.crops.channel_views))
    side = 32 * render.tile_factor(32)
    columns = 1 + 5 + 2 + 3  # field, 5 channels, 2 global, 3 local crops
    assert picture.dtype == np.uint8 and picture.shape == (*_grid_size(2 * columns, columns, side + 12, side)[::-1], 3)
    local_tile = picture[2 + render.LABEL_HEIGHT : 2 + render.LABEL_HEIGHT + side, 2 + 10 * (side + 2):][:, :side]
    assert (local_tile[..., 0] == local_tile[..., 1]).all() and (local_tile[..., 1] == local_tile[..., 2]).all()
    field_tile = picture[2 + render.LABEL_HEIGHT : 2 + render.LABEL_HEIGHT + side, 2 : 2 + side]
    assert not (field_tile[..., 0] == field_tile[..., 2]).all()  # the field is a colour composite


def test_gif_and_grid_writers_reject_bad_input(tmp_path):
    with pytest.raises(ValueError, match="share one size"):
        render.tile_grid([np.zeros((4, 4, 3), np.uint8), np.zeros((5, 4, 3), np.uint8)], columns=2)
    frames = [np.full((6, 8, 3), k * 40, np.uint8) for k in range(3)]
    with Image.open(render.save_gif(frames, tmp_path / "a.gif")) as gif:
        assert gif.n_frames == 3 and gif.size == (8, 6)
    assert render.safe_stem("JUMP/source_4/B1/r01c01f01") == "JUMP_source_4_B1_r01c01f01"
