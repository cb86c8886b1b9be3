"""`dinocell mean-std`: JSON equals a direct numpy computation over the same random subset; CLI and workers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
import torch
from test_single_cell import make_cells, minmax

from dinocell.cli import main as cli_main
from dinocell.data.mean_std import choose_indices, compute_mean_std


def direct(written: dict, ids: list[str], channels: list[int]) -> tuple[np.ndarray, np.ndarray]:
    pixels = np.concatenate([minmax(written[i])[channels].reshape(len(channels), -1) for i in ids], axis=1)
    return pixels.mean(1), pixels.std(1)


@pytest.mark.parametrize("workers", [0, 2])
def test_mean_std_json_matches_numpy(tmp_path, workers, capsys):
    written = make_cells(tmp_path / "cells", n_per_class=5)
    out = tmp_path / "stats.json"
    dataset = f"SingleCellFolder:root={tmp_path / 'cells'}:channels=0,1,3"
    code = cli_main(["mean-std", dataset, "--fraction", "0.4", "--out", str(out), "--num-workers", str(workers),
                     "--batch-size", "3", "--seed", "5"])  # fmt: skip
    assert code == 0
    stats = json.loads(out.read_text())
    ids = sorted(written)  # the dataset's file order
    chosen = [ids[i] for i in choose_indices(len(ids), 0.4, seed=5)]
    mean, std = direct(written, chosen, [0, 1, 3])
    assert stats["n_images"] == 4 and stats["n_pixels"] == 4 * 12 * 12
    np.testing.assert_allclose(stats["mean"], mean, rtol=1e-9)
    np.testing.assert_allclose(stats["std"], std, rtol=1e-7)
    assert "mean [" in capsys.readouterr().out


def test_bad_files_are_skipped_not_substituted_and_counted(tmp_path, capsys):
    """40 good + 3 bad files (undecodable, blank, too few channels) over the whole set: the statistics are those of the
    40 good images exactly (a substitute would count a good image twice), and the 3 are reported as skipped."""
    written = make_cells(tmp_path / "cells", n_per_class=20)
    (tmp_path / "cells" / "B_cell" / "bad_0.tif").write_bytes(b"not a tiff")
    tifffile.imwrite(tmp_path / "cells" / "B_cell" / "bad_1.tif", np.zeros((12, 12, 5), np.uint16))
    tifffile.imwrite(tmp_path / "cells" / "T_cell" / "bad_2.tif", np.ones((12, 12, 2), np.uint16))
    out = tmp_path / "stats.json"
    dataset = f"SingleCellFolder:root={tmp_path / 'cells'}:channels=0,1,3"
    code = cli_main(["mean-std", dataset, "--fraction", "1", "--out", str(out), "--num-workers", "0",
                     "--batch-size", "4"])  # fmt: skip
    assert code == 0
    stats = json.loads(out.read_text())
    assert (stats["n_images"], stats["n_skipped"], stats["n_pixels"]) == (40, 3, 40 * 12 * 12)
    mean, std = direct(written, sorted(written), [0, 1, 3])
    np.testing.assert_allclose(stats["mean"], mean, rtol=1e-9)
    np.testing.assert_allclose(stats["std"], std, rtol=1e-7)
    captured = capsys.readouterr()
    assert "over 40 images (3 bad files skipped) ->" in captured.out
    assert "mean-std: 43/43 img (100%)" in captured.err and "\r" not in captured.err  # not a terminal: plain lines


def test_only_substitutes_chosen_is_an_error():
    substitute = {"image": torch.ones(2, 4, 4), "label": 0, "id": "b", "meta": {"substituted_for": "a"}}
    with pytest.raises(ValueError, match="all 2 chosen images are bad files"):
        compute_mean_std([substitute, substitute], fraction=1.0)


def test_choose_indices_and_bad_fraction():
    assert choose_indices(10, 0.2, 0) == choose_indices(10, 0.2, 0) and len(choose_indices(10, 0.2, 0)) == 2
    assert len(choose_indices(3, 0.01, 0)) == 1
    with pytest.raises(ValueError, match="--fraction 1.5 must be in"):
        choose_indices(10, 1.5, 0)


def test_help(capsys):
    with pytest.raises(SystemExit) as info:
        cli_main(["mean-std", "--help"])
    assert info.value.code == 0 and "--fraction" in capsys.readouterr().out


def test_a_standardised_dataset_string_is_refused(tmp_path, capsys):
    make_cells(tmp_path / "cells", n_per_class=2)
    stats = tmp_path / "stats.json"
    stats.write_text(json.dumps({"mean": [0.5] * 5, "std": [0.2] * 5}))
    dataset = f"SingleCellFolder:root={tmp_path / 'cells'}:stats={stats}"
    assert cli_main(["mean-std", dataset, "--out", str(tmp_path / "x")]) == 2
    assert "give the string without stats=" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
