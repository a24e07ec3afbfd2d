"""This user's hpcllm Slurm jobs.

    python tools/jobs.py status [--active]     state, step reached, last loss, run directory
    python tools/jobs.py cancel [JOBID ...]    scancel the given jobs (default: all active ones)
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hpcllm.launch import jobs  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    status = sub.add_parser("status", help="list jobs")
    status.add_argument("--active", action="store_true", help="only pending/running jobs")
    cancel = sub.add_parser("cancel", help="cancel jobs")
    cancel.add_argument("job_ids", nargs="*", help="default: every active hpcllm job")
    args = parser.parse_args()
    if args.command == "status":
        print(jobs.format_table(jobs.list_jobs(include_finished=not args.active)))
    else:
        cancelled = jobs.cancel(args.job_ids)
        print(f"cancelled {' '.join(cancelled)}" if cancelled else "no active hpcllm job to cancel")


if __name__ == "__main__":
    main()
