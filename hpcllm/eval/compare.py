"""Several runs' results side by side: one Markdown table and one bar chart per benchmark."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Sequence

from hpcllm.eval.report import leaderboard_columns, leaderboard_row, markdown_table

PPL_COLUMNS = ["Perplexity", "Mean NLL", "Tokens"]


def load_results(run_dirs: Sequence[str | Path]) -> List[dict]:
    out = []
    for run_dir in run_dirs:
        path = Path(run_dir) / "results.json"
        if not path.is_file():
            raise FileNotFoundError(f"{run_dir}: no results.json (is it a finished method=eval run?)")
        out.append(dict(json.loads(path.read_text(encoding="utf-8")), run_dir=str(run_dir)))
    return out


def label(result: dict) -> str:
    shots = f" {result['shots']}-shot" if "shots" in result else ""
    if not result.get("prompts", {}).get("comparable", True):
        shots += f" (mean {result['prompts']['mean_shots']:.1f} shots, not comparable)"
    return f"{result.get('model', '?')}{shots} ({Path(result['run_dir']).name})"


def groups(results: Sequence[dict]) -> List[List[dict]]:
    """Runs grouped by benchmark and split (one table each), in the order given."""
    out: Dict[tuple, List[dict]] = {}
    for r in results:
        out.setdefault((r["benchmark"], r.get("split")), []).append(r)
    return list(out.values())


def columns_and_values(bench: str, runs: Sequence[dict], average: str):
    """(column names, per run a list of numbers or None); accuracies in %."""
    if bench == "perplexity":
        return PPL_COLUMNS, [[r["perplexity"], r["mean_nll"], r["tokens"]] for r in runs]
    if "metrics" in runs[0]:  # a CLUE or generation task: its metrics, ×100
        names = list(runs[0]["metrics"])
        return names, [[None if r["metrics"].get(n) is None else 100 * r["metrics"][n] for n in names] for r in runs]
    columns = leaderboard_columns(bench, list(runs[0]["categories"]))
    return columns, [[None if v is None else 100 * v for v in leaderboard_row(r, average)] for r in runs]


def compare_markdown(results: Sequence[dict], average: str = "questions") -> str:
    text = []
    for runs in groups(results):
        bench = runs[0]["benchmark"]
        columns, values = columns_and_values(bench, runs, average)
        title = runs[0].get("title", bench)
        split = f" {runs[0]['split']}" if "split" in runs[0] else ""
        note = "" if bench == "perplexity" else ", ×100" if "metrics" in runs[0] else f", accuracy (%) averaged over {average}"
        fmt = (lambda v: "-" if v is None else f"{v:.1f}") if bench != "perplexity" else (lambda v: f"{v:.4g}")
        rows = [[label(r)] + [fmt(v) for v in vals] for r, vals in zip(runs, values)]
        text.append(f"## {title}{split}{note}\n\n" + markdown_table(["Run"] + columns, rows))
    return "\n".join(text)


def compare_chart(results: Sequence[dict], path: str | Path, average: str = "questions") -> Path:
    """A grouped bar chart per benchmark (runs side by side in each column), saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tables = groups(results)
    fig, axes = plt.subplots(len(tables), 1, figsize=(10, 4 * len(tables)), squeeze=False)
    for ax, runs in zip(axes[:, 0], tables):
        bench = runs[0]["benchmark"]
        columns, values = columns_and_values(bench, runs, average)
        if bench == "perplexity":
            columns, values = columns[:1], [v[:1] for v in values]
        width = 0.8 / len(runs)
        for i, (r, vals) in enumerate(zip(runs, values)):
            xs = [j + (i - (len(runs) - 1) / 2) * width for j in range(len(columns))]
            ax.bar(xs, [0 if v is None else v for v in vals], width, label=label(r))
        ax.set_xticks(range(len(columns)), columns)
        ax.set_ylabel("perplexity" if bench == "perplexity" else "×100" if "metrics" in runs[0] else f"accuracy % (over {average})")
        ax.set_title(" ".join(str(x) for x in (runs[0].get("title", bench), runs[0].get("split")) if x))
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


