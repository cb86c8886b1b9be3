"""Training curves: resumed runs drawn once per iteration, broken lines reported, a real run's file plotted."""

import json
from pathlib import Path

import pytest
from PIL import Image

from dinocell.commands import plot_metrics
from dinocell.config import load_config
from dinocell.eval.curves import FIGURE_SIZE_PX, read_eval_curves, read_metrics


def _write(path: Path, iterations: list[int], tag: str) -> None:
    with open(path, "a") as f:
        for it in iterations:
            f.write(json.dumps({"iteration": it, "total_loss": float(it), "attempt": tag}) + "\n")


def test_a_restart_supersedes_everything_logged_from_its_iteration_on(tmp_path):
    path = tmp_path / "training_metrics.json"
    _write(path, list(range(10)), "first")  # crashed after iteration 9, last checkpoint at 5
    _write(path, [5, 6, 7], "second")  # resumed at 5, crashed again after 7 (old lines 8, 9 are stale)
    _write(path, [7, 8, 9, 10, 11], "third")  # a duplicated iteration 7 keeps its last occurrence
    records = read_metrics(path)
    iterations = [r["iteration"] for r in records]
    assert iterations == list(range(12)) and len(set(iterations)) == len(iterations)
    assert [r["attempt"] for r in records] == ["first"] * 5 + ["second"] * 2 + ["third"] * 5


def test_broken_lines(tmp_path, caplog):
    path = tmp_path / "training_metrics.json"
    _write(path, [0, 1], "a")
    path.write_text(path.read_text() + '{"iteration": 2, "total_lo')  # a crash mid-write
    assert [r["iteration"] for r in read_metrics(path)] == [0, 1]
    assert "incomplete last line 3" in caplog.text
    path.write_text('{"iteration": 0}\nnot json\n{"iteration": 1}\n')
    with pytest.raises(ValueError, match="training_metrics.json:2 is not a JSON object"):
        read_metrics(path)
    path.write_text('{"iter": 0}\n')
    with pytest.raises(ValueError, match=":1 has no integer 'iteration'"):
        read_metrics(path)


def test_plot_metrics_command_errors(tmp_path, capsys):
    assert plot_metrics.main([str(tmp_path)]) == 2
    assert "no training_metrics.json in" in capsys.readouterr().err
    (tmp_path / "training_metrics.json").write_text("")
    assert plot_metrics.main([str(tmp_path)]) == 2
    assert "holds no records yet" in capsys.readouterr().err


@pytest.mark.slow
def test_curves_of_a_real_resumed_run(tmp_path, capsys):
    from dinocell.train.train import train

    tiny = [
        "student.arch=vit_test", "student.patch_size=8", "student.n_storage_tokens=1", "student.in_chans=5",
        "crops.global_crops_size=32", "crops.local_crops_size=16", "crops.local_crops_number=2",
        "dino.head_n_prototypes=64", "ibot.head_n_prototypes=64", "dino.head_hidden_dim=32",
        "ibot.head_hidden_dim=32", "dino.head_bottleneck_dim=16", "ibot.head_bottleneck_dim=16",
        "train.dataset_path=SyntheticCellPainting:size=32:image_size=32", "train.batch_size_per_gpu=4",
        "train.num_workers=0", "train.OFFICIAL_EPOCH_LENGTH=2", "optim.warmup_epochs=1",
        "teacher.warmup_teacher_temp_epochs=1", "train.log_every=1", "checkpointing.period=2",
        "evaluation.knn_train_dataset=SyntheticCellPainting:size=8:image_size=32",
        "evaluation.knn_test_dataset=SyntheticCellPainting:split=test:size=8:image_size=32", "evaluation.knn_k=[2]",
        f"train.output_dir={tmp_path}",
    ]
    train(load_config(overrides=[*tiny, "optim.epochs=1"]))
    lines_before = (tmp_path / "training_metrics.json").read_text()
    train(load_config(overrides=[*tiny, "optim.epochs=2"]))  # resumes at iteration 2
    # a stale copy of the first attempt's lines, as a file merged by hand or written by an older version would hold
    text = (tmp_path / "training_metrics.json").read_text()
    (tmp_path / "training_metrics.json").write_text(lines_before + text)
    records = read_metrics(tmp_path / "training_metrics.json")
    assert [r["iteration"] for r in records] == [0, 1, 2, 3]
    knn = json.loads((tmp_path / "eval" / "knn.json").read_text())
    assert sorted(knn["top1"]) == ["0", "4"]  # the first attempt's end (2) was not on the second one's schedule
    curves = read_eval_curves(tmp_path, 3)
    assert curves == {"k-NN top-1 k=2": [(0, pytest.approx(knn["init"])), (4, pytest.approx(knn["final"]))]}
    (tmp_path / "eval" / "metrics.json").unlink()  # a run written before eval/metrics.json: knn.json's two points
    assert read_eval_curves(tmp_path, 3) == {"k-NN top-1 k=2": [(0, knn["init"]), (4, knn["final"])]}

    assert plot_metrics.main([str(tmp_path), "--out", str(tmp_path / "curves.png")]) == 0
    assert "wrote" in capsys.readouterr().out
    with Image.open(tmp_path / "curves.png") as im:
        assert im.format == "PNG" and im.size == FIGURE_SIZE_PX
