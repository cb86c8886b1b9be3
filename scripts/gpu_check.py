"""Correctness checks of the GPU speed paths, in one process, each against its reference (issue 10):

  list_forward      concatenated list-forward == one crop batch at a time, fp32 on the device
  bf16_forward      bf16 autocast forward vs fp32 (relative error in the bf16 band)
  compiled          compile_blocks() (inductor) == eager: fp32 forward and gradients, bf16 forward; and in training
                    (drop path, RoPE augmentation) a steady state without recompiles
  checkpointing     activation checkpointing: same outputs and gradients, less peak memory
  fused_adamw       AdamW(fused=True) == AdamW(foreach=True) over several steps with weight decay
  gpu_augmentations batched photometric ops on the device == the CPU reference transform, crop by crop
  sdpa_backends     fwd+bwd time of each SDPA backend (cuDNN, flash, efficient, math) on the ViT-S/8 global-crop
                    shape, and which one the default dispatch picks (the evidence that replaced the xFormers path)
  bf16_dtypes       under bf16 autocast the teacher, the backbones and both heads run in bf16 (the heads' last layers
                    take and give bf16: no fp32 round trip at the L2 normalisation), the loss terms are fp32
  sync_free_step    the trainer's step (TrainStep, fused AdamW) and the device copy of the next batch queue their work
                    without one host synchronisation (torch.cuda.set_sync_debug_mode("error")): DINO with device
                    augmentations, DINO with EMA centering, SimCLR
  fused_skip        a non-finite step with the trainer's fused AdamW leaves parameters, moments, step counts, teacher
                    and centers bit for bit as they were (found_inf, decided on the device); the next step moves them
  device_pipeline   crops.gpu_augmentations through loader + collate + finish_crops on the device == the CPU path
                    (JUMP recipe views, normalisation; noise in distribution), and the device time per batch
  trainer_switches  `train()` on the device with train.compile, train.activation_checkpointing and
                    crops.gpu_augmentations each against the default run: the same losses within bf16 rounding, and
                    the compiled run's graphs stop growing after the first iterations

Prints one line per check (PASS/FAIL and the numbers) and a summary; exit status 1 if any check failed.
`--device cpu --tiny` runs the same code on tiny shapes on a CPU (a smoke test of this script).

Example (what scripts/gpu_check.sh runs):
    PYTHONPATH=. python scripts/gpu_check.py --device cuda
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import random
import time
import traceback
from collections.abc import Callable

import torch

from dinocell.models import build_backbone

RESULTS: list[tuple[str, str, str]] = []


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def record(name: str, ok: bool, detail: str) -> None:
    status = "PASS" if ok else "FAIL"
    RESULTS.append((name, status, detail))
    print(f"[{status}] {name}: {detail}", flush=True)


def shapes(tiny: bool) -> dict:
    """Model and crops: the JUMP recipe's ViT-S/8 on 1-channel 224/96 crops (a few images), or a tiny stand-in."""
    if tiny:
        return dict(arch="vit_test", patch=8, chans=1, batch=2, global_size=32, local_size=16, n_local=2)
    return dict(arch="vit_small", patch=8, chans=1, batch=4, global_size=224, local_size=96, n_local=8)


