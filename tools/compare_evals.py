"""Put several method=eval runs side by side: a Markdown table on stdout and a PNG bar chart.

    python tools/compare_evals.py runs/eval/a runs/eval/b --png compare.png [--average subjects]
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hpcllm.eval.compare import compare_chart, compare_markdown, load_results  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories holding results.json")
    parser.add_argument("--png", default="compare_evals.png", help="where the bar chart goes (default: %(default)s)")
    parser.add_argument("--average", choices=("questions", "subjects"), default="questions",
                        help="accuracy averaged over questions (each counts once) or over subjects")
    args = parser.parse_args(argv)
    try:
        results = load_results(args.run_dirs)
    except FileNotFoundError as err:
        parser.error(str(err))
    print(compare_markdown(results, args.average), end="")
    print(f"\nchart: {compare_chart(results, args.png, args.average)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
