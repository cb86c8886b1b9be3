"""Time and memory of the DINOv3 ViT backbone: forward (eval, no grad) and forward + backward (train mode).

Each measurement runs in a fresh process, so the peak memory of one does not hide the next. Memory on CPU is the
peak resident set size (resource.getrusage ru_maxrss) minus the resident size before the first pass (model and
input already in place): the extra memory a pass needs (activations, gradients, autograd buffers).
tracemalloc cannot see torch's allocations.
On CUDA it is torch.cuda.max_memory_allocated minus the memory allocated before the first pass.

Example (the numbers in docs/benchmarks.md):
    .venv/bin/python scripts/bench_backbone.py --arch vit_small --patch-sizes 16 8 --image-size 224 --batch-size 8
"""

import argparse
import multiprocessing as mp
import resource
import statistics
import time

import torch

from dinocell.models import ARCHS, build_backbone


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(arch: str, patch_size: int, mode: str, args: argparse.Namespace) -> dict:
    """Median seconds per pass and extra peak memory (MiB) of one configuration, in this process."""
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = build_backbone(arch, patch_size=patch_size, in_chans=args.in_chans).to(device)
    x = torch.randn(args.batch_size, args.in_chans, args.image_size, args.image_size, device=device)
    model.train(mode == "fwd+bwd")

    def step() -> None:
        if mode == "fwd":
            with torch.no_grad():
                model(x)
        else:
            model.forward_features(x)["x_norm_patchtokens"].float().square().mean().backward()
            model.zero_grad(set_to_none=True)

    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device) / 2**20
    else:
        base = _rss_mib()
    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.iters):
        start = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    n_tokens = (args.image_size // patch_size) ** 2
    return dict(arch=arch, patch=patch_size, mode=mode, tokens=n_tokens, seconds=statistics.median(times),
                extra_mib=peak - base)


def _worker(queue: mp.Queue, *job) -> None:
    queue.put(measure(*job))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="vit_small", choices=sorted(ARCHS), help="backbone size")
    parser.add_argument("--patch-sizes", type=int, nargs="+", default=[16, 8], help="patch sizes to compare")
    parser.add_argument("--image-size", type=int, default=224, help="square input side in pixels")
    parser.add_argument("--batch-size", type=int, default=8, help="images per pass")
    parser.add_argument("--in-chans", type=int, default=3, help="input channels")
    parser.add_argument("--iters", type=int, default=3, help="timed passes per configuration (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed passes before timing")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    args = parser.parse_args()

    ctx = mp.get_context("spawn")
    print(f"| arch | patch | tokens | pass | median s/iter | img/s | extra peak MiB |  (batch {args.batch_size}, "
          f"{args.image_size} px, {args.device}, threads {args.threads or torch.get_num_threads()})")
    print("|---|---|---|---|---|---|---|")
    for patch in args.patch_sizes:
        for mode in ("fwd", "fwd+bwd"):
            queue = ctx.Queue()
            proc = ctx.Process(target=_worker, args=(queue, args.arch, patch, mode, args))
            proc.start()
            r = queue.get()
            proc.join()
            print(f"| {r['arch']} | {r['patch']} | {r['tokens']} | {r['mode']} | {r['seconds']:.3f} | "
                  f"{args.batch_size / r['seconds']:.1f} | {r['extra_mib']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
