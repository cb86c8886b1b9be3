"""`dinocell viz ...` end to end from a saved tiny model: every figure is a valid image of the expected size, the
embedding map has one point per sample and matches sklearn's PCA, and bad input gets a clear message."""

import csv
import time

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from dinocell.commands import viz
from dinocell.data import make_dataset
from dinocell.eval.embedding_map import FIGURE_SIZE_PX, colour_values, embed_2d
from dinocell.models import build_backbone

TINY = ["--arch", "vit_test", "--patch-size", "8", "--n-storage-tokens", "1", "--in-chans", "5", "--image-size", "32"]
TINY_CROPS = ["student.arch=vit_test", "student.patch_size=8", "student.n_storage_tokens=1", "student.in_chans=5",
              "crops.global_crops_size=32", "crops.local_crops_size=16", "crops.local_crops_number=2"]
DATASET = "SyntheticCellPainting:size=12:image_size=48"


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(1)
    backbone = build_backbone("vit_test", patch_size=8, n_storage_tokens=1, in_chans=5)
    path = tmp_path / "backbone.pth"
    torch.save(backbone.state_dict(), path)  # the official DINOv3 backbone layout
    return path


def _size(path):
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        return im.size


def test_attention_and_pca_from_a_checkpoint_on_a_dataset(tmp_path, checkpoint, capsys):
    model = ["--checkpoint", str(checkpoint), *TINY]
    assert viz.main(["attention", "--dataset", DATASET, "--num-images", "2", "--masks", "--out",
                     str(tmp_path / "att"), *model]) == 0
    assert f"from {checkpoint}" in capsys.readouterr().out
    names = sorted(p.name for p in (tmp_path / "att").iterdir())
    assert len(names) == 8 and "synthetic_train_seed0_1_heads.gif" in names
    tile_w, tile_h = 96, 96 + 12
    assert _size(tmp_path / "att" / "synthetic_train_seed0_0.png") == (2 + 2 * (tile_w + 2), 2 + tile_h + 2)

    assert viz.main(["pca", "--dataset", DATASET, "--indices", "3", "4", "5", "--foreground-threshold", "0.5",
                     "--out", str(tmp_path / "pca"), *model]) == 0
    assert _size(tmp_path / "pca" / "pca_grid.png") == (2 + 6 * (tile_w + 2), 2 + tile_h + 2)
    assert _size(tmp_path / "pca" / "synthetic_train_seed0_4_pca.png") == (2 + 2 * (tile_w + 2), 2 + tile_h + 2)


def test_image_files_tiff_png_npz(tmp_path, checkpoint):
    rng = np.random.default_rng(0)
    tifffile.imwrite(tmp_path / "cell.tif", rng.integers(0, 4000, (40, 40, 5), dtype=np.uint16))  # channel-last
    Image.fromarray(rng.integers(0, 255, (40, 40), dtype=np.uint8)).save(tmp_path / "grey.png")
    np.savez(tmp_path / "slab.npz", array=rng.normal(size=(5, 40, 40)).astype(np.float32))
    files = [str(tmp_path / n) for n in ("cell.tif", "grey.png", "slab.npz")]
    assert viz.main(["pca", *TINY, "--checkpoint", str(checkpoint), "--out", str(tmp_path / "out"),
                     "--images", *files]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "cell.tif_pca.png", "grey.png_pca.png", "pca_grid.png", "slab.npz_pca.png"]


def test_bad_input_is_named(tmp_path, capsys):
    out = str(tmp_path / "x")
    assert viz.main(["attention", "--images", str(tmp_path / "missing.tif"), "--out", out, *TINY]) == 2
    assert "image file" in capsys.readouterr().err
    assert viz.main(["montage", "--out", out, "--images", str(tmp_path / "a.tif"), "student.arch=vit_test"]) == 2
    assert "look like config overrides: put KEY=VALUE overrides before --images" in capsys.readouterr().err
    assert viz.main(["embedding", "--dataset", DATASET, "--method", "pca", "--color-by", "clas_name", "--out", out,
                     *TINY]) == 2
    assert "colour column 'clas_name' is missing" in capsys.readouterr().err
    assert viz.main(["attention", "--dataset", DATASET, "--indices", "99", "--out", out, *TINY]) == 2
    assert "--indices [99] out of range: the images have 12 samples" in capsys.readouterr().err
    assert viz.main(["pca", "--dataset", DATASET, "--arch", "vit_smal", "--out", out]) == 2
    assert "unknown architecture 'vit_smal'; expected one of" in capsys.readouterr().err  # eval's model options
    with pytest.raises(SystemExit) as exit_info:
        viz.main(["attention", "--help"])
    assert exit_info.value.code == 0 and "example: dinocell viz attention" in capsys.readouterr().out


