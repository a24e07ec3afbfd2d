"""tools/compare_evals.py: runs side by side in a Markdown table and a PNG chart."""
import json
import subprocess
import sys
from pathlib import Path

from hpcllm.eval.benchmarks import get_benchmark
from hpcllm.eval.report import summarize

ROOT = Path(__file__).resolve().parents[2]


def fake_run(path: Path, correct: int, model: str) -> Path:
    bench = get_benchmark("ceval")
    rows = [{"subject": "high_school_physics", "id": str(i), "answer": "A", "prediction": "A" if i < correct else "B",
             "shots": 5, "shots_requested": 5, "truncated": False} for i in range(4)]
    rows += [{"subject": "logic", "id": "0", "answer": "C", "prediction": "C", "shots": 5, "shots_requested": 5,
              "truncated": False}]
    path.mkdir(parents=True)
    result = dict(summarize(bench, rows), title="C-Eval", model=model, split="val", shots=5)
    (path / "results.json").write_text(json.dumps(result))
    return path


def test_compare_table_and_chart(tmp_path):
    a, b = fake_run(tmp_path / "run a", 1, "base"), fake_run(tmp_path / "run b", 3, "tuned")
    ppl = tmp_path / "ppl"
    ppl.mkdir()
    (ppl / "results.json").write_text(json.dumps({"benchmark": "perplexity", "title": "Perplexity", "model": "base",
                                                  "split": "eval", "perplexity": 12.5, "mean_nll": 2.526, "tokens": 900}))
    png = tmp_path / "chart.png"
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "compare_evals.py"), str(a), str(b), str(ppl),
                          "--png", str(png), "--average", "subjects"], capture_output=True, text=True, check=True)
    assert "## C-Eval val, accuracy (%) averaged over subjects" in out.stdout
    assert "| Run | Avg | Avg(Hard) | STEM | Social Science | Humanities | Other |" in out.stdout
    assert "| base 5-shot (run a) | 62.5 | 25.0 | 25.0 | - | 100.0 | - |" in out.stdout
    assert "| tuned 5-shot (run b) | 87.5 | 75.0 | 75.0 | - | 100.0 | - |" in out.stdout
    assert "| base (ppl) | 12.5 | 2.526 | 900 |" in out.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_results_is_a_usage_error(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "compare_evals.py"), str(tmp_path)],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "no results.json" in out.stderr


def test_task_runs_and_runs_that_dropped_shots(tmp_path):
    from hpcllm.eval.compare import compare_markdown, load_results
    from hpcllm.eval.report import write_task_reports

    runs = []
    for name, accuracy, shots in (("ocnli a", 0.5, [2, 2]), ("ocnli b", 0.75, [2, 1])):
        run = tmp_path / name
        run.mkdir()
        rows = [{"index": i, "shots": s, "shots_requested": 2, "truncated": 0} for i, s in enumerate(shots)]
        write_task_reports(run, {"benchmark": "ocnli", "title": "OCNLI", "model": "tiny", "split": "dev", "shots": 2},
                           {"accuracy": accuracy}, rows)
        runs.append(run)
    table = compare_markdown(load_results(runs))
    assert "## OCNLI dev, ×100" in table and "| Run | accuracy |" in table
    assert "| tiny 2-shot (ocnli a) | 50.0 |" in table
    assert "| tiny 2-shot (mean 1.5 shots, not comparable) (ocnli b) | 75.0 |" in table
