"""Feature extraction and export: rows in dataset order, bad samples skipped and counted, chunked resumable files,
several processes (gloo) giving what one process gives, and `dinocell eval features`."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from eval_data import Tiles, tiny_config, tiny_model
from PIL import Image

from dinocell.data import make_dataset
from dinocell.distributed import process_group_ends
from dinocell.eval.errors import EvalError
from dinocell.eval.features import FeatureSet, export_features, extract, load_features


def reference(model: torch.nn.Module, dataset: Tiles) -> dict[str, np.ndarray]:
    """Every good sample through forward_features one at a time: the independent computation."""
    model.eval()
    good = [i for i in range(len(dataset)) if i not in dataset.bad]
    with torch.no_grad():
        outs = [model.forward_features(dataset[i]["image"][None]) for i in good]
    return {
        "index": np.array(good),
        "cls": torch.cat([o["x_norm_clstoken"] for o in outs]).numpy(),
        "patch_mean": torch.cat([o["x_norm_patchtokens"].mean(1) for o in outs]).numpy(),
        "storage": torch.cat([o["x_storage_tokens"] for o in outs]).numpy(),
    }


def assert_same_rows(a: FeatureSet, b: FeatureSet) -> None:
    np.testing.assert_array_equal(a.index, b.index)
    assert a.ids == b.ids and a.meta == b.meta and a.skipped == b.skipped
    np.testing.assert_array_equal(a.labels, b.labels)
    assert a.features.keys() == b.features.keys()
    for kind in a.features:
        np.testing.assert_allclose(a.features[kind], b.features[kind], atol=1e-5, rtol=1e-5)


def test_extract_rows_kinds_and_skipped_substitutes():
    model, dataset = tiny_model(), Tiles()
    model.train()
    got = extract(model, dataset, None, kinds=["storage", "patch_mean"], batch_size=4, num_workers=0, device="cpu",
                  show_progress=False)
    assert model.training  # the previous mode is restored
    want = reference(model, dataset)
    np.testing.assert_array_equal(got.index, want["index"])
    assert got.ids == [f"s{i}" for i in want["index"]] and got.labels.tolist() == [i % 3 for i in want["index"]]
    assert got.meta[0] == {"plate": "P1", "well": "A01"} and got.classes == ["a", "b", "c"]
    assert list(got.features) == ["cls", "patch_mean", "storage"] and got.features["storage"].shape == (10, 4, 32)
    for kind in ("cls", "patch_mean", "storage"):
        np.testing.assert_allclose(got.features[kind], want[kind], atol=1e-5, rtol=1e-5)
    # sample 5 stood in for a bad file: its image (that of sample 6) is embedded once, as sample 6
    assert got.skipped == [{"index": 5, "id": "s5", "reason": "missing"}] and got.ids.count("s6") == 1
    assert got.bad_counts()["missing"] == 1 and got.bad_counts()["total"] == 1
    np.testing.assert_allclose(got.matrix("cls+patch_mean"), np.concatenate([want["cls"], want["patch_mean"]], 1),
                               atol=1e-5)


def test_a_real_corrupt_file_is_skipped_with_workers_not_embedded_twice(tmp_path):
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png", "d.png"):
        (tmp_path / "cls").mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "cls" / name)
    (tmp_path / "cls" / "c.png").write_bytes(b"not a png")
    dataset = make_dataset(f"ImageFolder:root={tmp_path}")
    got = extract(tiny_model(), dataset, None, batch_size=2, num_workers=1, device="cpu", show_progress=False)
    assert got.ids == ["cls/a.png", "cls/b.png", "cls/d.png"]  # c.png's stand-in (d.png) is not counted again
    assert got.skipped == [{"index": 2, "id": "cls/c.png", "reason": "undecodable"}]


def test_export_is_chunked_and_resumes_only_what_is_missing(tmp_path):
    model, dataset = tiny_model(), Tiles()
    settings = {"dataset": "Tiles", "checkpoint": None}
    args = dict(settings=settings, kinds=("cls", "patch_mean"), chunk_size=4, batch_size=3, num_workers=0,
                device="cpu", show_progress=False)
    manifest = export_features(model, dataset, None, tmp_path, **args)
    assert sorted(p.name for p in tmp_path.glob("chunk_*.npz")) == [f"chunk_0000{k}.npz" for k in range(3)]
    assert manifest["complete"] and manifest["rows"] == 10 and manifest["dims"] == {"cls": [32], "patch_mean": [32]}
    assert manifest["bad_samples"]["missing"] == 1 and manifest["skipped"] == [{"index": 5, "id": "s5",
                                                                                "reason": "missing"}]
    in_memory = extract(model, dataset, None, kinds=("patch_mean",), batch_size=5, num_workers=0, device="cpu",
                        show_progress=False)
    assert_same_rows(load_features(tmp_path), in_memory)

    # a run killed after two chunks: the rerun writes only the missing one
    (tmp_path / "chunk_00001.npz").unlink()
    with pytest.raises(EvalError, match="incomplete: 1 of 3 chunks missing"):
        load_features(tmp_path)
    kept = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("chunk_*.npz")}
    export_features(model, dataset, None, tmp_path, **args)
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("chunk_0000[02].npz")} == kept
    assert_same_rows(load_features(tmp_path), in_memory)
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary file left behind

    with pytest.raises(EvalError, match="other settings \\(chunk_size: 4 there, 5 now\\)"):
        export_features(model, dataset, None, tmp_path, **{**args, "chunk_size": 5})
    with pytest.raises(EvalError, match="no feature directory"):
        load_features(tmp_path / "nothing")


# ------------------------------------------------------------------------------- several processes (gloo)
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    with process_group_ends():
        model, dataset = tiny_model(), Tiles()
        export_features(model, dataset, None, os.path.join(out_dir, "export"), settings={}, chunk_size=3,
                        batch_size=2, num_workers=0, device="cpu", show_progress=False)
        gathered = extract(model, dataset, None, batch_size=2, num_workers=0, device="cpu", distributed_shards=True,
                           show_progress=False)
        torch.save(gathered, os.path.join(out_dir, f"gathered{rank}.pt"))


@pytest.mark.slow
def test_two_processes_give_what_one_process_gives(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    single = extract(tiny_model(), Tiles(), None, batch_size=4, num_workers=0, device="cpu", show_progress=False)
    assert_same_rows(load_features(tmp_path / "export"), single)
    for rank in (0, 1):  # every rank gets the whole set, in dataset order
        assert_same_rows(torch.load(tmp_path / f"gathered{rank}.pt", weights_only=False), single)


# ------------------------------------------------------------------------------- `dinocell eval features`
DATASET = "SyntheticCellPainting:size=10:image_size=32:cell_radius=6:sites_per_well=2"


def test_features_cli_writes_manifest_table_and_jump_style_meta(tmp_path, capsys):
    from dinocell.commands.eval_features import main

    out = tmp_path / "feats"
    args = ["--config-file", tiny_config(tmp_path), "--dataset", DATASET, "--output-dir", str(out),
            "--storage-tokens", "--num-workers", "0", "--batch-size", "4", "--chunk-size", "4"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "rows written            10" in printed and (out / "features.txt").read_text() in printed
    features = load_features(out)
    assert len(features) == 10 and features.features["storage"].shape == (10, 4, 32)
    assert features.meta[3]["plate"] == "SYN-train-000" and features.meta[3]["well"] == "A04"
    assert features.labels.tolist() == [i % 4 for i in range(10)]
    manifest = json.loads((out / "features.json").read_text())
    assert manifest["settings"]["dataset"] == DATASET and manifest["settings"]["arch"] == "vit_test"
    assert main([*args[:-2], "--chunk-size", "5"]) == 2  # refused: other settings
    assert "rerun with the same settings" in capsys.readouterr().err


@pytest.mark.slow
def test_features_cli_under_torchrun_with_two_processes(tmp_path):
    config = tiny_config(tmp_path)
    common = ["--config-file", config, "--dataset", DATASET, "--num-workers", "0", "--batch-size", "2",
              "--chunk-size", "3"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env |= {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
         "-m", "dinocell.commands.eval_features", *common, "--output-dir", str(tmp_path / "two")],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("rows written") == 1  # rank 0 reports
    one = subprocess.run([sys.executable, "-m", "dinocell.commands.eval_features", *common, "--output-dir",
                          str(tmp_path / "one")], env=env, capture_output=True, text=True, timeout=120)
    assert one.returncode == 0, one.stderr[-3000:]
    assert_same_rows(load_features(tmp_path / "two"), load_features(tmp_path / "one"))
