"""`dinocell submit`: queue a training run on Slurm (through submitit), requeued on timeout or preemption."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from dinocell.commands.boundary import add_debug_option, command

EXAMPLES = """\
examples:
  # 2 nodes x 8 GPUs, 2 days; prints the job id; logs in runs/vits8/slurm/
  dinocell submit --config-file configs/train/dinov3_vits8_jump_s3_multiview.yaml --output-dir runs/vits8 \\
      --nodes 2 --gpus-per-node 8 --partition gpu --time 2-00:00:00 --mem-gb 400
  # see the batch script without submitting
  dinocell submit --config-file configs/train/demo.yaml --gpus-per-node 1 --dry-run
  # CPU-only cluster: 4 processes (gloo) on one node
  dinocell submit --config-file configs/train/demo.yaml --gpus-per-node 0 --tasks-per-node 4

Each task (one per GPU) runs `dinocell train`; the process group forms from Slurm's variables. About
signal-delay-s before the time limit (and on preemption) the run writes a checkpoint at the next iteration, and the
job requeues itself under the same id and resumes from it (if that takes longer than 3/4 of signal-delay-s, the job
requeues at once and resumes from the newest periodic checkpoint). The merged config is frozen into
OUTPUT_DIR/slurm/ at submission. See docs/distributed.md.
"""


def build_parser() -> argparse.ArgumentParser:
    from dinocell.run.submit import MAX_TIMEOUTS, SlurmResources

    defaults = SlurmResources()
    parser = argparse.ArgumentParser(
        prog="dinocell submit",
        description="Submit a training run (config + overrides) as one Slurm job through submitit.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run = parser.add_argument_group("training (as for `dinocell train`)")
    run.add_argument("--config-file", default=None,
                     help="YAML recipe (a path, or an s3:// or https:// URL) merged over the default config")
    run.add_argument("--output-dir", default=None, help="run directory, on storage every node sees "
                     "(default: train.output_dir)")
    run.add_argument("--no-resume", action="store_true",
                     help="first attempt starts from scratch even if checkpoints exist (requeued attempts resume)")
    run.add_argument("overrides", nargs="*", help="config overrides key=value, e.g. train.batch_size_per_gpu=32")
    slurm = parser.add_argument_group("Slurm resources")
    slurm.add_argument("--nodes", type=int, default=defaults.nodes, help="nodes (default %(default)s)")
    slurm.add_argument("--gpus-per-node", type=int, default=defaults.gpus_per_node,
                       help="GPUs per node, one task each (default %(default)s; 0 = CPU-only, see --tasks-per-node)")
    slurm.add_argument("--tasks-per-node", type=int, default=None,
                       help="processes per node on CPU-only clusters (--gpus-per-node 0; default 1)")
    slurm.add_argument("--cpus-per-task", type=int, default=None,
                       help="CPUs per task (default: train.num_workers + 1)")
    slurm.add_argument("--mem-gb", type=int, default=None, help="memory per node in GB (default: the partition's)")
    slurm.add_argument("--time", default=str(defaults.time_min),
                       help="time limit of one attempt: minutes, HH:MM:SS or D-HH:MM:SS (default %(default)s minutes)")
    slurm.add_argument("--partition", help="partition (sbatch --partition)")
    slurm.add_argument("--account", help="account to charge (sbatch --account)")
    slurm.add_argument("--qos", help="quality of service (sbatch --qos)")
    slurm.add_argument("--constraint", help="node features, e.g. 'h100|a100' (sbatch --constraint)")
    slurm.add_argument("--exclude", help="nodes not to use, e.g. 'node[01-03]' (sbatch --exclude)")
    slurm.add_argument("--comment", help="free text shown by squeue/sacct (sbatch --comment)")
    slurm.add_argument("--signal-delay-s", type=int, default=defaults.signal_delay_s,
                       help="seconds before the time limit at which the job checkpoints and requeues itself; 3/4 "
                       "of it must cover one iteration plus one checkpoint write (default %(default)s)")
    slurm.add_argument("--max-timeouts", type=int, default=MAX_TIMEOUTS,
                       help="requeues after reaching the time limit before giving up (default %(default)s; "
                       "preemptions do not count)")
    parser.add_argument("--dry-run", action="store_true", help="print the batch script and submit nothing")
    add_debug_option(parser)
    return parser


@command("dinocell submit")
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)

    from dinocell.run import submit

    resources = submit.SlurmResources(
        nodes=args.nodes, gpus_per_node=args.gpus_per_node, tasks_per_node=args.tasks_per_node,
        cpus_per_task=args.cpus_per_task, mem_gb=args.mem_gb, time_min=submit.parse_time_minutes(args.time),
        partition=args.partition, account=args.account, qos=args.qos, constraint=args.constraint,
        exclude=args.exclude, comment=args.comment, signal_delay_s=args.signal_delay_s,
    )
    cfg = submit.load_run_config(args.config_file, args.overrides, args.output_dir)
    parameters = submit.sbatch_parameters(resources, cfg)
    if args.dry_run:
        print(submit.batch_script(cfg, parameters))
        print(f"# each task runs: dinocell train --config-file {submit.slurm_folder(cfg)}/config-<time>.yaml "
              "(the merged config, written at submission)", file=sys.stderr)
        return 0
    job = submit.submit(cfg, parameters, fresh_start=args.no_resume, max_timeouts=args.max_timeouts)
    folder = submit.slurm_folder(cfg)
    print(f"submitted Slurm job {job.job_id}: {resources.nodes} node(s) x {resources.tasks} task(s); "
          f"run directory {cfg.train.output_dir}; task logs {folder}/{job.job_id}_<task>_log.{{out,err}}")
    return 0
