"""Evaluation during training (dinocell.train.periodic) on tiny runs: files under eval/<iteration>/, records in the
JSON lines, TensorBoard and wandb (offline), numbers equal to independent computations on the teacher dumps, training
unchanged by evaluating, a resumed run, and the extraction spread over 2 gloo processes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dinocell.commands import train as train_command
from dinocell.data import make_dataset
from dinocell.eval.channel_consistency import channel_consistency
from dinocell.models import build_backbone, load_pretrained
from dinocell.pipeline.transforms import EvalTransform

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "student.arch=vit_test", "student.patch_size=8", "student.n_storage_tokens=1", "student.in_chans=5",
    "student.layerscale=0.1", "crops.global_crops_size=32", "crops.local_crops_size=16", "crops.local_crops_number=2",
    "dino.head_n_prototypes=64", "ibot.head_n_prototypes=64", "dino.head_hidden_dim=32", "ibot.head_hidden_dim=32",
    "dino.head_bottleneck_dim=16", "ibot.head_bottleneck_dim=16",
    "train.dataset_path=SyntheticCellPainting:size=32:image_size=32", "train.batch_size_per_gpu=4",
    "train.num_workers=0", "train.OFFICIAL_EPOCH_LENGTH=2", "optim.warmup_epochs=1",
    "teacher.warmup_teacher_temp_epochs=1", "train.log_every=1", "checkpointing.period=2",
    "evaluation.eval_period_iterations=2", "compute_precision.autocast_dtype=fp32",
]
KNN_TRAIN = "SyntheticCellPainting:split=train:size=16:image_size=32:seed=1"
KNN_TEST = "SyntheticCellPainting:split=test:size=12:image_size=32"
CHANNELS = "SyntheticCellPainting:split=test:size=8:image_size=32:seed=2"
VIZ = "SyntheticCellPainting:split=test:size=4:image_size=32"
KNN = [f"evaluation.knn_train_dataset={KNN_TRAIN}", f"evaluation.knn_test_dataset={KNN_TEST}",
       "evaluation.knn_k=[2,4]"]
ALL_TASKS = [*KNN, f"evaluation.channel_consistency_dataset={CHANNELS}", f"evaluation.viz_dataset={VIZ}",
             "evaluation.viz_num_images=2"]
VIZ_IDS = ["synthetic_test_seed0_0", "synthetic_test_seed0_1"]
TENSORBOARD_MISSING = "the TensorBoard sink needs tensorboard: pip install 'dinocell[tracking]'"


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _train(out: Path, *extra: str) -> None:
    assert train_command.main(["--output-dir", str(out), *TINY, *extra]) == 0


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """4 iterations, every task on, evaluated after 0, 2 and 4 iterations, TensorBoard and wandb (offline) on."""
    pytest.importorskip("wandb", reason="the wandb sink needs wandb: pip install 'dinocell[wandb]'")
    pytest.importorskip("tensorboard", reason=TENSORBOARD_MISSING)
    out = tmp_path_factory.mktemp("periodic") / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WANDB_MODE", "offline")
        patch.setenv("WANDB_SILENT", "true")
        _train(out, "optim.epochs=2", "student.drop_path_rate=0.2", *ALL_TASKS, "logging.tensorboard=true",
               "logging.wandb=true")
        import wandb

        wandb.teardown()  # wandb's service process writes the offline run file in the background
    return out


def _png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        return image.size


@pytest.mark.slow
def test_every_evaluation_writes_its_files_and_one_record(run):
    for iteration in (0, 2, 4):
        folder = run / "eval" / str(iteration)
        knn = json.loads((folder / "knn.json").read_text())
        assert set(knn["k"]) == {"2", "4"} and knn["iteration"] == iteration and knn["n_test"] == 12
        assert "per-class accuracy" in (folder / "knn.txt").read_text()
        consistency = json.loads((folder / "channel-consistency.json").read_text())
        assert consistency["n_fields"] == 8 and list(consistency["views"]) == ["DNA", "ER", "RNA", "AGP", "Mito", "all"]
        for sample in VIZ_IDS:
            for name in (f"{sample}.png", f"{sample}_heads.png", f"{sample}_heads.gif"):
                assert (folder / "attention" / name).is_file(), (iteration, name)
        tile = 96 + 12  # a 32 px view enlarged to the 96 px tile, plus the label strip
        assert _png_size(folder / "pca" / "pca_grid.png") == (2 + 4 * (96 + 2), 2 + tile + 2)
    assert (run / "eval" / "2" / "teacher_checkpoint.pth").is_file() and not (run / "eval" / "0").joinpath(
        "teacher_checkpoint.pth").exists()  # a dump of the initial teacher would only repeat the recipe

    records = _lines(run / "eval" / "metrics.json")
    assert [r["iteration"] for r in records] == [0, 2, 4]
    expected = {"iteration", "eval/channel_cosine_to_mean", "eval/channel_retrieval_top1"}
    expected |= {f"eval/knn_k{k}_{m}" for k in (2, 4) for m in ("top1", "balanced_accuracy", "macro_f1")}
    expected |= {f"eval/channel_{v}_{m}" for v in ("DNA", "ER", "RNA", "AGP", "Mito", "all")
                 for m in ("cosine_to_mean", "retrieval_top1")}
    assert all(set(r) == expected for r in records)  # 4 classes: no top-5
    for record in records:  # the same numbers as the files of that iteration
        knn = json.loads((run / "eval" / str(record["iteration"]) / "knn.json").read_text())
        assert record["eval/knn_k4_top1"] == knn["k"]["4"]["accuracy"]
    assert not any(k.startswith("eval/") for r in _lines(run / "training_metrics.json") for k in r)

    history = json.loads((run / "eval" / "knn.json").read_text())  # what dinocell 0.1 wrote, extended
    assert history["k"] == 2 and history["ks"] == [2, 4] and sorted(history["top1"], key=int) == ["0", "2", "4"]
    assert history["init"] == pytest.approx(100 * records[0]["eval/knn_k2_top1"])
    assert history["final"] == pytest.approx(100 * records[-1]["eval/knn_k2_top1"])
    log = (run / "logs" / "log.txt").read_text()
    assert log.count("eval after") == 3
    assert "channel consistency (single channels vs their mean): cosine" in log
    summary, finished = (line.split(" INFO ")[1] for line in log.rstrip().splitlines()[-2:])
    assert summary.startswith("k-NN top-1 (k=2) of the teacher cls features") and finished.startswith("run finished")


def _backbone(dump: Path) -> torch.nn.Module:
    backbone = build_backbone("vit_test", patch_size=8, n_storage_tokens=1, in_chans=5, layerscale_init=0.1)
    load_pretrained(backbone, dump)
    return backbone.eval()


def _reference_knn_top1(backbone: torch.nn.Module, ks: list[int], temperature: float = 0.07) -> dict[int, float]:
    """DINO's weighted vote written out in numpy, on features of the 32 px eval view."""
    view = EvalTransform(32, 5, None, None)

    def features(dataset_str: str) -> tuple[np.ndarray, np.ndarray]:
        dataset = make_dataset(dataset_str)
        with torch.no_grad():
            x = backbone(torch.stack([view(dataset[i])["image"] for i in range(len(dataset))])).numpy()
        labels = np.array([dataset[i]["label"] for i in range(len(dataset))])
        return x / np.linalg.norm(x, axis=1, keepdims=True), labels

    (train_x, train_y), (test_x, test_y) = features(KNN_TRAIN), features(KNN_TEST)
    similarity = test_x @ train_x.T
    top1 = {}
    for k in ks:
        correct = 0
        for row, truth in zip(similarity, test_y):
            nearest = np.argsort(-row)[:k]
            votes = np.zeros(4)
            np.add.at(votes, train_y[nearest], np.exp(row[nearest] / temperature))
            correct += int(votes.argmax() == truth)
        top1[k] = correct / len(test_y)
    return top1


