"""Fine-tuning: exact resume after a crash, early stopping on a scripted curve, frozen vs full, checkpoints that
load elsewhere, refused resumes, the bitsandbytes messages, and `dinocell eval finetune`."""

from __future__ import annotations

import json

import pytest
import torch
from eval_data import Tiles, tiny_config, tiny_model

import dinocell.eval.finetune as finetune_module
from dinocell.eval.errors import EvalError
from dinocell.eval.finetune import EarlyStopping, FinetuneSettings, epoch_batches, finetune, quantize_backbone
from dinocell.models import build_backbone, load_pretrained
from dinocell.pipeline.transforms import EvalTransform


class Images(Tiles):
    """Tiles at 16 x 16 whose class shows in the mean of channel `label`, so a head can learn something."""

    def _good(self, i: int) -> dict:
        sample = super()._good(i)
        image = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(i + self.offset))
        image[i % 3] += 0.5
        return {**sample, "image": image}


class Crashing(Images):
    """Raises on the `after`-th sample read: a run killed mid-epoch."""

    def __init__(self, after: int) -> None:
        super().__init__(n=12, bad=())
        self.reads, self.after = 0, after

    def __getitem__(self, i: int) -> dict:
        self.reads += 1
        if self.reads == self.after:
            raise RuntimeError("killed")
        return super().__getitem__(i)


VIEW = EvalTransform(8, 3, None, None)
SETTINGS = FinetuneSettings(mode="full", epochs=3, batch_size=5, lr=1e-2, warmup_epochs=1, patience=0,
                            rotate90=True)


def run(out, train, *, settings=SETTINGS, test=None, model=None) -> dict:
    return finetune(model or tiny_model(), train, Images(n=6, bad=(), offset=500), VIEW, out, num_classes=3,
                    settings=settings, device="cpu", test_set=test, show_progress=False)


def lines(path) -> list[dict]:
    records = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "epoch_time_s"} for r in records]


def test_a_run_killed_mid_epoch_resumes_exactly(tmp_path):
    whole = run(tmp_path / "whole", Images(n=12, bad=()))
    with pytest.raises(RuntimeError, match="killed"):
        run(tmp_path / "killed", Crashing(after=12 + 7))  # second epoch, second batch
    assert len(lines(tmp_path / "killed")) == 1
    resumed = run(tmp_path / "killed", Images(n=12, bad=()))
    assert lines(tmp_path / "killed") == lines(tmp_path / "whole") and len(lines(tmp_path / "whole")) == 3
    a, b = (torch.load(p / "checkpoints" / "last" / "checkpoint.pth", weights_only=True)
            for p in (tmp_path / "whole", tmp_path / "killed"))
    assert a["model"].keys() == b["model"].keys() and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert resumed["val"] == whole["val"] and whole["epochs_run"] == 3 and not whole["stopped_early"]
    # the first epoch changed the weights (the comparison above is not between two untouched models)
    assert not torch.equal(a["model"]["head.weight"], torch.zeros_like(a["model"]["head.weight"]))
    # a rerun of a finished run trains nothing and reports the same
    assert run(tmp_path / "whole", Images(n=12, bad=()))["val"] == whole["val"]
    assert len(lines(tmp_path / "whole")) == 3


def test_early_stopping_stops_where_the_scripted_curve_says(tmp_path, monkeypatch):
    curve = iter([0.30, 0.50, 0.40, 0.50, 0.45, 0.90, 0.95, 0.99, 0.6, 0.6])

    def scripted(*args, **kwargs) -> dict:
        value = next(curve)
        return {"n": 6, "accuracy": value, "balanced_accuracy": value, "macro_f1": value, "loss": 1 - value,
                "per_class_accuracy": {}, "skipped": 0}

    monkeypatch.setattr(finetune_module, "evaluate_classifier", scripted)
    settings = FinetuneSettings(mode="frozen", epochs=8, batch_size=6, patience=2, lr=1e-3)
    result = run(tmp_path, Images(n=12, bad=()), settings=settings)
    # best 0.5 at epoch 2; epochs 3 (0.40) and 4 (0.50, not better) do not improve: patience 2 is used up
    assert [r["val_accuracy"] for r in lines(tmp_path)] == [0.30, 0.50, 0.40, 0.50]
    assert [r["best_epoch"] for r in lines(tmp_path)] == [1, 2, 2, 2]
    assert result["best_epoch"] == 2 and result["epochs_run"] == 4 and result["stopped_early"]
    best = torch.load(tmp_path / "checkpoints" / "best" / "checkpoint.pth", weights_only=True)
    assert best["epoch"] == 2 and best["value"] == 0.50


