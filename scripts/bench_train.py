"""Speed of one full SSL training iteration (student forward/backward over all crops, teacher forward, heads, losses,
AdamW step, EMA update) on random crops: seconds per iteration, images/s and model FLOP/s.

The data pipeline is left out on purpose (scripts/bench_data.py measures it): this is the model side alone.
FLOPs are counted with an analytic formula (checked against fvcore, see docs/benchmarks.md), multiply-add = 2 FLOPs,
per ViT forward on n tokens:
    patch embed 2*n_patches*(C*p*p)*D + per block [ 2*n*D*(3D) + 2*n*D*D + 2*2*n*n*D + 2*2*n*D*(r*D) ]
(qkv, output projection, attention scores + weighted sum, MLP with ratio r; SwiGLU counts 3 matrices of h =
2/3*r*D rounded to 8), plus the heads: MLP D->H->H->bottleneck->K per cls token (and per masked patch for iBOT).
Training FLOPs = 3 x (student forward) + teacher forward (global crops only). Norms, softmax and the optimiser are
not counted (small). MFU = achieved FLOP/s / peak FLOP/s when --peak-tflops is given (e.g. 989 for H100 bf16 dense).

Speed switches, applied through the config as the trainer applies them (dinocell.train.methods.build_method):
--compile = train.compile=true (torch.compile of the student's and the teacher's blocks, one graph per block mode),
--activation-checkpointing = train.activation_checkpointing=true (the student's blocks recomputed in backward: less
memory). The optimiser is the trainer's: fused AdamW on CUDA (skipping non-finite steps on the device), torch's
default on CPU. --profile N runs N more steps under torch.profiler and prints the top ops by self device time (CPU
time on CPU) and the number of kernel launches per step.

Examples (docs/benchmarks.md):
    .venv/bin/python scripts/bench_train.py --arch vit_small --patch-sizes 16 8 --batch-size 2 --iters 3
    python scripts/bench_train.py --config-file configs/train/dinov3_vits8_jump_s3_multiview.yaml --patch-sizes 8 \
        --batch-size 64 --iters 10 --warmup 3 --compile --peak-tflops 989 --profile 2 student.pretrained_weights=null
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from dinocell.config import load_config
from dinocell.pipeline.batch import SSLBatch
from dinocell.train.methods import build_method
from dinocell.train.optim import build_optimizer, param_groups
from dinocell.train.step import TrainStep


def vit_forward_flops(cfg, backbone, image_size: int) -> float:
    d, depth, c, p = backbone.embed_dim, backbone.n_blocks, cfg.student.in_chans, cfg.student.patch_size
    n_patches = (image_size // p) ** 2
    n = 1 + cfg.student.n_storage_tokens + n_patches
    ffn = sum(m.numel() for m in backbone.blocks[0].mlp.parameters() if m.ndim == 2)  # weights of the FFN matrices
    per_block = 2 * n * d * 3 * d + 2 * n * d * d + 4 * n * n * d + 2 * n * ffn
    return 2 * n_patches * c * p * p * d + depth * per_block


def head_flops(head_cfg, d: int) -> float:
    h, bn, k = head_cfg.head_hidden_dim, head_cfg.head_bottleneck_dim, head_cfg.head_n_prototypes
    layers = head_cfg.head_nlayers
    dims = [d] + [h] * (layers - 1) + [bn]
    return 2 * sum(a * b for a, b in zip(dims[:-1], dims[1:])) + 2 * bn * k


def train_flops(cfg, backbone, batch: int, n_masked: int) -> float:
    g, loc, n_local = cfg.crops.global_crops_size, cfg.crops.local_crops_size, cfg.crops.local_crops_number
    d = backbone.embed_dim
    student = batch * (2 * vit_forward_flops(cfg, backbone, g) + n_local * vit_forward_flops(cfg, backbone, loc))
    student += batch * (2 + n_local) * head_flops(cfg.dino, d) + n_masked * head_flops(cfg.ibot, d)
    teacher = batch * 2 * (vit_forward_flops(cfg, backbone, g) + head_flops(cfg.dino, d)) + n_masked * head_flops(
        cfg.ibot, d)
    return 3 * student + teacher


def random_batch(cfg, batch: int, device: torch.device) -> SSLBatch:
    g, loc, n_local, c = (cfg.crops.global_crops_size, cfg.crops.local_crops_size, cfg.crops.local_crops_number,
                          cfg.student.in_chans)
    n = (g // cfg.student.patch_size) ** 2
    masks = torch.zeros(2 * batch, n, dtype=torch.bool)
    masks[: batch, : int(0.3 * n)] = True  # half the global crops masked at the middle of the 0.1-0.5 ratio range
    per_crop = masks.sum(dim=-1, keepdim=True).clamp(min=1).float()
    return SSLBatch(
        global_crops=torch.randn(2 * batch, c, g, g),
        local_crops=torch.randn(n_local * batch, c, loc, loc),
        masks=masks,
        mask_indices=masks.flatten().nonzero().flatten(),
        mask_weights=(1.0 / per_crop).expand_as(masks)[masks],
        n_global_crops=2,
        n_local_crops=n_local,
    ).to(device)


def bench(args: argparse.Namespace, patch_size: int) -> dict[str, float]:
    device = torch.device(args.device)
    switches = [f"train.compile={str(args.compile).lower()}",
                f"train.activation_checkpointing={str(args.activation_checkpointing).lower()}"]
    cfg = load_config(args.config_file, [f"student.arch={args.arch}", f"student.patch_size={patch_size}",
                                         *switches, *args.overrides])
    torch.manual_seed(0)
    model = build_method(cfg).to(device).train()
    optimizer = build_optimizer(param_groups(model.student, n_blocks=model.student.backbone.n_blocks,
                                             layerwise_decay=0.9, patch_embed_lr_mult=0.2), cfg.optim,
                                fused=device.type == "cuda")
    train_step = TrainStep(model, optimizer, device=device, clip_grad=3.0, autocast_dtype="bf16")
    values = {"lr": 1e-4, "last_layer_lr": 1e-4, "weight_decay": 0.04, "teacher_temp": 0.07, "momentum": 0.992}
    batch = random_batch(cfg, args.batch_size, device)

    def step() -> None:
        train_step([batch], values)

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.iters):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    s_per_iter = (time.perf_counter() - start) / args.iters
    flops = train_flops(cfg, model.student.backbone, args.batch_size, len(batch.mask_indices))
    result = {"s_per_iter": s_per_iter, "images_per_s": args.batch_size / s_per_iter,
              "gflops_per_iter": flops / 1e9, "achieved_tflops": flops / s_per_iter / 1e12}
    if device.type == "cuda":
        result["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    if args.peak_tflops:
        result["mfu"] = result["achieved_tflops"] / args.peak_tflops
    if args.profile:
        result.update(profile_steps(step, args.profile, device))
    return result


def profile_steps(step, n_steps: int, device: torch.device, row_limit: int = 25) -> dict[str, float]:
    """Print the top ops of `n_steps` steps by self device time (self CPU time on CPU); return the device kernels
    (memory copies included) per step, or on CPU the aten op calls per step (nested calls counted)."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(n_steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    sort_by = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort_by, row_limit=row_limit), flush=True)
    if device.type == "cuda":
        kernels = sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
        return {"kernels_per_iter": kernels / n_steps}
    return {"aten_ops_per_iter": sum(1 for e in prof.events() if e.name.startswith("aten::")) / n_steps}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--arch", default="vit_small", help="student.arch (default vit_small)")
    parser.add_argument("--patch-sizes", type=int, nargs="+", default=[16, 8], help="patch sizes to measure")
    parser.add_argument("--batch-size", type=int, default=2, help="images per iteration (each 2 global + N local)")
    parser.add_argument("--iters", type=int, default=3, help="timed iterations")
    parser.add_argument("--warmup", type=int, default=1, help="untimed iterations first")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="device peak TFLOP/s, to report MFU")
    parser.add_argument("--compile", action="store_true", help="torch.compile the backbone blocks (student+teacher)")
    parser.add_argument("--activation-checkpointing", action="store_true",
                        help="recompute the student's blocks in backward instead of storing activations")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="after timing, profile N steps and print the top ops (0 = no profile)")
    parser.add_argument("--config-file", default=None, help="recipe for heads/crops (default: the default config, "
                        "2 x 224 + 8 x 96 crops, 65536-prototype heads)")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# {args.arch}, batch {args.batch_size}, device {args.device}, torch {torch.__version__}, threads "
          f"{torch.get_num_threads()}, compile {args.compile}, "
          f"activation checkpointing {args.activation_checkpointing}")
    for patch_size in args.patch_sizes:
        result = bench(args, patch_size)
        print(f"patch {patch_size}: " + "  ".join(f"{k} {v:.4g}" for k, v in result.items()), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