@pytest.mark.slow
def test_numbers_equal_independent_computations_on_the_teacher_dumps(run):
    records = {r["iteration"]: r for r in _lines(run / "eval" / "metrics.json")}
    for iteration in (2, 4):
        backbone = _backbone(run / "eval" / str(iteration) / "teacher_checkpoint.pth")
        expected = _reference_knn_top1(backbone, [2, 4])
        for k in (2, 4):
            assert records[iteration][f"eval/knn_k{k}_top1"] == pytest.approx(expected[k]), (iteration, k)
        consistency = channel_consistency(backbone, make_dataset(CHANNELS), size=32, in_chans=5, batch_size=3,
                                          num_workers=0, device="cpu", show_progress=False)
        assert records[iteration]["eval/channel_cosine_to_mean"] == pytest.approx(
            consistency["channel_average"]["cosine_to_mean"], abs=1e-6)
        for view, scores in consistency["views"].items():
            for name, value in scores.items():
                assert records[iteration][f"eval/channel_{view}_{name}"] == pytest.approx(value, abs=1e-6)


@pytest.mark.slow
def test_tensorboard_and_wandb_hold_the_eval_numbers_and_pictures(run):
    from tensorboard.backend.event_processing import event_accumulator

    events = event_accumulator.EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("eval/knn_k2_top1")] == [0, 2, 4]
    assert [e.step for e in events.Scalars("eval/channel_retrieval_top1")] == [0, 2, 4]
    assert "loss/total_loss" in events.Tags()["scalars"]
    assert sorted(events.Tags()["images"]) == sorted(["eval/pca", *(f"eval/attention/{i}" for i in VIZ_IDS)])
    pca = events.Images("eval/pca")
    assert [e.step for e in pca] == [0, 2, 4] and (pca[0].width, pca[0].height) == (2 + 4 * 98, 2 + 108 + 2)

    (wandb_run,) = (run / "wandb").glob("offline-run-*")
    images = [p.relative_to(wandb_run / "files" / "media" / "images") for p in
              (wandb_run / "files" / "media" / "images").rglob("*.png")]
    assert len([p for p in images if p.parts[0] == "eval" and p.name.startswith("pca_")]) == 3
    (history,) = wandb_run.glob("run-*.wandb")
    assert b"eval/knn_k4_top1" in history.read_bytes() and b"eval/channel_DNA_cosine_to_mean" in history.read_bytes()


