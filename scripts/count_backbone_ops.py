"""Count the aten ops of one backbone training step: a GPU-free measure of launch overhead.

On a GPU the SSL step is partly launch-bound (docs/benchmarks.md): each top-level aten op is about one kernel, so
fewer ops, casts and concatenations mean fewer launches. This counts them with torch.profiler on the CPU, under
bf16 autocast like the GPU step: student forward + backward of the list-forward (2 global crops with iBOT masks +
N local crops per image, drop path on) and teacher forward on the global crops. Ops nested inside another aten op
are not counted. Point PYTHONPATH at any checkout to compare versions.

Example (the table in docs/benchmarks.md):
    PYTHONPATH=. python scripts/count_backbone_ops.py --arch vit_small --patch-size 16
"""

from __future__ import annotations

import argparse
import collections
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile

from dinocell.models import ARCHS, build_backbone

SHOWN = ("aten::to", "aten::cat", "aten::mul", "aten::add")


def top_level_ops(fn: Callable[[], None]) -> collections.Counter:
    fn()  # warm-up: one-time work (e.g. RoPE tables) stays out of the count
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return collections.Counter(
        e.name for e in prof.events()
        if e.name.startswith("aten::") and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--arch", default="vit_small", choices=sorted(ARCHS), help="backbone size")
    parser.add_argument("--patch-size", type=int, default=16)
    parser.add_argument("--in-chans", type=int, default=3)
    parser.add_argument("--local-crops", type=int, default=8, help="local crops per image (96 px; globals 224 px)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    kwargs = dict(patch_size=args.patch_size, in_chans=args.in_chans)
    student = build_backbone(args.arch, drop_path_rate=0.1, **kwargs).train()
    teacher = build_backbone(args.arch, **kwargs).eval()
    crops = [torch.randn(2, args.in_chans, 224, 224), torch.randn(args.local_crops, args.in_chans, 96, 96)]
    masks = [torch.rand(2, (224 // args.patch_size) ** 2) < 0.3, None]

    def student_step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outs = student.forward_features(crops, masks)
            loss = sum(o["x_norm_clstoken"].float().sum() + o["x_norm_patchtokens"].float().mean() for o in outs)
        loss.backward()

    def teacher_step() -> None:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            teacher.forward_features(crops[0])

    print(f"# {args.arch}/{args.patch_size}, {args.in_chans} channels, 2 x 224 + {args.local_crops} x 96 crops, "
          f"bf16 autocast on CPU, torch {torch.__version__}")
    for name, fn in (("student fwd+bwd", student_step), ("teacher fwd", teacher_step)):
        counts = top_level_ops(fn)
        shown = ", ".join(f"{op} {counts[op]}" for op in SHOWN)
        print(f"{name}: {sum(counts.values())} top-level aten ops; {shown}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
