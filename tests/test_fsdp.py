"""FSDP2 (train.parallelism=fsdp) and sharded checkpoints: on 2 CPU processes (gloo) FSDP trains exactly like DDP;
sharded checkpoints resume on another process count and either parallelism reads either checkpoint layout; the
process-group timeout; pretrained weights from a sharded checkpoint, whose index must not run code."""

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_train_e2e import _cli, _free_port, _metrics
from tiny_runs import TINY_DINO

from dinocell import distributed, parallel
from dinocell.config import ConfigError, load_config
from dinocell.models import build_backbone, load_pretrained
from dinocell.models.pretrained import TEACHER_FILE, WeightsError
from dinocell.train import checkpoint as ckpt
from dinocell.train.early_stopping import EarlyStopping
from dinocell.train.meta_arch import SSLMetaArch
from dinocell.train.optim import build_optimizer, param_groups
from dinocell.train.state import TrainState
from dinocell.train.train import train

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TERMS = ("total_loss", "dino_local_crops_loss", "dino_global_crops_loss", "ibot_loss", "koleo_loss")


def _torchrun(*args: str, env: dict[str, str] = ENV) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
               *args]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _tiny_backbone(**kwargs) -> torch.nn.Module:
    return build_backbone("vit_test", patch_size=8, n_storage_tokens=1, in_chans=5, **kwargs)


def _model_and_optimizer(cfg, *, shard: bool = False):
    cpu = torch.device("cpu")
    if shard:  # as training builds it: on rank 0, the other ranks on the meta device, then sharded
        model = parallel.build_sharded(lambda: SSLMetaArch(cfg), SSLMetaArch.fsdp_units,
                                       parallel.mixed_precision(cpu, "fp32"), cpu)
    else:
        model = SSLMetaArch(cfg)
    groups = param_groups(model.student, n_blocks=model.student.backbone.n_blocks, layerwise_decay=0.9,
                          patch_embed_lr_mult=0.2)
    return model, build_optimizer(groups, cfg.optim)


def _trained_state(sharded: bool) -> TrainState:
    """A tiny model after one AdamW step (so the optimiser holds moments) and one EMA update, at iteration 5."""
    torch.manual_seed(0)
    model, optimizer = _model_and_optimizer(load_config(overrides=TINY_DINO))
    for p in model.student.parameters():
        p.grad = torch.randn_like(p)
    for group in optimizer.param_groups:
        group["lr"], group["weight_decay"] = 1e-2, 0.04
    optimizer.step()
    model.update_teacher(0.5)
    state = TrainState(model, optimizer, EarlyStopping("val_loss", patience=0, min_delta=0.0), global_batch_size=4,
                       seed=0, sharded=sharded)
    state.iteration = 5
    return state


def _assert_same_state(a: TrainState, b: TrainState) -> None:
    for key, value in a.model.state_dict().items():
        assert torch.equal(value, b.model.state_dict()[key]), key
    saved_a, saved_b = a.optimizer.state_dict(), b.optimizer.state_dict()
    assert saved_a["param_groups"] == saved_b["param_groups"]
    for index, moments in saved_a["state"].items():
        for name, value in moments.items():
            assert torch.equal(value, saved_b["state"][index][name]), (index, name)
    assert b.iteration == a.iteration


def test_sharded_checkpoint_round_trip_in_one_process(tmp_path):
    """The sharded layout on one process: DCP shards + train_state.pth, read back exactly (also by a run whose own
    checkpoints are single files); a truncated shard is skipped for the previous checkpoint, a shard that fails only
    while loading stops the resume (the model may hold part of it)."""
    state = _trained_state(sharded=True)
    ckpt.save_checkpoint(tmp_path, 5, state.state_dict(), max_to_keep=3, sharded=True)
    assert sorted(p.name for p in (tmp_path / "5").iterdir()) == [".metadata", "__0_0.distcp", "train_state.pth"]
    rest = torch.load(tmp_path / "5" / ckpt.SHARDED_STATE_FILE, weights_only=True)
    assert set(rest) == {"iteration", "nonfinite_count", "early_stopping", "data", "rng", "param_groups"}
    assert rest["iteration"] == 5
    assert rest["param_groups"][0]["params"][0].startswith("student.backbone.")  # parameters named, not numbered

    for sharded in (True, False):
        torch.manual_seed(1)  # another initialisation: the checkpoint must overwrite every value
        model, optimizer = _model_and_optimizer(load_config(overrides=TINY_DINO))
        fresh = TrainState(model, optimizer, EarlyStopping("val_loss", patience=0, min_delta=0.0), global_batch_size=4,
                       seed=0, sharded=sharded)
        path, saved = ckpt.load_latest_checkpoint(tmp_path, fresh.sharded_template)
        fresh.load_state_dict(saved)
        assert path == tmp_path / "5"
        _assert_same_state(state, fresh)

    state.iteration = 6
    ckpt.save_checkpoint(tmp_path, 6, state.state_dict(), max_to_keep=3, sharded=True)
    shard = tmp_path / "6" / "__0_0.distcp"
    data = shard.read_bytes()
    shard.write_bytes(data[:1000])
    path, _ = ckpt.load_latest_checkpoint(tmp_path, state.sharded_template)
    assert path == tmp_path / "5"
    shard.write_bytes(bytes(len(data)))  # complete in size, garbage inside: found only while loading
    with pytest.raises(ckpt.PartialLoadError, match=r"6 failed to load part-way .* move the checkpoint aside"):
        ckpt.load_latest_checkpoint(tmp_path, state.sharded_template)
    with pytest.raises(WeightsError, match=r"6 is a sharded checkpoint whose shards cannot be read"):
        load_pretrained(_tiny_backbone(), tmp_path / "6")

    backbone = _tiny_backbone()
    report = load_pretrained(backbone, tmp_path / "5")
    assert report.layout == "training checkpoint (teacher.backbone)"
    for key, value in backbone.state_dict().items():
        assert torch.equal(value, state.model.teacher.backbone.state_dict()[key]), key


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_a_sharded_checkpoint_index_that_would_run_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / ".metadata").write_bytes(pickle.dumps(_RunsCode()))
    backbone = _tiny_backbone()
    with pytest.raises(WeightsError, match=r"\.metadata is not a readable torch.distributed.checkpoint index \(it "
                                           r"refers to posix.system"):
        load_pretrained(backbone, tmp_path / "ckpt")
    assert not (tmp_path / "pwned").exists()


