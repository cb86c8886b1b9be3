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
    from dinocell.pipeline.gpu_augmentations import PhotometricBatch, apply_photometric, draw_photometric
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny model and crops (a CPU smoke test of the script)")
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
    ]
    for check_name, check in checks:
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
