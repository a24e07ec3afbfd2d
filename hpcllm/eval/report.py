"""Accuracy per subject, per category and overall; results.json, results.md, predictions.csv, submission.json.

Two averages are reported everywhere and labelled: over questions (each question counts once, as
hendrycks/test computes category and overall accuracy) and over subjects (each subject counts once).
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

from hpcllm.eval.benchmarks import LETTERS, Benchmark

AVERAGES = ("questions", "subjects")
PREDICTION_FIELDS = ("subject", "category", "id", "answer", "prediction", "correct", "shots", "truncated",
                     "prompt_tokens", *(f"prob_{letter}" for letter in LETTERS), "question")


def _mean(values: Sequence[float]) -> Optional[float]:
    return sum(values) / len(values) if values else None


def subject_scores(bench: Benchmark, rows: Iterable[dict]) -> Dict[str, dict]:
    out: Dict[str, dict] = {}
    for row in rows:
        s = out.setdefault(row["subject"], {"category": bench.category(row["subject"]), "questions": 0,
                                            "answered": 0, "correct": 0})
        s["questions"] += 1
        if row["answer"] is not None:
            s["answered"] += 1
            s["correct"] += int(row["prediction"] == row["answer"])
    for s in out.values():
        s["accuracy"] = s["correct"] / s["answered"] if s["answered"] else None
    return dict(sorted(out.items()))


def group_score(subjects: Dict[str, dict], names: Iterable[str]) -> dict:
    """Both averages over the given subjects (those with answers); None where none has answers."""
    chosen = [subjects[n] for n in names if n in subjects]
    scored = [s for s in chosen if s["accuracy"] is not None]
    answered = sum(s["answered"] for s in scored)
    return {
        "subjects": len(chosen), "questions": sum(s["questions"] for s in chosen),
        "accuracy_over_questions": sum(s["correct"] for s in scored) / answered if answered else None,
        "accuracy_over_subjects": _mean([s["accuracy"] for s in scored]),
    }


def summarize(bench: Benchmark, rows: List[dict]) -> dict:
    """results.json's scores: per subject, per category (and C-Eval's Hard subset), overall."""
    subjects = subject_scores(bench, rows)
    categories = {c: group_score(subjects, [s for s in subjects if subjects[s]["category"] == c])
                  for c in bench.categories}
    out = {"benchmark": bench.name, "subjects": subjects, "categories": categories}
    if bench.hard:
        out["hard"] = group_score(subjects, bench.hard)
    out["overall"] = group_score(subjects, subjects)
    out["prompts"] = prompt_summary(rows)
    out["has_answers"] = any(s["answered"] for s in subjects.values())
    return out


def prompt_summary(rows: List[dict]) -> dict:
    """How many shots the prompts really held: a result whose prompts dropped shots is not the k-shot
    result it is named after, and is marked not comparable."""
    fewer = sum(r["shots"] < r["shots_requested"] for r in rows)
    return {"questions": len(rows), "fewer_shots": fewer, "truncated": sum(bool(r["truncated"]) for r in rows),
            "mean_shots": _mean([r["shots"] for r in rows]), "min_shots": min((r["shots"] for r in rows), default=None),
            "comparable": fewer == 0}


def headline(summary: dict, meta: dict) -> str:
    """results.md's title: benchmark, split, shots asked for and, where prompts dropped some, the mean used."""
    p, shots = summary["prompts"], meta.get("shots", "?")
    text = f"# {meta.get('title', summary['benchmark'])} {meta.get('split', '')}, {shots}-shot"
    if not p["comparable"]:
        text += (f" (mean {p['mean_shots']:.2f} shots used: {p['fewer_shots']} of {p['questions']} prompts dropped "
                 f"shots to fit {meta.get('max_length', '?')} tokens; NOT COMPARABLE with {shots}-shot results)")
    return text + f": {meta.get('model', 'model')}\n\n"


def scoring_note(meta: dict) -> str:
    mode = meta.get("letter_scoring")
    if mode is None:
        return ""
    tokens = ", ".join(f"{l}={t}" for l, t in meta.get("letter_tokens", {}).items())
    text = f"Letters scored: `{mode}` (eval.letter_scoring={meta.get('letter_scoring_requested', mode)}; tokens {tokens})"
    text += f", prompt template `{meta.get('template', 'official')}`, overflow `{meta.get('on_overflow', '?')}`.\n"
    if meta.get("letter_fallback"):
        text += f"\n**Fallback:** {meta['letter_fallback']}.\n"
    return text + "\n"


def leaderboard_columns(bench_name: str, categories: Sequence[str]) -> List[str]:
    return ["Avg"] + (["Avg(Hard)"] if bench_name == "ceval" else []) + list(categories)


def leaderboard_row(summary: dict, average: str = "questions") -> List[Optional[float]]:
    """Accuracies (0..1) in ``leaderboard_columns`` order."""
    key = f"accuracy_over_{average}"
    groups = [summary["overall"]] + ([summary["hard"]] if "hard" in summary else []) + list(summary["categories"].values())
    return [g[key] for g in groups]


def pct(value: Optional[float]) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]], text_columns: int = 1) -> str:
    """A Markdown table; columns after the first ``text_columns`` are numbers, aligned right."""
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---" if i < text_columns else "---:" for i in range(len(header))) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows]) + "\n"