def test_parallelism_keys_and_mixed_precision_policy():
    assert load_config(overrides=["train.parallelism=fsdp"]).train.parallelism == "fsdp"
    with pytest.raises(ConfigError, match=r"train.parallelism='fsd'.*must be one of ddp, fsdp; closest 'fsdp'"):
        load_config(overrides=["train.parallelism=fsd"])
    with pytest.raises(ConfigError, match=r"train.dist_timeout_min=0.0 \(set in the command line\): must be > 0"):
        load_config(overrides=["train.dist_timeout_min=0"])
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    policy = parallel.mixed_precision(cuda, "bf16")
    assert (policy.param_dtype, policy.reduce_dtype) == (torch.bfloat16, torch.float32)
    assert parallel.mixed_precision(cuda, "fp32").param_dtype is None
    assert parallel.mixed_precision(cpu, "bf16").param_dtype is None  # the CPU path stays fp32


HANGING_WORKER = """
import sys, time
from dinocell import distributed
info = distributed.init_distributed(timeout_min=float(sys.argv[1]))
if info.rank == 1:
    time.sleep(60)  # never reaches the barrier
t0 = time.monotonic()
try:
    distributed.barrier()
except Exception as err:
    print(f"failed after {time.monotonic() - t0:.0f} s: {type(err).__name__}", flush=True)
"""


