"""k-NN with several k, top-5, balanced accuracy and per-class accuracy, against a hand-written weighted k-NN and
scikit-learn's metrics; the shared classification metrics; `dinocell eval knn` on feature directories."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from eval_data import Tiles, tiny_model
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, recall_score, top_k_accuracy_score

from dinocell.eval.features import export_features, load_features
from dinocell.eval.knn import knn_evaluate
from dinocell.eval.metrics import classification_metrics


def hand_knn_votes(train_x, train_y, test_x, k, temperature, num_classes) -> np.ndarray:
    """DINO's weighted vote written out per query: cosine to every reference, the k largest, exp(sim / T) per class."""
    train = [v / np.linalg.norm(v) for v in train_x.tolist()]
    votes = np.zeros((len(test_x), num_classes))
    for q, query in enumerate(test_x.tolist()):
        query = np.array(query) / np.linalg.norm(query)
        sims = sorted(((float(np.dot(query, t)), j) for j, t in enumerate(train)), reverse=True)[:k]
        for sim, j in sims:
            votes[q, int(train_y[j])] += np.exp(sim / temperature)
    return votes


def noisy_clusters(seed: int, n: int, num_classes: int = 8, dim: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.multinomial(torch.linspace(1.0, 3.0, num_classes), n, replacement=True, generator=g)  # imbalanced
    centres = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(99))
    return centres[labels] + 1.2 * torch.randn(n, dim, generator=g), labels


def test_knn_matches_a_hand_written_vote_and_sklearn_metrics():
    train_x, train_y = noisy_clusters(0, 300)
    test_x, test_y = noisy_clusters(1, 120)
    names = [f"class{c}" for c in range(8)]
    results = knn_evaluate(train_x, train_y, test_x, test_y, ks=[50, 1, 10], temperature=0.1, num_classes=8,
                           class_names=names, chunk_size=32)
    assert list(results) == [1, 10, 50]
    y = test_y.numpy()
    for k, got in results.items():
        votes = hand_knn_votes(train_x.numpy(), train_y.numpy(), test_x.numpy(), k, 0.1, 8)
        pred = votes.argmax(1)
        assert got["accuracy"] == pytest.approx(accuracy_score(y, pred))
        assert got["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
        assert got["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro"))
        recalls = recall_score(y, pred, average=None, labels=np.unique(y))
        assert got["per_class_accuracy"] == pytest.approx({names[c]: r for c, r in zip(np.unique(y), recalls)})
        top5 = np.argsort(-votes, 1)[:, :5]
        hand_top5 = np.mean([(t in row) and votes[i, t] > 0 for i, (t, row) in enumerate(zip(y, top5))])
        assert got["top5"] == pytest.approx(hand_top5)
        assert 0.2 < got["accuracy"] < 0.95 and got["balanced_accuracy"] != pytest.approx(got["accuracy"])
    # with 50 neighbours every class gets votes, so sklearn's top-k (which breaks ties arbitrarily) applies too
    votes = hand_knn_votes(train_x.numpy(), train_y.numpy(), test_x.numpy(), 50, 0.1, 8)
    assert results[50]["top5"] == pytest.approx(top_k_accuracy_score(y, votes, k=5, labels=range(8)))


def test_top5_is_left_out_with_five_classes_or_fewer():
    train_x, train_y = noisy_clusters(0, 60, num_classes=4)
    result = knn_evaluate(train_x, train_y, train_x, train_y, ks=[3], temperature=0.07, num_classes=4)
    assert "top5" not in result[3] and result[3]["accuracy"] > 0.9


def test_classification_metrics_match_sklearn_with_unpredicted_and_unseen_classes():
    y_true = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 3])
    y_pred = np.array([0, 1, 0, 1, 4, 2, 2, 0, 4, 1])  # class 3 never predicted, class 4 never true
    got = classification_metrics(y_true, y_pred)
    assert got["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred))
    with pytest.warns(UserWarning):  # sklearn warns about class 4, which is not in y_true
        assert got["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y_true, y_pred))
    assert got["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="macro", zero_division=0))
    assert got["per_class_accuracy"] == pytest.approx({"0": 2 / 3, "1": 1 / 2, "2": 2 / 4, "3": 0.0})
    scores = np.eye(6)[y_pred] + 0.01 * np.arange(6)  # the prediction first, then the highest class ids
    assert classification_metrics(y_true, y_pred, scores=scores)["top5"] == pytest.approx(
        top_k_accuracy_score(y_true, scores, k=5, labels=range(6)))
    with pytest.raises(ValueError, match="two equal, non-empty label vectors"):
        classification_metrics(y_true, y_pred[:3])


def test_knn_cli_on_feature_directories_reports_what_the_library_computes(tmp_path, capsys):
    from dinocell.commands.eval_knn import main

    model = tiny_model()
    for split, n, offset in (("train", 30, 0), ("test", 12, 1000)):
        export_features(model, Tiles(n=n, bad=(2,), offset=offset), None, tmp_path / split, settings={}, batch_size=8,
                        num_workers=0, device="cpu", show_progress=False)
    out = tmp_path / "knn"
    assert main(["--train", str(tmp_path / "train"), "--test", str(tmp_path / "test"), "--k", "1", "5",
                 "--temperature", "0.1", "--output-dir", str(out), "--device", "cpu"]) == 0
    results = json.loads((out / "knn.json").read_text())
    train, test = load_features(tmp_path / "train"), load_features(tmp_path / "test")
    expected = knn_evaluate(torch.from_numpy(train.matrix()), torch.from_numpy(train.labels),
                            torch.from_numpy(test.matrix()), torch.from_numpy(test.labels), ks=[1, 5],
                            temperature=0.1, num_classes=3, class_names=["a", "b", "c"])
    for k, metrics in expected.items():
        got = results["k"][str(k)]
        assert got.pop("per_class_accuracy") == pytest.approx(metrics.pop("per_class_accuracy"))
        assert got == pytest.approx(metrics)
    assert results["n_train"] == 29 and results["n_test"] == 11 and results["bad_samples_skipped"] == {
        "train": 1, "test": 1}
    printed = capsys.readouterr().out
    assert ["1", f"{100 * expected[1]['accuracy']:.2f}"] in [line.split()[:2] for line in printed.splitlines()]
    assert (out / "knn.txt").read_text() in printed
    assert main(["--train", str(tmp_path / "train"), "--test", str(tmp_path / "test"), "--k", "40",
                 "--output-dir", str(out)]) == 2
    assert "--k 40 is larger than the 29 training samples" in capsys.readouterr().err


def test_knn_cli_explains_unlabelled_data_and_bad_dataset_strings(tmp_path, capsys):
    from PIL import Image

    from dinocell.commands.eval_knn import main

    for i in range(3):  # a flat folder: ImageFolder gives label -1
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(tmp_path / f"{i}.png")
    model = ["--arch", "vit_test", "--patch-size", "4", "--in-chans", "3", "--image-size", "8", "--num-workers", "0"]
    out = ["--output-dir", str(tmp_path / "o")]
    folder = f"ImageFolder:root={tmp_path}"
    assert main(["--train", folder, "--test", folder, *model, *out]) == 2
    assert "3 of 3 samples of --train have no label (-1)" in capsys.readouterr().err
    assert main(["--train", "ImageFolder:rot=x", "--test", "x", *model, *out]) == 2
    assert "ImageFolder has no key 'rot'. Did you mean 'root'?" in capsys.readouterr().err