def results_markdown(summary: dict, meta: dict) -> str:
    bench, model = summary["benchmark"], meta.get("model", "model")
    columns = leaderboard_columns(bench, list(summary["categories"]))
    title = headline(summary, meta) + scoring_note(meta)
    if not summary["has_answers"]:
        return (title + f"The {meta.get('split')} split publishes no answers: predictions for the leaderboard are in "
                "submission.json, every question's in predictions.csv.\n")
    rows = [[f"{model} (over {a})"] + [pct(v) for v in leaderboard_row(summary, a)] for a in AVERAGES]
    text = title + "Accuracy (%). *over questions*: each question counts once; *over subjects*: each subject does.\n\n"
    text += markdown_table(["Model"] + columns, rows) + "\n"
    subject_rows = [[name, s["category"], str(s["questions"]), pct(s["accuracy"])]
                    for name, s in summary["subjects"].items()]
    text += markdown_table(["Subject", "Category", "Questions", "Accuracy"], subject_rows, text_columns=2)
    p = summary["prompts"]
    mean = "-" if p["mean_shots"] is None else f"{p['mean_shots']:.2f}"
    text += (f"\nShots used: mean {mean} of {meta.get('shots', '?')} asked for; {p['fewer_shots']} of {p['questions']} "
             f"prompts dropped shots to fit the model's context ({meta.get('max_length', '?')} tokens); "
             f"{p['truncated']} were cut from the left.\n")
    return text


def write_predictions(path: Path, rows: List[dict]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=PREDICTION_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow(dict(row, correct="" if row["answer"] is None else int(row["prediction"] == row["answer"]),
                                 answer=row["answer"] or "", truncated=int(row["truncated"]),
                                 **{f"prob_{l}": f"{p:.6f}" for l, p in zip(LETTERS, row["probs"])}))


def submission(rows: List[dict]) -> Dict[str, Dict[str, str]]:
    """The C-Eval leaderboard's upload format: {subject: {id: letter}}."""
    out: Dict[str, Dict[str, str]] = {}
    for row in rows:
        out.setdefault(row["subject"], {})[row["id"]] = row["prediction"]
    return out


def write_reports(out_dir: Path, summary: dict, rows: List[dict], meta: dict) -> List[Path]:
    """Write every output file into ``out_dir``; returns their paths."""
    out_dir = Path(out_dir)
    written = [out_dir / "results.json", out_dir / "results.md", out_dir / "predictions.csv"]
    written[0].write_text(json.dumps(dict(meta, **summary), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    written[1].write_text(results_markdown(summary, meta), encoding="utf-8")
    write_predictions(written[2], rows)
    if any(r["answer"] is None for r in rows):
        written.append(out_dir / "submission.json")
        written[-1].write_text(json.dumps(submission(rows), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return written


TASK_METRIC_NAMES = {"accuracy": "Accuracy", "f1": "F1", "em": "EM"}


def task_markdown(meta: dict, metrics: dict, rows: List[dict]) -> str:
    """results.md of a CLUE or generation task: headline (with the shots used), the metrics ×100, how it scored."""
    fewer = sum(r.get("shots", 0) < r.get("shots_requested", 0) for r in rows)
    shots = meta.get("shots", 0)
    title = f"# {meta['title']}{' ' + meta['split'] if meta.get('split') else ''}, {shots}-shot"
    if fewer:
        mean = _mean([r["shots"] for r in rows]) or 0.0
        title += (f" (mean {mean:.2f} shots used: {fewer} of {len(rows)} prompts dropped shots to fit "
                  f"{meta.get('max_length', '?')} tokens; NOT COMPARABLE with {shots}-shot results)")
    text = title + f": {meta.get('model', 'model')}\n\n"
    names = [TASK_METRIC_NAMES.get(k, k) for k in metrics]
    text += markdown_table(["Model", "Examples", *names],
                           [[str(meta.get("model")), str(len(rows)), *(pct(v) for v in metrics.values())]]) + "\n"
    text += f"Scoring: {meta.get('scoring', '?')}; data {meta.get('data_dir')}.\n"
    if meta.get("skipped_unlabeled"):
        text += (f"\n{meta['skipped_unlabeled']} examples without a gold label (\"-\") were skipped, as CLUE does; "
                 "they are not among the examples above.\n")
    truncated = sum(bool(r.get("truncated")) for r in rows)
    if truncated:
        text += f"\n{truncated} of {len(rows)} prompts were cut from the left to fit the model's context.\n"
    return text


def write_task_reports(out_dir: Path, meta: dict, metrics: dict, rows: List[dict]) -> List[Path]:
    """results.json (meta, metrics as fractions, shots used), results.md and predictions.csv of a task."""
    out_dir = Path(out_dir)
    fewer = sum(r.get("shots", 0) < r.get("shots_requested", 0) for r in rows)
    summary = dict(meta, metrics=metrics, examples=len(rows),
                   prompts={"questions": len(rows), "fewer_shots": fewer,
                            "mean_shots": _mean([r.get("shots", 0) for r in rows]),
                            "truncated": sum(bool(r.get("truncated")) for r in rows), "comparable": fewer == 0})
    written = [out_dir / "results.json", out_dir / "results.md", out_dir / "predictions.csv"]
    written[0].write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    written[1].write_text(task_markdown(meta, metrics, rows), encoding="utf-8")
    fields = [k for k in (rows[0] if rows else {}) if k not in ("index", "shots_requested")]
    with open(written[2], "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields or ["id"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return written
