"""Averaging per subject, category, Hard subset and overall; the files a run writes."""
import csv
import json

import pytest

from hpcllm.eval.benchmarks import get_benchmark
from hpcllm.eval.report import leaderboard_columns, leaderboard_row, summarize, write_reports

CEVAL = get_benchmark("ceval")


def rows_for(subject, correct, wrong, answered=True, shots=5, truncated=0):
    rows = []
    for i in range(correct + wrong):
        answer = ("A" if i < correct else "B") if answered else None
        rows.append({"subject": subject, "category": CEVAL.category(subject), "id": str(i), "answer": answer,
                     "prediction": "A", "shots": shots, "shots_requested": 5, "truncated": i < truncated,
                     "probs": [0.7, 0.1, 0.1, 0.1], "question": f"q{i}"})
    return rows


@pytest.fixture
def rows():
    # STEM: computer_network 3/4, high_school_physics (Hard) 1/2; Humanities: logic 1/1; Social Science: marxism 0/2
    return (rows_for("computer_network", 3, 1) + rows_for("high_school_physics", 1, 1, shots=2)
            + rows_for("logic", 1, 0, truncated=1) + rows_for("marxism", 0, 2))


def test_averages_over_questions_and_over_subjects(rows):
    s = summarize(CEVAL, rows)
    assert s["subjects"]["computer_network"]["accuracy"] == 0.75
    stem = s["categories"]["STEM"]
    assert stem["subjects"] == 2 and stem["questions"] == 6
    assert stem["accuracy_over_questions"] == pytest.approx(4 / 6)
    assert stem["accuracy_over_subjects"] == pytest.approx((0.75 + 0.5) / 2)
    assert s["categories"]["Other"] == {"subjects": 0, "questions": 0, "accuracy_over_questions": None,
                                        "accuracy_over_subjects": None}
    assert s["hard"]["accuracy_over_questions"] == 0.5 and s["hard"]["subjects"] == 1
    assert s["overall"]["accuracy_over_questions"] == pytest.approx(5 / 9)
    assert s["overall"]["accuracy_over_subjects"] == pytest.approx((0.75 + 0.5 + 1.0 + 0.0) / 4)
    assert s["prompts"] == {"questions": 9, "fewer_shots": 2, "truncated": 1, "mean_shots": pytest.approx(39 / 9),
                            "min_shots": 2, "comparable": False}


def test_leaderboard_row_order(rows):
    s = summarize(CEVAL, rows)
    assert leaderboard_columns("ceval", list(s["categories"])) == [
        "Avg", "Avg(Hard)", "STEM", "Social Science", "Humanities", "Other"]
    assert leaderboard_row(s, "subjects") == pytest.approx([0.5625, 0.5, 0.625, 0.0, 1.0, None])
    assert leaderboard_columns("mmlu", ["STEM"]) == ["Avg", "STEM"]


def test_reports_with_answers(tmp_path, rows):
    s = summarize(CEVAL, rows)
    write_reports(tmp_path, s, rows, {"title": "C-Eval", "model": "tiny", "split": "val", "shots": 5, "max_length": 512})
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["overall"]["accuracy_over_questions"] == pytest.approx(5 / 9) and results["model"] == "tiny"
    md = (tmp_path / "results.md").read_text()
    assert "| Model | Avg | Avg(Hard) | STEM | Social Science | Humanities | Other |" in md
    assert "| tiny (over questions) | 55.6 | 50.0 | 66.7 | 0.0 | 100.0 | - |" in md
    assert "| tiny (over subjects) | 56.2 | 50.0 | 62.5 | 0.0 | 100.0 | - |" in md
    assert "2 of 9 prompts dropped shots" in md and "1 were cut from the left" in md
    assert md.startswith("# C-Eval val, 5-shot (mean 4.33 shots used: 2 of 9 prompts dropped shots to fit 512 tokens; "
                         "NOT COMPARABLE with 5-shot results): tiny\n")
    with open(tmp_path / "predictions.csv", newline="") as f:
        preds = list(csv.DictReader(f))
    assert len(preds) == 9 and preds[3]["correct"] == "0" and preds[0]["prob_A"] == "0.700000"
    assert not (tmp_path / "submission.json").exists()


def test_test_split_without_answers_writes_a_submission(tmp_path):
    rows = rows_for("computer_network", 2, 0, answered=False) + rows_for("logic", 1, 0, answered=False)
    s = summarize(CEVAL, rows)
    assert not s["has_answers"] and s["overall"]["accuracy_over_questions"] is None
    write_reports(tmp_path, s, rows, {"title": "C-Eval", "model": "tiny", "split": "test", "shots": 5})
    assert json.loads((tmp_path / "submission.json").read_text()) == {
        "computer_network": {"0": "A", "1": "A"}, "logic": {"0": "A"}}
    assert "submission.json" in (tmp_path / "results.md").read_text()


def test_headline_of_a_comparable_run_and_the_letter_scoring_note(tmp_path):
    rows = rows_for("computer_network", 2, 1)
    meta = {"title": "C-Eval", "model": "tiny", "split": "val", "shots": 5, "max_length": 512,
            "letter_scoring": "continuation", "letter_scoring_requested": "auto", "template": "official",
            "on_overflow": "drop_shots", "letter_tokens": {"A": ["Ġ", "A"]}, "letter_fallback": "the letters are two"}
    write_reports(tmp_path, summarize(CEVAL, rows), rows, meta)
    md = (tmp_path / "results.md").read_text()
    assert md.startswith("# C-Eval val, 5-shot: tiny\n\nLetters scored: `continuation` (eval.letter_scoring=auto; "
                         "tokens A=['Ġ', 'A']), prompt template `official`, overflow `drop_shots`.\n\n"
                         "**Fallback:** the letters are two.\n")
    assert "Shots used: mean 5.00 of 5 asked for; 0 of 3 prompts dropped shots" in md
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["prompts"]["comparable"] and results["letter_fallback"] == "the letters are two"