def test_early_stopping_rule():
    by_loss = EarlyStopping(patience=1, maximize=False)
    assert by_loss.step(2.0, 1) and by_loss.step(1.5, 2) and not by_loss.step(1.5, 3) and by_loss.should_stop
    never = EarlyStopping(patience=0, maximize=True)
    assert never.step(0.5, 1) and not any(never.step(0.1, e) for e in range(2, 9)) and not never.should_stop
    restored = EarlyStopping(patience=1, maximize=False)
    restored.load_state_dict(by_loss.state_dict())
    assert (restored.best, restored.best_epoch, restored.bad_epochs) == (1.5, 2, 1)


def test_epoch_order_depends_on_seed_and_epoch_only():
    a, b = epoch_batches(10, 4, seed=0, epoch=1), epoch_batches(10, 4, seed=0, epoch=1)
    assert a == b and [len(x) for x in a] == [4, 4, 2] and sorted(i for x in a for i, _ in x) == list(range(10))
    assert epoch_batches(10, 4, seed=0, epoch=2) != a and all(e == 1 for x in a for _, e in x)


def test_frozen_backbone_is_untouched_and_full_checkpoints_load_as_pretrained(tmp_path):
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    frozen = FinetuneSettings(mode="frozen", epochs=2, batch_size=6, lr=0.05, patience=0, warmup_epochs=0)
    result = run(tmp_path / "frozen", Images(n=12, bad=()), settings=frozen, model=model,
                 test=Images(n=9, bad=(4,), offset=900))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    saved = torch.load(tmp_path / "frozen" / "checkpoints" / "best" / "checkpoint.pth", weights_only=True)
    assert sorted(saved["model"]) == ["head.bias", "head.weight"]  # the frozen backbone is not copied
    assert result["test"]["n"] == 8 and result["test"]["skipped"] == 1  # the substitute is not scored twice
    losses = [r["train_loss"] for r in lines(tmp_path / "frozen")]
    assert losses[1] < losses[0]  # the head learns

    run(tmp_path / "full", Images(n=12, bad=()))
    fresh = build_backbone("vit_test", patch_size=4, in_chans=3)
    report = load_pretrained(fresh, tmp_path / "full" / "checkpoints" / "best" / "checkpoint.pth", strict=True)
    assert report.layout == "fine-tuning checkpoint (backbone)"
    best = torch.load(tmp_path / "full" / "checkpoints" / "best" / "checkpoint.pth", weights_only=True)["model"]
    assert torch.equal(fresh.state_dict()["blocks.0.attn.qkv.weight"], best["backbone.blocks.0.attn.qkv.weight"])


def test_a_changed_setting_is_refused_on_resume(tmp_path):
    short = FinetuneSettings(mode="frozen", epochs=1, batch_size=6, patience=0)
    run(tmp_path, Images(n=12, bad=()), settings=short)
    with pytest.raises(EvalError, match="other settings \\(lr: 0.0001 there, 0.001 now\\)"):
        run(tmp_path, Images(n=12, bad=()), settings=FinetuneSettings(mode="frozen", epochs=1, batch_size=6,
                                                                      patience=0, lr=1e-3))


def test_settings_and_quantisation_messages():
    with pytest.raises(EvalError, match="quantize=8bit needs mode=frozen"):
        FinetuneSettings(mode="full", quantize="8bit")
    with pytest.raises(EvalError, match="monitor='top1' is not one of accuracy, balanced_accuracy, macro_f1, loss"):
        FinetuneSettings(monitor="top1")
    with pytest.raises(EvalError, match="need a CUDA GPU; on cpu run without quantisation"):
        quantize_backbone(tiny_model(), "4bit", torch.device("cpu"))
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        with pytest.raises(EvalError, match="bitsandbytes, which is not installed: pip install bitsandbytes"):
            quantize_backbone(tiny_model(), "8bit", torch.device("cuda"))


def test_finetune_cli_writes_results_and_checkpoints(tmp_path, capsys):
    from dinocell.commands.eval_finetune import main

    data = "SyntheticCellPainting:size=16:image_size=32:cell_radius=6"
    out = tmp_path / "ft"
    args = ["--config-file", tiny_config(tmp_path), "--train", data, "--test", data.replace("size=16", "size=8")
            + ":split=test", "--mode", "frozen", "--epochs", "2", "--batch-size", "8", "--num-workers", "0",
            "--output-dir", str(out), "--rotate90"]
    assert main(args) == 0
    results = json.loads((out / "finetune.json").read_text())
    assert results["val"]["n"] == 2 and results["test"]["n"] == 8 and results["epochs_run"] == 2
    assert (out / "checkpoints" / "best" / "checkpoint.pth").is_file() and len(lines(out)) == 2
    printed = capsys.readouterr().out
    assert (out / "finetune.txt").read_text() in printed and "best weights:" in printed
    assert main([*args, "--lr", "0.5"]) == 2  # another setting on the same output dir
    assert "holds a fine-tuning run with other settings (lr" in capsys.readouterr().err