def test_embedding_pca_map_has_one_point_per_sample_and_matches_sklearn(tmp_path, checkpoint):
    from sklearn.decomposition import PCA

    dataset_str = "SyntheticCellPainting:size=12:image_size=32"  # the eval view (32 px) is then the image itself
    assert viz.main(["embedding", "--dataset", dataset_str, "--method", "pca", "--color-by", "class_name",
                     "--checkpoint", str(checkpoint), "--out", str(tmp_path), *TINY]) == 0
    assert _size(tmp_path / "embedding_pca.png") == FIGURE_SIZE_PX
    with open(tmp_path / "embedding_pca.csv") as f:
        rows = list(csv.DictReader(f))
    dataset = make_dataset(dataset_str)
    assert [r["id"] for r in rows] == [dataset[i]["id"] for i in range(12)]
    assert [r["class_name"] for r in rows] == [dataset[i]["meta"]["class_name"] for i in range(12)]

    # independent: sklearn PCA of the same model's L2-normalised cls features
    backbone = build_backbone("vit_test", patch_size=8, n_storage_tokens=1, in_chans=5)
    backbone.load_state_dict(torch.load(checkpoint, weights_only=True))
    images = torch.stack([dataset[i]["image"] for i in range(12)])
    with torch.no_grad():
        features = torch.nn.functional.normalize(backbone.eval()(images), dim=-1).numpy()
    reference = PCA(n_components=2).fit_transform(features)
    ours = np.array([[float(r["x"]), float(r["y"])] for r in rows])
    signs = np.sign((ours * reference).sum(axis=0))
    np.testing.assert_allclose(ours, reference * signs, atol=1e-4)


def test_embedding_of_evenly_spaced_samples(tmp_path):
    assert viz.main(["embedding", "--dataset", DATASET, "--method", "pca", "--max-samples", "5", "--out",
                     str(tmp_path), *TINY]) == 0
    with open(tmp_path / "embedding_pca.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["id"].rsplit("/", 1)[1] for r in rows] == ["0", "2", "4", "7", "9"]
    assert [r["label"] for r in rows] == ["phenotype_0", "phenotype_2", "phenotype_0", "phenotype_3", "phenotype_1"]


def test_colour_values_by_label_use_class_names():
    records = [{"id": "a", "label": 1}, {"id": "b", "label": -1}]
    assert colour_values(records, "label", ["x", "y"]) == ["y", "unlabelled"]
    with pytest.raises(ValueError, match="UMAP needs at least 4 samples, got 3; use method 'pca'"):
        embed_2d(torch.zeros(3, 8), "umap")
    with pytest.raises(ValueError, match="unknown embedding method 'tsne'"):
        embed_2d(torch.zeros(3, 8), "tsne")


@pytest.mark.slow
def test_umap_map_has_one_point_per_sample(tmp_path):
    pytest.importorskip("umap", reason="UMAP maps need umap-learn: pip install 'dinocell[viz]'")
    features = torch.nn.functional.normalize(torch.randn(12, 16, generator=torch.Generator().manual_seed(0)), dim=1)
    start = time.perf_counter()
    coords = embed_2d(features, "umap", n_neighbors=30)  # capped at N - 1 = 11
    print(f"UMAP of 12 points, numba compilation included: {time.perf_counter() - start:.1f} s")
    assert coords.shape == (12, 2) and np.isfinite(coords).all() and len({tuple(c) for c in coords}) == 12


def test_montage_command(tmp_path):
    out = tmp_path / "montage.png"
    assert viz.main(["montage", "--dataset", DATASET, "--num-images", "2", "--out", str(out), *TINY_CROPS]) == 0
    columns = 1 + 5 + 2 + 2
    assert _size(out) == (2 + columns * (96 + 2), 2 + 2 * (96 + 12 + 2))
