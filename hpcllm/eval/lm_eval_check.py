"""Cross-check a finished multiple-choice run with lm-evaluation-harness, question by question.

The run's own files (``results.json``: model, data, split, shots, template, max length;
``predictions.csv``) say what to repeat. Its data files are handed to lm-eval as they are (raw CSV
cells, no hpcllm parsing or stripping: lm-eval's template strips the question) through a task config
written from hpcllm's prompt template (header as ``description``, the answer cue in ``doc_to_text``,
the separator before the letter as ``target_delimiter``, the first dev rows as shots); lm-eval then
loads the exported model (``model_path``) with its ``hf`` backend in float32 and scores each letter's
continuation by its own loglikelihood code.

The two agree exactly (the same prediction, letter probabilities within float noise) when: the prompt
is plain (``eval.chat_format=false``), the letters are scored as lm-eval does (``space_letter`` where
" A".." D" are single tokens, else ``continuation``; not ``bare_letter``), and no prompt dropped shots
(no overflow, or ``eval.on_overflow=truncate_left``). ``expected_to_agree`` lists what breaks that.
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Dict, List, Optional

from hpcllm.eval.benchmarks import LETTERS, get_benchmark, read_rows, split_file
from hpcllm.eval.prompts import get_style

TASK_PREFIX = "hpcllm_check"


def lm_eval_missing() -> Optional[str]:
    """Why lm-eval cannot run here (None when it can)."""
    try:
        import lm_eval  # noqa: F401
        import lm_eval.evaluator  # noqa: F401
    except ImportError as err:
        return f"lm-eval is not installed ({err}); pip install 'hpcllm[lmeval]' (lm-eval[hf])"
    return None


def expected_to_agree(results: dict) -> List[str]:
    """The run's settings under which hpcllm's numbers differ from lm-eval's by design (empty: none)."""
    reasons = []
    if results.get("chat_format"):
        reasons.append(f"chat_format={results['chat_format']}: lm-eval scores the plain prompt")
    answer_text = get_style(get_benchmark(results["benchmark"]), results.get("template", "official")).answer_sep + "{letter}"
    if results.get("letter_text", answer_text) != answer_text:
        reasons.append(f"letter_scoring={results.get('letter_scoring')} scores {results['letter_text']!r} where "
                       f"lm-eval scores the template's {answer_text!r}")
    if not results.get("prompts", {}).get("comparable", True):
        reasons.append("prompts dropped shots (on_overflow=drop_shots); lm-eval cuts them from the left")
    return reasons


def _jsonl_docs(path: Path, has_header: bool) -> List[dict]:
    """A CSV file's rows as lm-eval documents with the cells verbatim (blank rows skipped, as hpcllm does)."""
    rows = read_rows(path)
    names = ([c.strip() for c in rows[0][1]] if has_header else ["question", *LETTERS, "answer"])
    docs = []
    for _, row in rows[1:] if has_header else rows:
        if any(cell.strip() for cell in row):
            doc = dict(zip(names, row))
            docs.append({k: doc.get(k, "") for k in ("question", *LETTERS, "answer")})
    return docs


def _write_jsonl(path: Path, docs: List[dict]) -> str:
    path.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    return str(path)


def task_config(results: dict, subject: str, data_files: Dict[str, str]) -> dict:
    """One subject's lm-eval task: hpcllm's template in lm-eval's terms."""
    bench = get_benchmark(results["benchmark"])
    style = get_style(bench, results.get("template", "official"))
    cue = style.cue.replace("{", "{{ '{' }}")
    return {
        "task": f"{TASK_PREFIX}_{bench.name}_{subject}",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": data_files},
        "test_split": "test",
        "fewshot_split": "dev" if "dev" in data_files else None,
        "fewshot_config": {"sampler": "first_n"},
        "output_type": "multiple_choice",
        "description": style.header.format(subject=bench.prompt_names[subject]),
        "doc_to_text": "{{question.strip()}}" + "".join(f"\n{l}. {{{{{l}}}}}" for l in LETTERS) + cue,
        "doc_to_choice": list(LETTERS),
        "doc_to_target": "{{ ['A', 'B', 'C', 'D'].index(answer.strip()) if answer.strip() in ['A', 'B', 'C', 'D'] else 0 }}",
        "target_delimiter": style.answer_sep,
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
    }


def write_tasks(results: dict, out_dir: Path) -> Dict[str, str]:
    """lm-eval task configs (JSON is YAML) and jsonl data for every subject of the run: {subject: task name}."""
    bench = get_benchmark(results["benchmark"])
    out_dir.mkdir(parents=True, exist_ok=True)
    tasks = {}
    for subject in results["subjects"]:
        files = {}
        for role, split in (("test", results["split"]), ("dev", "dev")):
            path = split_file(results["data_dir"], split, subject)
            if path is not None:
                files[role] = _write_jsonl(out_dir / f"{subject}_{role}.jsonl", _jsonl_docs(path, bench.has_header))
        config = task_config(results, subject, files)
        if "dev" not in files:
            config.pop("fewshot_split")
        (out_dir / f"{config['task']}.yaml").write_text(json.dumps(config, ensure_ascii=False, indent=1) + "\n",
                                                          encoding="utf-8")
        tasks[subject] = config["task"]
    return tasks