@pytest.mark.slow
def test_evaluating_does_not_change_training(run, tmp_path):
    """The generator states are restored after each evaluation: with drop path (which draws from them) the losses
    equal those of a run that never evaluates."""
    _train(tmp_path / "plain", "optim.epochs=2", "student.drop_path_rate=0.2")
    plain, evaluated = _lines(tmp_path / "plain" / "training_metrics.json"), _lines(run / "training_metrics.json")
    assert [r["total_loss"] for r in plain] == [r["total_loss"] for r in evaluated]


@pytest.mark.slow
def test_a_resumed_run_evaluates_again_where_it_resumes(tmp_path):
    pytest.importorskip("tensorboard", reason=TENSORBOARD_MISSING)
    from tensorboard.backend.event_processing import event_accumulator

    out = tmp_path / "run"
    _train(out, "optim.epochs=1", *KNN, "logging.tensorboard=true")  # evaluated after 0 and 2 iterations
    first = _lines(out / "eval" / "metrics.json")
    _train(out, "optim.epochs=2", *KNN, "logging.tensorboard=true")  # resumes at 2, on the schedule
    records = _lines(out / "eval" / "metrics.json")
    assert [r["iteration"] for r in records] == [0, 2, 4]
    assert records[:2] == first  # the same teacher, evaluated again
    assert sorted(json.loads((out / "eval" / "knn.json").read_text())["top1"], key=int) == ["0", "2", "4"]
    events = event_accumulator.EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("eval/knn_k2_top1")] == [0, 2, 4]  # purged at 2, written once again


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_evaluate_as_one(tmp_path):
    """torchrun 2 x batch 2 (gloo) writes the evaluations of 1 x batch 4: the shares extracted by each rank,
    gathered, score like the whole set extracted by one process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    # no per-process randomness (drop path, RoPE augmentation), so that both runs train the same model
    common = [*TINY, "optim.epochs=1", *KNN, f"evaluation.channel_consistency_dataset={CHANNELS}",
              "student.pos_embed_rope_rescale_coords=null"]
    one = subprocess.run([sys.executable, "-m", "dinocell.train", f"--output-dir={tmp_path / 'one'}", *common,
                          "train.batch_size_per_gpu=4"], env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
         "-m", "dinocell.train", f"--output-dir={tmp_path / 'two'}", *common, "train.batch_size_per_gpu=2"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = _lines(tmp_path / "one" / "eval" / "metrics.json"), _lines(tmp_path / "two" / "eval" / "metrics.json")
    assert [r["iteration"] for r in a] == [r["iteration"] for r in b] == [0, 2]
    for ra, rb in zip(a, b):
        assert set(ra) == set(rb)
        for field, value in ra.items():
            assert rb[field] == pytest.approx(value, abs=1e-4), (ra["iteration"], field)


SHARD_WORKER = textwrap.dedent("""
    import json, sys
    import torch
    from dinocell import distributed
    from dinocell.data import SampleDataset, make_dataset
    from dinocell.eval.channel_consistency import channel_consistency
    from dinocell.eval.features import extract
    from dinocell.models import build_backbone

    info = distributed.init_distributed()
    with distributed.process_group_ends():
        torch.manual_seed(0)
        model = build_backbone("vit_test", patch_size=8, n_storage_tokens=1, in_chans=5, layerscale_init=0.1).eval()


        class Counting(SampleDataset):  # the dataset, remembering which samples this process read
            def __init__(self, inner):
                self.inner, self.classes, self.seen = inner, inner.classes, []

            def __len__(self):
                return len(self.inner)

            def __getitem__(self, i):
                self.seen.append(i)
                return self.inner[i]

        dataset = Counting(make_dataset(sys.argv[1]))
        feats = extract(model, dataset, lambda s: s["image"], batch_size=2, num_workers=0, device="cpu",
                        distributed_shards=True, show_progress=False)
        features_seen, dataset.seen = dataset.seen, []
        scores = channel_consistency(model, dataset, size=32, in_chans=5, batch_size=2, num_workers=0, device="cpu",
                                     distributed_shards=True, show_progress=False)
        print(json.dumps({"rank": info.rank, "features_seen": features_seen, "channels_seen": dataset.seen,
                          "ids": feats.ids, "cls": feats.features["cls"].tolist(), "scores": scores}), flush=True)
