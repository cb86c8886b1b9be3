"""Metric sinks written for real and read back: TensorBoard event files, a wandb offline run, a trackio store."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dinocell.logging.sinks import JsonLinesSink, TensorBoardSink, WandbSink, tensorboard_tag


def _record(iteration: int) -> dict:
    return {"iteration": iteration, "epoch": iteration / 4, "total_loss": 10.0 - iteration, "ibot_loss": 1.0,
            "lr": 1e-3 * iteration, "grad_norm": 2.0, "images_per_s": 50.0, "attempt": "text is not a curve"}


def test_tensorboard_events_hold_the_expected_tags_once_per_step_after_a_resume(tmp_path):
    event_accumulator = pytest.importorskip(
        "tensorboard.backend.event_processing.event_accumulator",
        reason="TensorBoard events need tensorboard: pip install 'dinocell[tracking]'",
    )
    sink = TensorBoardSink(tmp_path, start_iteration=0)
    for it in range(5):  # the first attempt crashes after iteration 4; its checkpoint holds iteration 3
        sink.log_metrics(_record(it))
    sink.log_images({"attention/head0": np.full((6, 8, 3), 200, np.uint8)}, step=2)
    sink.close()
    sink = TensorBoardSink(tmp_path, start_iteration=3)
    for it in range(3, 6):
        sink.log_metrics({**_record(it), "total_loss": 100.0 + it})
    sink.close()

    events = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == sorted(
        ["loss/total_loss", "loss/ibot_loss", "train/epoch", "train/lr", "train/grad_norm", "train/images_per_s"]
    )
    loss = events.Scalars("loss/total_loss")
    assert [e.step for e in loss] == [0, 1, 2, 3, 4, 5]  # purged from 3 on, then rewritten once
    assert [e.value for e in loss] == [10.0, 9.0, 8.0, 103.0, 104.0, 105.0]
    assert events.Tags()["images"] == ["attention/head0"]
    image = events.Images("attention/head0")[0]
    assert (image.step, image.width, image.height) == (2, 8, 6)
    assert tensorboard_tag("eval/knn_top1") == "eval/knn_top1"


def test_json_lines_sink_drops_the_iterations_a_resumed_run_repeats(tmp_path):
    sink = JsonLinesSink(tmp_path, start_iteration=0)
    for it in range(5):
        sink.log_metrics(_record(it))
    with open(tmp_path / "training_metrics.json", "a") as f:
        f.write('{"iteration": 5, "total_')  # the first attempt was killed while writing a line
    sink = JsonLinesSink(tmp_path, start_iteration=3)
    sink.log_metrics(_record(3))
    lines = (tmp_path / "training_metrics.json").read_text().splitlines()
    assert [json.loads(line)["iteration"] for line in lines] == [0, 1, 2, 3]


def test_json_lines_sink_keeps_eval_records_apart_and_trims_them_on_resume(tmp_path):
    sink = JsonLinesSink(tmp_path, start_iteration=0)
    sink.log_metrics(_record(0))
    for it in (0, 2, 4):  # evaluations after 0, 2 and 4 iterations; the checkpoint holds iteration 2
        sink.log_eval({"iteration": it, "eval/knn_k20_top1": it / 10})
    sink = JsonLinesSink(tmp_path, start_iteration=2)  # the resumed run evaluates again at 2
    sink.log_eval({"iteration": 2, "eval/knn_k20_top1": 0.25})
    evals = [json.loads(line) for line in (tmp_path / "eval" / "metrics.json").read_text().splitlines()]
    assert evals == [{"iteration": 0, "eval/knn_k20_top1": 0.0}, {"iteration": 2, "eval/knn_k20_top1": 0.25}]
    lines = (tmp_path / "training_metrics.json").read_text().splitlines()
    assert [json.loads(line)["iteration"] for line in lines] == [0]


@pytest.mark.slow
def test_wandb_offline_run_holds_metrics_and_images(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb", reason="wandb logging needs wandb: pip install 'dinocell[wandb]'")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    sink = WandbSink(tmp_path, project="test", run_name="", start_iteration=0)
    sink.log_metrics(_record(0))
    sink.log_images({"attention": np.full((6, 8, 3), 200, np.uint8)}, step=1)
    run_dir = Path(sink.run.dir).parent
    sink.close()
    wandb.teardown()  # stops wandb's service process, which writes the run file in the background
    assert run_dir.name.startswith("offline-run-")
    (images,) = (run_dir / "files" / "media" / "images").glob("attention_*.png")
    with Image.open(images) as im:
        assert im.size == (8, 6) and im.getpixel((0, 0)) == (200, 200, 200)
    (history,) = run_dir.glob("run-*.wandb")  # protobuf records: field names are stored as plain bytes
    assert b"total_loss" in history.read_bytes() and b"attention" in history.read_bytes()


@pytest.mark.slow
def test_trackio_stores_metrics_and_images_locally(tmp_path):
    pytest.importorskip("trackio", reason="trackio logging needs trackio: pip install 'dinocell[tracking]'")
    # trackio reads TRACKIO_DIR when it is imported, so the run goes in a fresh process
    script = textwrap.dedent("""
        import json, sys
        import numpy as np
        from dinocell.logging.sinks import TrackioSink
        from trackio.sqlite_storage import SQLiteStorage

        sink = TrackioSink(project="viz-test", run_name="run1", start_iteration=0)
        sink.log_metrics({"iteration": 0, "total_loss": 3.0, "note": "text"})
        sink.log_metrics({"iteration": 1, "total_loss": 2.0})
        sink.log_images({"attention": np.full((6, 8, 3), 200, np.uint8)}, step=1)
        sink.close()
        logs = SQLiteStorage.get_logs("viz-test", "run1")
        print(json.dumps([{k: v for k, v in r.items() if k != "timestamp"} for r in logs]))
    """)
    env = {**os.environ, "TRACKIO_DIR": str(tmp_path / "trackio"), "PYTHONPATH": str(Path(__file__).parents[1])}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    logs = json.loads(next(line for line in result.stdout.splitlines() if line.startswith("[")))
    assert [(r["step"], r.get("total_loss")) for r in logs] == [(0, 3.0), (1, 2.0), (1, None)]
    assert logs[-1]["attention"]["_type"] == "trackio.image"
    assert list((tmp_path / "trackio" / "media").rglob("*.png"))


def test_a_tracker_whose_package_is_missing_names_the_extra(tmp_path, monkeypatch):
    from dinocell.config.schema import LoggingConfig
    from dinocell.logging import MetricsLogger

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if tensorboard were absent
    with pytest.raises(ImportError, match=r"logging.tensorboard: true needs the tensorboard .*'dinocell\[tracking\]'"):
        MetricsLogger(tmp_path, total_iterations=4, start_iteration=0, enabled=True,
                      logging_cfg=LoggingConfig(tensorboard=True))


@pytest.mark.slow
def test_trackio_from_the_config_gets_evaluation_records_and_pictures(tmp_path):
    pytest.importorskip("trackio", reason="trackio logging needs trackio: pip install 'dinocell[tracking]'")
    script = textwrap.dedent("""
        import json, sys
        import numpy as np
        from dinocell.config.schema import LoggingConfig
        from dinocell.logging import MetricsLogger
        from trackio.sqlite_storage import SQLiteStorage

        cfg = LoggingConfig(trackio=True, trackio_project="eval-test", wandb_run_name="run1")
        metrics = MetricsLogger(sys.argv[1], total_iterations=4, start_iteration=0, enabled=True, logging_cfg=cfg)
        metrics.log_eval({"iteration": 2, "eval/knn_k20_top1": 0.5})
        metrics.log_images({"eval/pca": np.full((6, 8, 3), 200, np.uint8)}, step=2)
        metrics.close()
        logs = SQLiteStorage.get_logs("eval-test", "run1")
        print(json.dumps([{k: v for k, v in r.items() if k != "timestamp"} for r in logs]))
    """)
    env = {**os.environ, "TRACKIO_DIR": str(tmp_path / "trackio"), "PYTHONPATH": str(Path(__file__).parents[1])}
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path / "run")], env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    logs = json.loads(next(line for line in result.stdout.splitlines() if line.startswith("[")))
    assert [(r["step"], r.get("eval/knn_k20_top1")) for r in logs] == [(2, 0.5), (2, None)]
    assert logs[-1]["eval/pca"]["_type"] == "trackio.image"
    assert [json.loads(line) for line in (tmp_path / "run" / "eval" / "metrics.json").read_text().splitlines()] == [
        {"iteration": 2, "eval/knn_k20_top1": 0.5}]
