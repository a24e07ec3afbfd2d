"""Put several method=eval runs side by side (a Markdown table on stdout and a PNG bar chart), or cross-check
runs with lm-evaluation-harness question by question.

    python tools/compare_evals.py runs/eval/a runs/eval/b --png compare.png [--average subjects]
    python tools/compare_evals.py --lm-eval runs/eval/a      # needs lm-eval: pip install 'hpcllm[lmeval]'

The cross-check runs lm-eval on the run's exported model (model.path) and its local data files through a
task config generated from hpcllm's template, writes RUN_DIR/lm_eval_check/lm_eval_check.{json,csv} and
exits 1 when a prediction differs although the run's settings are those under which both must agree.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hpcllm.eval.compare import compare_chart, compare_markdown, load_results  # noqa: E402


def cross_check(run_dirs, batch_size: int, device: str) -> int:
    from hpcllm.eval.lm_eval_check import check_markdown, cross_check as check, lm_eval_missing

    missing = lm_eval_missing()
    if missing:
        print(f"compare_evals: {missing}", file=sys.stderr)
        return 2
    failed = False
    for run_dir in run_dirs:
        report = check(Path(run_dir), batch_size=batch_size, device=device)
        print(f"{run_dir}: {check_markdown(report)}", end="")
        failed |= report["same_prediction"] != report["questions"] and not report["differs_by_design"]
    return int(failed)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories holding results.json")
    parser.add_argument("--png", default="compare_evals.png", help="where the bar chart goes (default: %(default)s)")
    parser.add_argument("--average", choices=("questions", "subjects"), default="questions",
                        help="accuracy averaged over questions (each counts once) or over subjects")
    parser.add_argument("--lm-eval", action="store_true",
                        help="cross-check each run with lm-evaluation-harness instead, question by question")
    parser.add_argument("--batch-size", type=int, default=4, help="lm-eval's batch size (with --lm-eval)")
    parser.add_argument("--device", default="cpu", help="lm-eval's device, e.g. cuda:0 (with --lm-eval)")
    args = parser.parse_args(argv)
    try:
        results = load_results(args.run_dirs)
    except FileNotFoundError as err:
        parser.error(str(err))
    if args.lm_eval:
        return cross_check(args.run_dirs, args.batch_size, args.device)
    print(compare_markdown(results, args.average), end="")
    print(f"\nchart: {compare_chart(results, args.png, args.average)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