def run_lm_eval(results: dict, task_dir: Path, tasks: Dict[str, str], batch_size: int = 4,
                device: str = "cpu") -> Dict[str, List[List[float]]]:
    """lm-eval's loglikelihood of each letter for every question: {subject: [[A, B, C, D], ...]} in file order."""
    from lm_eval import evaluator
    from lm_eval.tasks import TaskManager

    if not results.get("model_path"):
        raise ValueError("the run evaluated no exported model (model.path was unset): lm-eval needs a model directory")
    manager = TaskManager(include_path=str(task_dir), include_defaults=False)
    model_args = {"pretrained": results["model_path"], "dtype": "float32", "max_length": results["max_length"]}
    out = evaluator.simple_evaluate(model="hf", model_args=model_args, tasks=list(tasks.values()),
                                    num_fewshot=results["shots"], batch_size=batch_size, device=device,
                                    task_manager=manager, log_samples=True, bootstrap_iters=0)
    scores = {}
    for subject, task in tasks.items():
        samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
        scores[subject] = [[float(r[0]) for r in s["filtered_resps"]] for s in samples]
    return scores


def _softmax(values: List[float]) -> List[float]:
    top = max(values)
    exps = [math.exp(v - top) for v in values]
    return [e / sum(exps) for e in exps]


def agreement(predictions: List[dict], lm_scores: Dict[str, List[List[float]]]) -> dict:
    """Per question: hpcllm's and lm-eval's predicted letter and the largest gap between their letter
    probabilities (hpcllm's come from predictions.csv, rounded to 1e-6)."""
    by_subject: Dict[str, List[dict]] = {}
    for row in predictions:
        by_subject.setdefault(row["subject"], []).append(row)
    questions = []
    for subject, rows in by_subject.items():
        theirs = lm_scores.get(subject, [])
        if len(theirs) != len(rows):
            raise ValueError(f"{subject}: hpcllm scored {len(rows)} questions, lm-eval {len(theirs)}")
        for row, logliks in zip(rows, theirs):
            probs = _softmax(logliks)
            ours = [float(row[f"prob_{l}"]) for l in LETTERS]
            questions.append({"subject": subject, "id": row["id"], "hpcllm": row["prediction"],
                              "lm_eval": LETTERS[max(range(len(LETTERS)), key=lambda i: (logliks[i], -i))],
                              "max_prob_diff": max(abs(a - b) for a, b in zip(ours, probs)),
                              **{f"lm_eval_loglik_{l}": v for l, v in zip(LETTERS, logliks)}})
    same = sum(q["hpcllm"] == q["lm_eval"] for q in questions)
    return {"questions": len(questions), "same_prediction": same,
            "agreement": same / len(questions) if questions else None,
            "max_prob_diff": max((q["max_prob_diff"] for q in questions), default=None), "per_question": questions}


def cross_check(run_dir: Path, out_dir: Optional[Path] = None, batch_size: int = 4, device: str = "cpu") -> dict:
    """Run lm-eval on what ``run_dir`` evaluated; writes lm_eval_check.json and .csv into ``out_dir``."""
    run_dir = Path(run_dir)
    results = json.loads((run_dir / "results.json").read_text(encoding="utf-8"))
    if results.get("benchmark") not in ("ceval", "mmlu"):
        raise ValueError(f"{run_dir}: the cross-check covers C-Eval and MMLU runs, not {results.get('benchmark')}")
    with open(run_dir / "predictions.csv", newline="", encoding="utf-8") as f:
        predictions = list(csv.DictReader(f))
    out_dir = Path(out_dir or run_dir / "lm_eval_check")
    tasks = write_tasks(results, out_dir / "tasks")
    report = agreement(predictions, run_lm_eval(results, out_dir / "tasks", tasks, batch_size, device))
    report["differs_by_design"] = expected_to_agree(results)
    (out_dir / "lm_eval_check.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n",
                                               encoding="utf-8")
    with open(out_dir / "lm_eval_check.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(report["per_question"][0]) if report["per_question"] else ["id"])
        writer.writeheader()
        writer.writerows(report["per_question"])
    return report


def check_markdown(report: dict) -> str:
    text = (f"lm-eval agreement: {report['same_prediction']} of {report['questions']} predictions the same "
            f"({100 * (report['agreement'] or 0):.1f}%), largest letter-probability gap {report['max_prob_diff']:.2e}\n")
    for reason in report["differs_by_design"]:
        text += f"- differs by design: {reason}\n"
    return text
