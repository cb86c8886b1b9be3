"""JUMP Cell Painting from local disk: stain mapping, 16-bit values, bad files, crop reuse, illum, own-index folders."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
import tifffile
import torch
from s3_server import S2, S4, STAINS, make_gallery, plane, tiff_bytes
from torch.utils.data import DataLoader

from dinocell.data import make_dataset
from dinocell.data.dataset import DatasetError
from dinocell.data.datasets.jump import JUMPCellPaintingMultiView
from dinocell.data.io.bad_files import BadFileError
from dinocell.data.io.tiff import decode_tiff


@pytest.fixture(scope="module")
def gallery(tmp_path_factory):
    return make_gallery(tmp_path_factory.mktemp("gallery"))


def key(source: tuple[str, str, str], well: str, site: int) -> str:
    return "/".join((*source, well, str(site)))


def test_decode_tiff_keeps_16_bits_and_names_each_kind_of_bad_file():
    array = (np.arange(32 * 32).reshape(32, 32) * 60 + 300).astype(np.uint16)
    data = tiff_bytes(array)
    decoded = decode_tiff(data, "k")
    assert decoded.dtype == np.uint16 and np.array_equal(decoded, array) and decoded.max() > 60000
    cases = {
        "truncated": data[: len(data) - 100],
        "zero_filled": bytes(len(data)),
        "undecodable": b"II*\x00" + bytes(range(256)) * 8,
    }
    for reason, broken in cases.items():
        with pytest.raises(BadFileError) as info:
            decode_tiff(broken, "s3://b/x.tiff")
        assert info.value.reason == reason and "s3://b/x.tiff" in str(info.value)
    with pytest.raises(BadFileError, match="all pixels are 0"):
        decode_tiff(tiff_bytes(np.zeros((8, 8), np.uint16)), "k")


def test_local_mirror_maps_stains_by_name_across_channel_orders(gallery):
    ds = JUMPCellPaintingMultiView(root=gallery.root, channels=["Mito", "DNA", "agp"], normalization="none")
    assert len(ds) == 8  # 4 fields per plate, bad ones included until they are read
    assert ds.bad_sample_counts()["total"] == 0
    for index in range(len(ds)):
        sample = ds[index]
        if sample["id"] != ds.field_key(index):
            continue  # a substituted bad field (checked below)
        assert sample["image"].dtype == torch.float32 and sample["image"].shape[0] == 3
        for channel, stain in enumerate(["Mito", "DNA", "AGP"]):
            expected = plane(sample["id"], stain, sample["image"].shape[-1])  # values > 255: 16 bits kept
            assert torch.equal(sample["image"][channel], torch.from_numpy(expected.astype(np.float32)))
        assert sample["label"] == -1 and sample["meta"]["well"] in ("A01", "A02")
    assert ds.bad_sample_counts()["total"] == 2  # missing DNA and zero-filled AGP; the corrupt RNA file is not read
    # the two plates share well/site names but stay separate fields
    assert ds.field_key(0) == key(S2, "A01", 1) and ds.field_key(4) == key(S4, "A01", 1)


def test_bad_fields_are_counted_and_replaced_by_the_next_good_field(gallery):
    ds = JUMPCellPaintingMultiView(root=gallery.root, normalization="none")
    samples = ds.__getitems__(list(range(len(ds))))
    assert not {s["id"] for s in samples} & set(gallery.bad)
    assert ds.bad_sample_counts() == {
        "missing": 1, "truncated": 0, "zero_filled": 1, "undecodable": 1, "bad_shape": 0, "unreachable": 0, "total": 3
    }  # fmt: skip
    by_key = {ds.field_key(i): s for i, s in enumerate(samples)}
    # source_2 A02/1 and A02/2 are bad -> both become source_4 A01/1 (the next good field in index order)
    for bad in (key(S2, "A02", 1), key(S2, "A02", 2)):
        assert by_key[bad]["id"] == key(S4, "A01", 1) and by_key[bad]["meta"]["substituted_for"] == bad
    # the last field (source_4 A02/2, missing DNA) wraps around to the first field
    assert by_key[key(S4, "A02", 2)]["id"] == key(S2, "A01", 1)


class CountingReads(JUMPCellPaintingMultiView):
    reads = 0

    def _read(self, location: str) -> bytes:
        type(self).reads += 1
        return super()._read(location)


def test_crops_per_field_reuses_one_download(gallery):
    ds = CountingReads(root=gallery.root, sources=["source_4"], crops_per_field=3, cache_size=4)
    assert len(ds) == 12
    before = CountingReads.reads
    batch = ds.__getitems__([0, 1, 2, 3])
    assert CountingReads.reads - before == 10  # two fields x 5 stains, not four downloads
    assert [s["meta"]["crop"] for s in batch] == [0, 1, 2, 0]
    assert batch[0]["id"] == batch[2]["id"] != batch[3]["id"]
    ds[1]  # served from the LRU
    assert CountingReads.reads - before == 10


def test_crop_sets_of_a_field_share_one_normalisation(gallery, monkeypatch):
    import dinocell.data.datasets.jump as jump

    calls = []
    real = jump.normalize_image
    monkeypatch.setattr(jump, "normalize_image", lambda image, method: calls.append(method) or real(image, method))
    ds = JUMPCellPaintingMultiView(root=gallery.root, sources=["source_4"], crops_per_field=3)
    batch = ds.__getitems__([0, 1, 2, 3])
    assert len(calls) == 2  # fields 0 and 1, not four times
    assert batch[0]["image"] is batch[2]["image"] and batch[0]["image"].dtype == torch.float32
    assert batch[0]["image"].max() == 1.0  # percentile-normalised


def test_training_loader_downloads_each_field_once_for_its_crop_sets(gallery):
    from dinocell.pipeline.loaders import build_ssl_loader
    from dinocell.pipeline.masking import IBotMaskPlanner

    ds = CountingReads(root=gallery.root, sources=["source_4"], crops_per_field=2, cache_size=0)
    planner = IBotMaskPlanner(global_batch_size=4, n_global_crops=2, grid_size=2, mask_sample_probability=0.5,
                              mask_ratio_min_max=(0.1, 0.5), seed=0)
    loader = build_ssl_loader(ds, lambda sample, position: {"global_crops": [sample["image"][:, :16, :16]] * 2,
                                                            "local_crops": []},
                              planner, batch_size_per_rank=4, local_crops_size=8)
    before = CountingReads.reads
    batches = [batch for _, batch in zip(range(2), loader)]
    assert CountingReads.reads - before == 4 * 5  # 2 batches x 2 fields x 5 stains, even with no cache at all
    for batch in batches:  # crops 0 and 1 (and 2 and 3) are cut from the same field's image
        crops = batch.global_crops[:4]
        assert torch.equal(crops[0], crops[1]) and torch.equal(crops[2], crops[3])


def test_cached_fields_of_a_batch_survive_evictions_by_its_new_fields(gallery):
    class LoggingReads(JUMPCellPaintingMultiView):
        locations: list[str] = []

        def _read(self, location: str) -> bytes:
            type(self).locations.append(location)
            return super()._read(location)

    ds = LoggingReads(root=gallery.root, sources=["source_4"], cache_size=2)
    ds.__getitems__([0, 1])
    LoggingReads.locations.clear()
    ds.__getitems__([2, 3, 0, 1])  # storing fields 2 and 3 evicts 0 and 1 before they are assembled
    # Count only fields 0-2: field 3 has a missing file, and its other reads may still be in flight in the pool.
    held = {loc for f in (0, 1) for loc in ds.fields[f].files}
    assert not held & set(LoggingReads.locations)
    assert sorted(loc for loc in LoggingReads.locations if loc in ds.fields[2].files) == sorted(ds.fields[2].files)


def test_workers_share_bad_sample_counts(gallery):
    ds = JUMPCellPaintingMultiView(root=gallery.root, concurrency=2)
    loader = DataLoader(ds, batch_size=4, num_workers=2, collate_fn=list)
    ids = [s["id"] for batch in loader for s in batch]
    assert len(ids) == 8 and not set(ids) & set(gallery.bad)
    assert ds.bad_sample_counts()["total"] == 3  # found in the workers, visible in the main process


def test_default_percentile_normalisation_and_illumination_correction(gallery):
    ds = JUMPCellPaintingMultiView(root=gallery.root, sources=["source_2"], normalization="none", illum_correction=True)
    sample = ds[0]
    raw = plane(key(S2, "A01", 1), "DNA", 20).astype(np.float32)
    expected = raw / gallery.illum[S2[2]]["DNA"]
    assert torch.allclose(sample["image"][0], torch.from_numpy(expected), rtol=1e-6)
    normalised = JUMPCellPaintingMultiView(root=gallery.root, sources=["source_2"])[0]["image"]
    assert normalised.min() == 0.0 and normalised.max() == 1.0


def test_folder_with_its_own_index(tmp_path):
    rows = []
    for site in (1, 2):
        row = {"Metadata_Plate": "0042", "Metadata_Well": "B03", "Metadata_Site": site}
        for i, stain in enumerate(STAINS):
            name = f"img_s{site}_w{i}.tif"
            (tmp_path / "tiffs").mkdir(exist_ok=True)
            tifffile.imwrite(tmp_path / "tiffs" / name, plane(f"own/{site}", stain, 16))
            row[f"FileName_Orig{stain}"], row[f"PathName_Orig{stain}"] = name, "tiffs"
        rows.append(row)
    pd.DataFrame(rows).to_csv(tmp_path / "load_data.csv.gz", index=False)
    ds = make_dataset(f"JUMPCellPaintingMultiView:root={tmp_path}:channels=RNA:normalization=none")
    assert [f.key for f in ds.fields] == ["local/local/0042/B03/1", "local/local/0042/B03/2"]
    assert torch.equal(ds[1]["image"][0], torch.from_numpy(plane("own/2", "RNA", 16).astype(np.float32)))


def test_dataset_string_filters_and_unknown_stain_error(gallery):
    ds = make_dataset(f"JUMPCellPaintingMultiView:root={gallery.root}:plates=BR00117035:channels=DNA,RNA")
    assert len(ds) == 4 and ds[0]["image"].shape == (2, 24, 24)
    with pytest.raises(ValueError, match="'Actn' is not in index .*; its stains are AGP, DNA, ER, Mito, RNA$"):
        JUMPCellPaintingMultiView(root=gallery.root, channels=["DNA", "Actn"])
    with pytest.raises(ValueError, match="'Mitoo' is not in index .*; closest: 'Mito'"):
        JUMPCellPaintingMultiView(root=gallery.root, channels=["DNA", "Mitoo"])


def test_missing_illumination_function_makes_fields_bad_not_a_crash_mid_batch(tmp_path):
    gallery = make_gallery(tmp_path)
    illum = next(tmp_path.rglob("*_IllumDNA.npy"))
    illum.unlink()
    ds = CountingReads(root=gallery.root, channels=["DNA"], illum_correction=True, sources=["source_2"])
    before = CountingReads.reads
    with pytest.raises(DatasetError, match="no loadable sample.*IllumDNA.npy"):
        ds[0]  # every field of the plate needs it: nothing to substitute, and never a placeholder
    assert ds.bad_sample_counts()["missing"] == 4
    assert CountingReads.reads - before == 1  # the missing function is looked for once; no image is downloaded


def test_index_parsing_formats_preferences_and_locations():
    from dinocell.data.io.index import join_location, pick_index_files, read_index_table

    table = pd.DataFrame({"Metadata_Plate": ["0042"], "Metadata_Site": [1], "FileName_OrigDNA": ["a.tif"]})
    csv_gz = io.BytesIO()
    table.to_csv(csv_gz, index=False, compression="gzip")
    parsed = read_index_table(csv_gz.getvalue(), "x/load_data.csv.gz")
    assert parsed["Metadata_Plate"][0] == "0042" and parsed["Metadata_Site"][0] == "1"
    parquet = io.BytesIO()
    table.assign(Metadata_Site=[1.0]).to_parquet(parquet)
    assert read_index_table(parquet.getvalue(), "load_data.parquet")["Metadata_Site"][0] == "1"
    with pytest.raises(ValueError, match="not .csv, .csv.gz or .parquet"):
        read_index_table(b"", "load_data.txt")

    names = ["s/p1/load_data.csv", "s/p1/load_data_with_illum.parquet", "s/p2/load_data.csv.gz", "s/p2/notes.csv"]
    assert pick_index_files(names) == ["s/p1/load_data_with_illum.parquet", "s/p2/load_data.csv.gz"]

    index = "s3://bucket/proj/src/workspace/load_data_csv/b/p/load_data.csv"
    https = "https://cellpainting-gallery.s3.amazonaws.com/cpg0016-jump/source_4/images/"
    assert join_location(https, "f.tiff", index) == "s3://cellpainting-gallery/cpg0016-jump/source_4/images/f.tiff"
    assert join_location("../img", "f.tiff", index) == "s3://bucket/proj/src/workspace/load_data_csv/b/img/f.tiff"
    assert join_location("/mnt/data/img", "f.tiff", index) == "/mnt/data/img/f.tiff"