def make_model(s: dict, device: torch.device, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_backbone(s["arch"], patch_size=s["patch"], in_chans=s["chans"], layerscale_init=0.1, **kwargs)
    return model.to(device)


def make_crops(s: dict, device: torch.device) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    g = torch.Generator().manual_seed(1)
    b, c = s["batch"], s["chans"]
    crops = [torch.randn(2 * b, c, s["global_size"], s["global_size"], generator=g),
             torch.randn(s["n_local"] * b, c, s["local_size"], s["local_size"], generator=g)]
    n = (s["global_size"] // s["patch"]) ** 2
    masks = [torch.rand(2 * b, n, generator=g) < 0.3, None]
    return [x.to(device) for x in crops], [m if m is None else m.to(device) for m in masks]


def loss_of(outs: list[dict]) -> torch.Tensor:
    return sum((o["x_norm_clstoken"].float() ** 2).sum() + o["x_norm_patchtokens"].float().mean() for o in outs)


def features(outs: list[dict]) -> torch.Tensor:
    return torch.cat([torch.cat([o["x_norm_clstoken"].flatten(), o["x_norm_patchtokens"].flatten()]) for o in outs])


def grads(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def autocast(device: torch.device, enabled: bool = True):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def check_list_forward(device: torch.device, s: dict) -> None:
    model = make_model(s, device).eval()
    crops, masks = make_crops(s, device)
    with torch.no_grad():
        together = features(model.forward_features(crops, masks))
        alone = features([model.forward_features(c, m) for c, m in zip(crops, masks)])
    err = rel_err(together, alone)
    record("list_forward", err <= 1e-5, f"fp32 rel err {err:.2e} (<= 1e-5)")


def check_bf16_forward(device: torch.device, s: dict) -> None:
    model = make_model(s, device).eval()
    crops, masks = make_crops(s, device)
    with torch.no_grad():
        ref = features(model.forward_features(crops, masks))
        with autocast(device):
            out = features(model.forward_features(crops, masks))
    err = rel_err(out, ref)
    record("bf16_forward", err <= 3e-2, f"bf16 autocast vs fp32 rel err {err:.2e} (bf16 band 1e-3..1e-2, <= 3e-2)")


def check_compiled(device: torch.device, s: dict) -> None:
    torch._dynamo.reset()
    crops, masks = make_crops(s, device)
    eager = make_model(s, device).eval()
    compiled = copy.deepcopy(eager)
    start = time.perf_counter()
    compiled.compile_blocks()
    results = []
    for m in (eager, compiled):
        outs = m.forward_features(crops, masks)
        loss_of(outs).backward()
        results.append((features(outs).detach(), grads(m)))
    compile_s = time.perf_counter() - start
    fwd, grad = rel_err(results[1][0], results[0][0]), rel_err(results[1][1], results[0][1])
    with torch.no_grad(), autocast(device):
        compiled_bf16 = features(compiled.forward_features(crops, masks))
        bf16 = rel_err(compiled_bf16, features(eager.forward_features(crops, masks)))
    ok = fwd <= 1e-4 and grad <= 1e-4 and bf16 <= 3e-2
    record("compiled", ok, f"fp32 forward rel err {fwd:.2e}, gradients {grad:.2e} (<= 1e-4); bf16 forward {bf16:.2e} "
           f"(<= 3e-2); first call incl. compile {compile_s:.1f} s")

    # training: drop path + RoPE augmentation, student (grad) and teacher-like (no grad) calls; steady state
    torch._dynamo.reset()
    train = make_model(s, device, drop_path_rate=0.1, pos_embed_rope_rescale_coords=2.0)
    teacher = copy.deepcopy(train).eval()
    train.compile_blocks()
    teacher.compile_blocks()
    before = int(torch._dynamo.utils.counters["stats"]["unique_graphs"])  # reset() does not clear the counter
    counts = []
    for _ in range(3):
        with autocast(device):
            loss_of(train.train().forward_features(crops, masks)).backward()
            with torch.no_grad():
                teacher.forward_features(crops[0])
        counts.append(int(torch._dynamo.utils.counters["stats"]["unique_graphs"]) - before)
    # student (grad) and teacher (no grad), each: block 0 without drop path + one graph for all other blocks
    record("compiled_training", counts[-1] == counts[0] and counts[0] <= 4,
           f"graphs compiled after each of 3 steps {counts} (steady state: no growth, <= 4 for all blocks; fullgraph)")
    torch._dynamo.reset()


def check_checkpointing(device: torch.device, s: dict) -> None:
    crops, masks = make_crops(s, device)
    results = []
    for on in (False, True):
        model = make_model(s, device, drop_path_rate=0.1, activation_checkpointing=on).train()
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        torch.manual_seed(5)
        with autocast(device, enabled=False):
            outs = model.forward_features(crops, masks)
            loss_of(outs).backward()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if device.type == "cuda" else float("nan")
        results.append((features(outs).detach(), grads(model), peak))
    out_err, grad_err = rel_err(results[1][0], results[0][0]), rel_err(results[1][1], results[0][1])
    ok = out_err <= 1e-6 and grad_err <= 1e-5 and not results[1][2] > results[0][2]
    record("checkpointing", ok, f"outputs rel err {out_err:.2e} (<= 1e-6), gradients {grad_err:.2e} (<= 1e-5); "
           f"peak extra memory {results[0][2]:.0f} -> {results[1][2]:.0f} MiB")


def check_fused_adamw(device: torch.device, s: dict) -> None:
    model = make_model(s, device)
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    params = {}
    for mode in ("foreach", "fused"):
        copies = [[p.detach().clone().requires_grad_() for p in group] for group in (decay, no_decay)]
        opt = torch.optim.AdamW([{"params": copies[0], "weight_decay": 0.04}, {"params": copies[1],
                                 "weight_decay": 0.0}], lr=1e-3, betas=(0.9, 0.999), **{mode: True})
        g = torch.Generator(device=device).manual_seed(7)
        for _ in range(10):
            for p in copies[0] + copies[1]:
                p.grad = torch.randn(p.shape, generator=g, device=device)
            opt.step()
        params[mode] = torch.cat([p.detach().flatten() for p in copies[0] + copies[1]])
    start = torch.cat([p.detach().flatten() for p in decay + no_decay])
    err = rel_err(params["fused"] - start, params["foreach"] - start)
    record("fused_adamw", err <= 1e-5, f"10 steps, update rel err fused vs foreach {err:.2e} (<= 1e-5)")


def check_gpu_augmentations(device: torch.device, tiny: bool) -> None:
    from dinocell.config import load_config
    from dinocell.pipeline.gpu_augmentations import PhotometricBatch, apply_photometric
    from dinocell.pipeline.photometric import draw_photometric
    from dinocell.pipeline.samplers import SeedStream, derive_seed
    from dinocell.pipeline.transforms import MultiCropTransform

    overrides = ["crops.intensity_aug_probability=0.5", "crops.solarization_probability.local=0.5",
                 "crops.noise_probability.local=0.3"]
    settings = load_config(overrides=overrides).crops
    reference = MultiCropTransform(settings, in_chans=5, seed=0)
    n, size = (8, 16) if tiny else (512, 96)  # a batch of 64 fields x 8 local crops
    crops = torch.rand(n, 5, size, size, generator=torch.Generator().manual_seed(3))
    start = time.perf_counter()
    expected, params = [], []
    for i, crop in enumerate(crops):
        ref_rng = random.Random(derive_seed(0, SeedStream.CROPS, i))
        expected.append(reference._photometric(crop.clone(), "local", ref_rng))
        params.append(draw_photometric(settings, "local", 5, random.Random(derive_seed(0, SeedStream.CROPS, i))))
    cpu_s = time.perf_counter() - start

    def run() -> torch.Tensor:
        return apply_photometric(crops_dev, PhotometricBatch.stack(params, device), settings.solarization_threshold)

    crops_dev = crops.to(device)
    out = run().cpu()
    device_s = timed(run, device)
    expected = torch.stack(expected)
    noisy = torch.tensor([p.noise for p in params])
    err = (out[~noisy] - expected[~noisy]).abs().max().item()
    quiet = [dataclasses.replace(p, noise=False) for p in params]
    clean = apply_photometric(crops_dev, PhotometricBatch.stack(quiet, device), settings.solarization_threshold).cpu()
    drawn = [p for p in params if p.noise]
    stds = [((o - c).std() / p.noise_std).item() for o, c, p in zip(out[noisy], clean[noisy], drawn)]
    std_ok = all(abs(r - 1) < 0.1 for r in stds)
    record("gpu_augmentations", err <= 1e-4 and std_ok,
           f"{n} crops {size}px x 5 ch: max abs diff without noise {err:.2e} (<= 1e-4); noise std / drawn std in "
           f"[{min(stds, default=1):.3f}, {max(stds, default=1):.3f}] (within 10 %); device {device_s * 1e3:.2f} ms "
           f"per batch vs CPU reference {cpu_s * 1e3:.0f} ms (1 process)")


def timed(fn: Callable[[], object], device: torch.device, iters: int = 10) -> float:
    """Median seconds per call after one warm-up, synchronised."""
    fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def check_sdpa_backends(device: torch.device, s: dict) -> None:
    if device.type != "cuda":
        record("sdpa_backends", True, "skipped: CUDA only")
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    tokens = 1 + 4 + (s["global_size"] // s["patch"]) ** 2
    q, k, v = (torch.randn(128, 6, tokens, 64, device=device, dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))

    def step() -> None:
        torch.nn.functional.scaled_dot_product_attention(q, k, v).sum().backward()

    lines = []
    for name in ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH", None):
        try:
            if name is None:
                lines.append(f"default {timed(step, device) * 1e3:.2f} ms")
            else:
                with sdpa_kernel(getattr(SDPBackend, name)):
                    lines.append(f"{name.lower()} {timed(step, device) * 1e3:.2f} ms")
        except RuntimeError as e:
            lines.append(f"{name.lower()} unavailable ({str(e).splitlines()[0][:60]})")
    record("sdpa_backends", True, f"fwd+bwd [128, 6, {tokens}, 64] bf16: " + "; ".join(lines))


# a tiny DINO run of the trainer (tests/test_train_speed.py's): the trainer-level checks are about wiring, not size
TINY_RUN = [
    "student.arch=vit_test", "student.patch_size=8", "student.n_storage_tokens=1", "student.in_chans=5",
    "student.drop_path_rate=0.1", "student.layerscale=0.1", "crops.global_crops_size=32", "crops.local_crops_size=16",
    "crops.local_crops_number=2", "dino.head_n_prototypes=64", "ibot.head_n_prototypes=64",
    "dino.head_hidden_dim=32", "ibot.head_hidden_dim=32", "dino.head_bottleneck_dim=16", "ibot.head_bottleneck_dim=16",
    "train.dataset_path=SyntheticCellPainting:size=64:image_size=64", "train.batch_size_per_gpu=8",
    "train.num_workers=0", "train.OFFICIAL_EPOCH_LENGTH=6", "optim.epochs=1", "optim.warmup_epochs=0",
    "teacher.warmup_teacher_temp_epochs=0", "train.log_every=3", "checkpointing.period=6",
    "evaluation.eval_period_iterations=0",
]
STEP_VALUES = {"lr": 1e-3, "last_layer_lr": 1e-3, "weight_decay": 0.04, "teacher_temp": 0.07, "momentum": 0.9}


def trainer_parts(device: torch.device, overrides: list[str]):
    """(model, optimizer, TrainStep, loader iterator) as the trainer builds them on `device` (fused AdamW on CUDA)."""
    from dinocell.config import load_config
    from dinocell.data import make_dataset
    from dinocell.pipeline.loaders import build_ssl_loader_from_config
    from dinocell.train.methods import build_method
    from dinocell.train.optim import build_optimizer, param_groups
    from dinocell.train.step import TrainStep

    cfg = load_config(overrides=[*TINY_RUN, *overrides])
    torch.manual_seed(0)
    model = build_method(cfg).to(device).train()
    groups = param_groups(model.student, n_blocks=model.student.backbone.n_blocks, layerwise_decay=0.9,
                          patch_embed_lr_mult=0.2)
    optimizer = build_optimizer(groups, cfg.optim, fused=device.type == "cuda")
    step = TrainStep(model, optimizer, device=device, clip_grad=3.0, autocast_dtype="bf16")
    loader = build_ssl_loader_from_config(cfg, make_dataset(cfg.train.dataset_path), rank=0, world_size=1,
                                          start_iter=0, pin_memory=device.type == "cuda")
    return model, optimizer, step, iter(loader)


def check_bf16_dtypes(device: torch.device) -> None:
    from dinocell.pipeline.prefetch import DevicePrefetcher

    model, _, _, batches = trainer_parts(device, [])
    seen: dict[str, tuple[torch.dtype, torch.dtype]] = {}
    for role in ("student", "teacher"):
        for name in ("dino_head", "ibot_head"):
            getattr(getattr(model, role), name).last_layer.register_forward_hook(
                lambda m, args, out, key=f"{role}.{name}": seen.__setitem__(key, (args[0].dtype, out.dtype)))
    batch = next(DevicePrefetcher(batches, device)).finish_crops()
    with torch.autocast(device.type, dtype=torch.bfloat16):
        out = model(batch, teacher_temp=0.07)
    bf16 = {k: v for k, v in seen.items() if v != (torch.bfloat16, torch.bfloat16)}
    terms = {k: v.dtype for k, v in out.terms.items() if v.dtype != torch.float32}
    ok = not bf16 and not terms and out.loss.dtype == torch.float32 and len(seen) == 4
    record("bf16_dtypes", ok or device.type != "cuda",
           f"heads' last layers not bf16 in/out: {bf16 or 'none'} (of {len(seen)}); non-fp32 loss terms: "
           f"{terms or 'none'}"
           + ("" if device.type == "cuda" else " (CPU autocast has other op lists: informative only)"))


def check_sync_free_step(device: torch.device) -> None:
    from dinocell.pipeline.prefetch import DevicePrefetcher

    if device.type != "cuda":
        record("sync_free_step", True, "skipped: CUDA only (tests/test_train_speed.py counts host reads on CPU)")
        return
    variants = {"dino + device augmentations": ["crops.gpu_augmentations=true", "crops.noise_probability.local=0.5"],
                "dino + EMA centering": ["train.centering=centering"],
                "simclr": ["method=simclr", "crops.local_crops_number=0", "simclr.head_hidden_dim=32"]}
    failures = []
    for name, overrides in variants.items():
        _, _, step, batches = trainer_parts(device, overrides)
        prefetcher = DevicePrefetcher(batches, device)
        step([next(prefetcher)], STEP_VALUES)  # optimiser state, RoPE tables, cuDNN plans
        host = next(batches)  # the loader's own work (workers, pinning) is not the step's
        torch.cuda.synchronize()
        try:
            torch.cuda.set_sync_debug_mode("error")
            step([next(DevicePrefetcher(iter([host]), device))], STEP_VALUES)
        except RuntimeError as err:
            failures.append(f"{name}: {str(err).splitlines()[0][:120]}")
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
    record("sync_free_step", not failures,
           f"{len(variants)} variants, one step each under set_sync_debug_mode('error'): "
           + ("; ".join(failures) if failures else "no synchronisation"))


def check_fused_skip(device: torch.device) -> None:
    from dinocell.pipeline.prefetch import DevicePrefetcher
    from dinocell.train.meta_arch import SSLMetaArch

    model, optimizer, step, batches = trainer_parts(device, ["train.centering=centering"])
    batch = next(DevicePrefetcher(batches, device))

    def state() -> dict[str, torch.Tensor]:
        flat = {f"model.{k}": v.detach().clone() for k, v in model.state_dict().items()}
        for i, per_param in enumerate(optimizer.state.values()):
            flat |= {f"optim.{i}.{k}": v.clone() for k, v in per_param.items()}
        return flat

    step([batch], STEP_VALUES)
    before = state()
    real_forward = SSLMetaArch.forward

    def poisoned(self, b, teacher_temp):
        out = real_forward(self, b, teacher_temp)
        return out._replace(loss=out.loss * float("nan"))

    SSLMetaArch.forward = poisoned
    try:
        skipped = step([batch], STEP_VALUES)
    finally:
        SSLMetaArch.forward = real_forward
    after = state()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    moved = step([batch], STEP_VALUES)
    later = state()
    moved_keys = {k.split(".")[1] for k in before if not torch.equal(after[k], later[k])}
    ok = (step.skips_on_device == (device.type == "cuda") and not bool(skipped.finite) and not changed
          and bool(moved.finite) and {"student", "teacher", "dino_center", "0"} <= moved_keys)
    record("fused_skip", ok, f"fused {step.skips_on_device}; after the NaN step {len(changed)} of {len(before)} "
           f"tensors changed {changed[:3]}; the next step moved {sorted(moved_keys)[:6]}")


def check_device_pipeline(device: torch.device, tiny: bool) -> None:
    import itertools

    from dinocell.config import load_config
    from dinocell.data import make_dataset
    from dinocell.pipeline.loaders import build_ssl_loader_from_config
    from dinocell.pipeline.prefetch import DevicePrefetcher

    recipe = ["student.in_chans=1", "student.patch_size=8", "crops.rotate90=true",
              "crops.channel_views={global1: mean, global2: single, local: single}",
              "crops.noise_probability={global1: 0.0, global2: 0.3, local: 0.3}", "crops.noise_std=[0.02,0.05]",
              "train.num_workers=0",
              "crops.channel_mean=[0.3,0.3,0.3,0.3,0.3]", "crops.channel_std=[0.2,0.2,0.2,0.2,0.2]"]
    shape = (["crops.global_crops_size=32", "crops.local_crops_size=16", "train.batch_size_per_gpu=4"] if tiny else
             ["crops.global_crops_size=224", "crops.local_crops_size=96", "train.batch_size_per_gpu=64"])
    dataset = make_dataset(f"SyntheticCellPainting:size=256:image_size={64 if tiny else 256}")
    batches = {}
    for path in ("cpu", "device"):
        cfg = load_config(overrides=[*recipe, *shape, f"crops.gpu_augmentations={str(path == 'device').lower()}"])
        loader = build_ssl_loader_from_config(cfg, dataset, rank=0, world_size=1, start_iter=0)
        batches[path] = list(itertools.islice(iter(loader), 2))
    worst, ratios = 0.0, []
    for cpu, pending in zip(batches["cpu"], batches["device"]):
        finished = next(DevicePrefetcher(iter([pending]), device)).finish_crops()
        for key in ("global_crops", "local_crops"):
            ops = getattr(pending.device_augmentation, key).photometric
            got, ref = getattr(finished, key).cpu(), getattr(cpu, key)
            noisy = ops.noise
            worst = max(worst, (got[~noisy] - ref[~noisy]).abs().max().item())
            if noisy.any():  # in normalised units: (noise - reference noise) / std has std sqrt(2) x drawn std / 0.2
                residual = (got[noisy] - ref[noisy]).flatten(1).std(dim=1)
                ratios += (residual * 0.2 / (2**0.5 * ops.noise_std[noisy])).tolist()
    on_device = batches["device"][0].to(device)
    seconds = timed(lambda: on_device.finish_crops(), device)
    ok = worst <= 1e-4 and all(abs(r - 1) < 0.15 for r in ratios)
    record("device_pipeline", ok, f"batch of {batches['device'][0].batch_size} (JUMP views): max abs diff without "
           f"noise {worst:.2e} (<= 1e-4), noise std ratio in [{min(ratios, default=1):.3f}, "
           f"{max(ratios, default=1):.3f}] (within 15 %); finish_crops {seconds * 1e3:.2f} ms per batch on {device}")


def check_trainer_switches(device: torch.device) -> None:
    """train() end to end on the device; on CPU the compiled run uses dynamo without code generation (aot_eager),
    which keeps the --tiny smoke test quick (inductor's CPU path is tests/test_backbone_speed.py's)."""
    import json
    import tempfile
    from pathlib import Path

    from dinocell.config import load_config
    from dinocell.logging import MetricsLogger
    from dinocell.models.vision_transformer import DinoVisionTransformer
    from dinocell.train.train import train

    real_compile_blocks, real_log = DinoVisionTransformer.compile_blocks, MetricsLogger.log
    if device.type != "cuda":
        DinoVisionTransformer.compile_blocks = lambda self, **kw: real_compile_blocks(self, backend="aot_eager", **kw)
    graph_counts: list[int] = []  # dynamo's graphs so far at each metrics line (iterations 3 and 6)

    def log(self, record: dict) -> None:
        graph_counts.append(int(torch._dynamo.utils.counters["stats"]["unique_graphs"]))
        real_log(self, record)

    MetricsLogger.log = log
    torch._dynamo.reset()
    losses, lines = {}, []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for name, extra in {"eager": [], "compile": ["train.compile=true"],
                                "checkpointing": ["train.activation_checkpointing=true"],
                                "gpu_augmentations": ["crops.gpu_augmentations=true"]}.items():
                out = Path(tmp) / name
                graph_counts.clear()
                start = time.perf_counter()
                train(load_config(overrides=[*TINY_RUN, f"train.output_dir={out}", *extra]))
                records = [json.loads(line) for line in (out / "training_metrics.json").read_text().splitlines()]
                losses[name] = torch.tensor([r["total_loss"] for r in records], dtype=torch.float64)
                lines.append(f"{name} {time.perf_counter() - start:.0f} s")
                if name == "compile":
                    steady = graph_counts[0] > 0 and graph_counts[-1] == graph_counts[0]
                    lines[-1] += f", graphs at iterations 3 and 6: {graph_counts}"
    finally:
        DinoVisionTransformer.compile_blocks, MetricsLogger.log = real_compile_blocks, real_log
        torch._dynamo.reset()
    errors = {name: ((loss - losses["eager"]).abs() / losses["eager"].abs()).max().item()
              for name, loss in losses.items() if name != "eager"}
    ok = steady and all(e <= 2e-2 for e in errors.values()) and all(torch.isfinite(v).all() for v in losses.values())
    record("trainer_switches", ok, "loss rel diff vs eager over 6 iterations: "
           + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()) + " (<= 2e-2, bf16); " + "; ".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny model and crops (a CPU smoke test of the script)")
    parser.add_argument("--only", nargs="+", metavar="CHECK", help="run only these checks (names as listed above)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 comparisons in true fp32
    torch.backends.cudnn.allow_tf32 = False
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"# gpu_check on {name}, torch {torch.__version__}, CUDA {torch.version.cuda}, tiny {args.tiny}", flush=True)
    s = shapes(args.tiny)
    checks = [
        ("list_forward", lambda: check_list_forward(device, s)),
        ("bf16_forward", lambda: check_bf16_forward(device, s)),
        ("compiled", lambda: check_compiled(device, s)),
        ("checkpointing", lambda: check_checkpointing(device, s)),
        ("fused_adamw", lambda: check_fused_adamw(device, s)),
        ("gpu_augmentations", lambda: check_gpu_augmentations(device, args.tiny)),
        ("sdpa_backends", lambda: check_sdpa_backends(device, s)),
        ("bf16_dtypes", lambda: check_bf16_dtypes(device)),
        ("sync_free_step", lambda: check_sync_free_step(device)),
        ("fused_skip", lambda: check_fused_skip(device)),
        ("device_pipeline", lambda: check_device_pipeline(device, args.tiny)),
        ("trainer_switches", lambda: check_trainer_switches(device)),
    ]
    unknown = set(args.only or ()) - {name for name, _ in checks}
    if unknown:
        parser.error(f"unknown check(s) {sorted(unknown)}; choose from {', '.join(name for name, _ in checks)}")
    for check_name, check in checks:
        if args.only and check_name not in args.only:
            continue
        start = time.perf_counter()
        try:
            check()
        except Exception:  # a crashing check is a failed check; the others still run
            traceback.print_exc()
            record(check_name, False, "raised (traceback above)")
        print(f"    ({time.perf_counter() - start:.1f} s)", flush=True)
    failed = [r for r in RESULTS if r[1] == "FAIL"]
    print(f"# summary: {len(RESULTS) - len(failed)} passed, {len(failed)} failed" +
          (f": {', '.join(r[0] for r in failed)}" if failed else ""), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