@pytest.mark.slow
def test_dist_timeout_ends_a_collective_that_a_rank_never_joins():
    env = {k: v for k, v in ENV.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env |= {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    procs = [subprocess.Popen([sys.executable, "-c", HANGING_WORKER, "0.05"], env=env | {"RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    try:
        out, _ = procs[0].communicate(timeout=50)
    finally:
        procs[1].kill()
        procs[1].communicate()
    seconds = int(out.split()[2])
    assert out.startswith("failed after") and 2 <= seconds <= 20, out  # 0.05 min = 3 s, not torch's 30 min


@pytest.mark.slow
def test_fsdp_trains_like_ddp_and_resumes_on_one_process(tmp_path):
    """2 processes from the same pretrained weights: FSDP gives DDP's losses, gradient norms, k-NN and teacher (to
    fp32 rounding). Its sharded checkpoint at iteration 3 resumes on one process (batch 4, the same global batch) to
    the 2-process losses; the teacher of a sharded checkpoint loads as pretrained weights."""
    one_masked = "ibot.mask_sample_probability=0.125"  # one rank of each batch has no masked patch
    # pretrained weights to start from (under FSDP only rank 0 reads them); LayerScale 0.1 as in _cli: with 1e-5,
    # KoLeo amplifies fp32 rounding beyond any tolerance
    torch.manual_seed(3)
    start = _tiny_backbone(layerscale_init=0.1).state_dict()
    ckpt.save_eval_dump(tmp_path / "start", {"teacher": {f"backbone.{k}": v for k, v in start.items()}})
    knn = [f"evaluation.knn_{split}_dataset=SyntheticCellPainting:split={split}:size=8:image_size=64:cell_radius=8"
           for split in ("train", "test")] + ["evaluation.knn_k=[3]"]  # on the teacher backbone, gathered under FSDP
    for parallelism in ("ddp", "fsdp"):
        _torchrun("-m", "dinocell.train", *_cli(tmp_path / parallelism, "train.batch_size_per_gpu=2", one_masked,
                                                f"train.parallelism={parallelism}", *knn,
                                                f"student.pretrained_weights={tmp_path / 'start'}"))
    ddp, fsdp = _metrics(tmp_path / "ddp"), _metrics(tmp_path / "fsdp")
    knn_results = [json.loads((tmp_path / p / "eval" / "knn.json").read_text()) for p in ("ddp", "fsdp")]
    assert knn_results[0] == knn_results[1] and {"k", "init", "final", "top1"} <= set(knn_results[0])
    assert len(ddp) == len(fsdp) == 6
    for a, b in zip(ddp, fsdp):  # the sums of gradient averaging differ in order: equal up to fp32 rounding
        for field in (*TERMS, "grad_norm"):  # grad_norm: the norm of the sharded gradient
            assert b[field] == pytest.approx(a[field], rel=1e-6, abs=0), (a["iteration"], field)
    dumps = [torch.load(tmp_path / p / "eval" / "final" / TEACHER_FILE, weights_only=True)["teacher"]
             for p in ("ddp", "fsdp")]
    assert dumps[0].keys() == dumps[1].keys()
    for key, value in dumps[0].items():
        torch.testing.assert_close(dumps[1][key], value, rtol=1e-5, atol=1e-8, msg=key)
    sharded = tmp_path / "fsdp" / "ckpt" / "3"
    assert sorted(p.name for p in sharded.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp",
                                                         "train_state.pth"]
    assert (tmp_path / "ddp" / "ckpt" / "3" / ckpt.CHECKPOINT_FILE).is_file()

    backbone = _tiny_backbone()
    load_pretrained(backbone, tmp_path / "fsdp" / "ckpt" / "6")
    for key, value in backbone.state_dict().items():
        assert torch.equal(value, dumps[1][f"backbone.{key}"]), key

    resumed = tmp_path / "resumed"
    shutil.copytree(sharded, resumed / "ckpt" / "3")
    argv = _cli(resumed, "train.batch_size_per_gpu=4", one_masked, "train.parallelism=fsdp")
    train(load_config(overrides=[a.replace("--output-dir=", "train.output_dir=") for a in argv]))
    assert not distributed.is_enabled()
    records = _metrics(resumed)
    assert [r["iteration"] for r in records] == [3, 4, 5]
    for r in records:
        for field in TERMS:
            assert r[field] == pytest.approx(ddp[r["iteration"]][field], abs=1e-5), (r["iteration"], field)
    assert sorted(p.name for p in (resumed / "ckpt" / "6").iterdir()) == [".metadata", "__0_0.distcp",
                                                                        "train_state.pth"]


LOAD_WORKER = """
import sys
from pathlib import Path
import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
from dinocell import distributed
from dinocell.config import load_config
from dinocell.train.checkpoint import load_latest_checkpoint
from dinocell.train.early_stopping import EarlyStopping
from dinocell.train.state import TrainState
from test_fsdp import _model_and_optimizer
from tiny_runs import TINY_DINO
info = distributed.init_distributed()
with distributed.process_group_ends():
    for root in sys.argv[1:]:
        torch.manual_seed(7)  # another initialisation: the checkpoint must overwrite every value
        model, optimizer = _model_and_optimizer(load_config(overrides=TINY_DINO), shard=True)
        state = TrainState(model, optimizer, EarlyStopping("val_loss", patience=0, min_delta=0.0), global_batch_size=4,
                           seed=0, sharded=True)
        _, saved = load_latest_checkpoint(Path(root), state.sharded_template)
        state.load_state_dict(saved)
        model_sd, optim_sd = get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True,
                                                                                       cpu_offload=True))
        if info.rank == 0:
            torch.save({"model": model_sd, "optimizer": optim_sd, "iteration": state.iteration}, Path(root) / "got.pth")
"""


@pytest.mark.slow
def test_two_sharded_processes_load_one_process_and_single_file_checkpoints(tmp_path):
    """A sharded checkpoint written by one process, and a single-file (DDP) checkpoint, loaded by a 2-process FSDP
    run: gathered back, model and optimiser equal the saved ones value for value."""
    state = _trained_state(sharded=True)
    ckpt.save_checkpoint(tmp_path / "sharded", 5, state.state_dict(), max_to_keep=1, sharded=True)
    ckpt.save_checkpoint(tmp_path / "single", 5, _trained_state(sharded=False).state_dict(), max_to_keep=1)
    (tmp_path / "worker.py").write_text(LOAD_WORKER)
    env = ENV | {"PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), ENV.get("PYTHONPATH", "")])}
    _torchrun(str(tmp_path / "worker.py"), str(tmp_path / "sharded"), str(tmp_path / "single"), env=env)

    names = {id(p): n for n, p in state.model.named_parameters()}
    for root in ("sharded", "single"):
        got = torch.load(tmp_path / root / "got.pth", weights_only=True)
        assert got["iteration"] == 5
        for key, value in state.model.state_dict().items():
            assert torch.equal(value, got["model"][key]), (root, key)
        for param, moments in state.optimizer.state.items():
            for name, value in moments.items():
                assert torch.equal(value, got["optimizer"]["state"][names[id(param)]][name]), (root, name)
