"""HuggingFace datasets as a dataset family: save_to_disk folders and hub names from the local cache (built here,
nothing downloaded), image and label columns, splits, undecodable rows, clear errors."""

from __future__ import annotations

import io
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from dinocell.data import make_dataset
from dinocell.data.registry import DatasetStringError

datasets = pytest.importorskip("datasets", reason="pip install datasets (the [hf] extra) to test this family")


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def pixels(n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (6, 5, 3), dtype=np.uint8) for _ in range(n)]


def image_table(arrays: list[np.ndarray], labels: list, features: dict | None = None) -> datasets.Dataset:
    data = {"img": [{"bytes": png(a), "path": None} for a in arrays], "fine_label": labels}
    types = datasets.Features({"img": datasets.Image(), **(features or {
        "fine_label": datasets.ClassLabel(names=["cat", "dog", "eel"])})})
    return datasets.Dataset.from_dict(data, features=types)


def test_save_to_disk_folder_with_splits_class_labels_and_pixels_as_image_folder(tmp_path):
    train, test = pixels(4, 0), pixels(3, 1)
    datasets.DatasetDict({"train": image_table(train, [0, 2, 1, 2]), "test": image_table(test, [1, 1, 0])}) \
        .save_to_disk(str(tmp_path / "saved"))
    ds = make_dataset(f"HuggingFace:root={tmp_path / 'saved'}:split=test:image_column=img:label_column=fine_label")
    assert len(ds) == 3 and ds.classes == ["cat", "dog", "eel"]
    sample = ds[2]
    assert sample["label"] == 0 and sample["id"].endswith("/test/2") and "meta" not in sample
    expected = torch.from_numpy(test[2].transpose(2, 0, 1).astype(np.float32) / 255.0)
    torch.testing.assert_close(sample["image"], expected)
    grey = make_dataset(f"HFDataset:root={tmp_path / 'saved'}:image_column=img:label_column=none:channels=1")
    assert grey[0]["label"] == -1 and grey[0]["image"].shape == (1, 6, 5)
    with pytest.raises(ValueError, match="has no split 'tset'. Did you mean 'test'\\? Its splits: train, test"):
        make_dataset(f"HuggingFace:root={tmp_path / 'saved'}:split=tset:image_column=img")
    with pytest.raises(ValueError, match="image_column='image' is not a column. .*Columns: img, fine_label"):
        make_dataset(f"HuggingFace:root={tmp_path / 'saved'}")


def test_string_labels_become_sorted_classes_and_a_bad_row_is_a_counted_substitute(tmp_path):
    arrays = pixels(4, 2)
    table = datasets.Dataset.from_dict(
        {"image": [{"bytes": png(arrays[0]), "path": None}, {"bytes": b"not a png", "path": None},
                   *({"bytes": png(a), "path": None} for a in arrays[2:])],
         "label": ["stem", "neuron", "glia", "neuron"]},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.Value("string")}))
    table.save_to_disk(str(tmp_path / "one"))  # a single Dataset: its own split
    ds = make_dataset(f"HuggingFace:root={tmp_path / 'one'}")
    assert ds.classes == ["glia", "neuron", "stem"] and [ds[i]["label"] for i in (0, 2, 3)] == [2, 0, 1]
    substitute = ds[1]  # undecodable: the next good row stands in, marked so that evaluation skips it
    assert substitute["label"] == 0 and substitute["meta"]["bad_reason"] == "undecodable"
    assert substitute["meta"]["substituted_for"].endswith("/train/1") and ds.bad_sample_counts()["total"] == 1


def test_hub_name_resolves_from_the_local_cache_only(tmp_path):
    from datasets.packaged_modules.parquet.parquet import Parquet

    arrays = pixels(5, 3)
    image_table(arrays, [0, 1, 2, 0, 1]).to_parquet(str(tmp_path / "train.parquet"))
    # prepare it as `load_dataset("someone/cells")` leaves it in the cache: <cache>/someone___cells/<config>/...
    builder = Parquet(cache_dir=str(tmp_path / "build"), dataset_name="cells", config_name="default",
                      data_files={"train": str(tmp_path / "train.parquet")}, hash="0123abcd")
    builder.download_and_prepare()
    shutil.copytree(builder.cache_dir, tmp_path / "cache" / "someone___cells" / "default" / "0.0.0" / "0123abcd")
    ds = make_dataset(f"HuggingFace:name=someone/cells:cache_dir={tmp_path / 'cache'}:image_column=img:"
                      "label_column=fine_label:split=train[:3]")
    assert len(ds) == 3 and ds.classes == ["cat", "dog", "eel"] and ds[2]["label"] == 2
    torch.testing.assert_close(ds[1]["image"], torch.from_numpy(arrays[1].transpose(2, 0, 1) / 255.0).float())
    with pytest.raises(FileNotFoundError, match="'someone/other' .* is not in the local datasets cache .*"
                                                "load_dataset\\('someone/other'\\)"):
        make_dataset(f"HuggingFace:name=someone/other:cache_dir={tmp_path / 'cache'}")


def test_exactly_one_source():
    with pytest.raises(ValueError, match="give exactly one of name="):
        make_dataset("HuggingFace")
    with pytest.raises(DatasetStringError, match="Did you mean 'split'"):
        make_dataset("HuggingFace:name=x:splt=train")