""")


@pytest.mark.slow
def test_each_rank_extracts_its_share_and_every_rank_gets_the_whole_set(monkeypatch, capsys):
    dataset = "SyntheticCellPainting:size=7:image_size=32"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "2"}
    procs = [subprocess.Popen([sys.executable, "-c", SHARD_WORKER, dataset], text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env=env | {"RANK": str(r), "LOCAL_RANK": str(r)})
             for r in range(2)]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outputs]
    results = sorted((json.loads(out.strip().splitlines()[-1]) for out, _ in outputs), key=lambda r: r["rank"])
    assert [r["features_seen"] for r in results] == [[0, 1, 2], [3, 4, 5, 6]]
    assert [r["channels_seen"][1:] for r in results] == [[0, 1, 2], [3, 4, 5, 6]]  # [0]: the channel count probe
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):  # the same script in this process, alone
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(sys, "argv", ["worker", dataset])
    exec(SHARD_WORKER, {"__name__": "worker"})
    alone = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for result in results:
        assert result["ids"] == alone["ids"] and len(result["ids"]) == 7
        np.testing.assert_allclose(result["cls"], alone["cls"], atol=1e-5)
        assert result["scores"]["n_fields"] == 7
        for view, scores in alone["scores"]["views"].items():
            for name, value in scores.items():
                assert result["scores"]["views"][view][name] == pytest.approx(value, abs=1e-5)
