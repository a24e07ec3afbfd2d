"""Multiple-choice benchmarks read from local files in their published layouts.

* C-Eval: ``data_dir/{dev,val,test}/{subject}_{split}.csv`` with the header
  ``id,question,A,B,C,D,answer,explanation`` (the test split has no answer or explanation);
* MMLU: ``data_dir/{dev,val,test}/{subject}_{split}.csv`` without a header:
  question, the four choices, the answer letter.

Files lying directly in ``data_dir`` (``data_dir/{subject}_{split}.csv``) are read as well.
"""
from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from hpcllm.eval.subjects import (CEVAL_CATEGORIES, CEVAL_HARD, CEVAL_SUBJECTS, MMLU_CATEGORIES,
                                  MMLU_SUBCATEGORIES, MMLU_SUBCATEGORY_CATEGORY)

LETTERS = ("A", "B", "C", "D")
SPLITS = ("dev", "val", "test")
PROJECT_ROOT = Path(__file__).resolve().parents[2]
SAMPLE_DIR = PROJECT_ROOT / "data" / "eval_samples"


@dataclass(frozen=True)
class Question:
    subject: str
    id: str
    question: str
    choices: Tuple[str, str, str, str]
    answer: Optional[str]  # "A".."D"; None where the split publishes no answers (C-Eval test)


@dataclass(frozen=True)
class Benchmark:
    name: str
    title: str
    categories: Tuple[str, ...]
    subject_category: Dict[str, str]
    prompt_names: Dict[str, str]  # subject -> the name its prompt header uses
    hard: Tuple[str, ...] = ()
    has_header: bool = True
    default_split: str = "val"  # the split published numbers are on (C-Eval's test answers are hidden)

    def category(self, subject: str) -> str:
        return self.subject_category[subject]

    def check_subjects(self, subjects: Sequence[str], key: str = "eval.subjects") -> None:
        unknown = [s for s in subjects if s not in self.subject_category]
        if unknown:
            raise ValueError(f"{key}: {', '.join(unknown)} not {self.title} subjects; valid: "
                             f"{', '.join(sorted(self.subject_category))}")


BENCHMARKS = {
    "ceval": Benchmark(
        "ceval", "C-Eval", CEVAL_CATEGORIES, {s: v[2] for s, v in CEVAL_SUBJECTS.items()},
        {s: v[1] for s, v in CEVAL_SUBJECTS.items()}, hard=CEVAL_HARD, has_header=True),
    "mmlu": Benchmark(
        "mmlu", "MMLU", MMLU_CATEGORIES, {s: MMLU_SUBCATEGORY_CATEGORY[c] for s, c in MMLU_SUBCATEGORIES.items()},
        {s: s.replace("_", " ") for s in MMLU_SUBCATEGORIES}, has_header=False, default_split="test"),
}


def get_benchmark(name: str) -> Benchmark:
    if name not in BENCHMARKS:
        raise ValueError(f"eval.benchmark={name!r} is not a multiple-choice benchmark; valid: {', '.join(BENCHMARKS)}")
    return BENCHMARKS[name]


def default_data_dir(benchmark: str) -> Path:
    """The small sample in the real file layout that ships with the project."""
    return SAMPLE_DIR / benchmark


def split_file(data_dir: str | os.PathLike, split: str, subject: str) -> Optional[Path]:
    name = f"{subject}_{split}.csv"
    for path in (Path(data_dir) / split / name, Path(data_dir) / name):
        if path.is_file():
            return path
    return None


def list_subjects(data_dir: str | os.PathLike, split: str) -> List[str]:
    """Subjects that have a file of ``split`` (sorted)."""
    suffix = f"_{split}.csv"
    found = set()
    for folder in (Path(data_dir) / split, Path(data_dir)):
        if folder.is_dir():
            found.update(p.name[:-len(suffix)] for p in folder.iterdir() if p.name.endswith(suffix))
    return sorted(found)


def read_rows(path: Path) -> List[Tuple[int, List[str]]]:
    """The CSV's rows with the line each starts on (a quoted cell may span lines); a file that is not
    UTF-8 text names itself."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start}); is it a CSV file?") from err
    if "\x00" in text:
        raise ValueError(f"{path}: not a readable CSV file (a NUL byte on line {text[:text.index(chr(0))].count(chr(10)) + 1}"
                         "; binary data?)")
    reader, out, line = csv.reader(io.StringIO(text, newline="")), [], 1
    try:
        for row in reader:
            out.append((line, row))
            line = reader.line_num + 1
    except csv.Error as err:
        raise ValueError(f"{path}:{line}: not a readable CSV file ({err})") from err
    return out


def read_questions(bench: Benchmark, path: Path, subject: str, need_answers: bool = False) -> List[Question]:
    """The file's questions. Only the question is stripped of surrounding whitespace, as lm-evaluation-harness
    does (``question.strip()``); choices are kept verbatim. Answers are all or nothing in a file: a file
    without any (C-Eval's test split) is scored for submission, while one empty answer cell among answered
    questions is refused with its row, as is any empty answer where ``need_answers`` (the dev shots)."""
    rows = read_rows(path)
    if bench.has_header:
        if not rows:
            raise ValueError(f"{path}: empty file (expected the header id,question,A,B,C,D,answer,explanation)")
        header, rows = [c.strip() for c in rows[0][1]], rows[1:]
        missing = [c for c in ("id", "question", *LETTERS) if c not in header]
        if missing:
            raise ValueError(f"{path}: header lacks {', '.join(missing)} (expected id,question,A,B,C,D,answer,explanation)")
        col = {name: header.index(name) for name in header}
    else:
        col = {"question": 0, "A": 1, "B": 2, "C": 3, "D": 4, "answer": 5}
    out, unanswered = [], []
    for line, row in rows:
        if not any(cell.strip() for cell in row):
            continue
        if len(row) < 5:
            raise ValueError(f"{path}:{line}: a question needs a question and four choices, got {len(row)} fields")
        answer = row[col["answer"]].strip() if "answer" in col and col["answer"] < len(row) else ""
        if answer and answer not in LETTERS:
            raise ValueError(f"{path}:{line}: answer {answer!r} is not one of A, B, C, D")
        if not answer:
            unanswered.append(line)
        qid = row[col["id"]].strip() if "id" in col else str(len(out))
        out.append(Question(subject, qid, row[col["question"]].strip(), tuple(row[col[c]] for c in LETTERS),
                            answer or None))
    if unanswered and (need_answers or len(unanswered) < len(out)):
        why = "few-shot examples need their answers" if need_answers else \
            f"{len(out) - len(unanswered)} other questions of the file have answers"
        raise ValueError(f"{path}:{unanswered[0]}: empty answer cell ({len(unanswered)} in the file; {why}): "
                         "fill in the letter or remove the row")
    return out


@dataclass
class SubjectData:
    subject: str
    dev: List[Question]  # the shots
    questions: List[Question]  # the questions asked


def load_benchmark(bench: Benchmark, data_dir: str | os.PathLike, split: str,
                   subjects: Optional[Sequence[str]] = None) -> List[SubjectData]:
    """Every subject's dev shots and ``split`` questions, in subject order."""
    if split not in SPLITS or split == "dev":
        raise ValueError(f"eval.split={split!r}: evaluate on val or test (dev holds the few-shot examples)")
    available = list_subjects(data_dir, split)
    if subjects:
        bench.check_subjects(subjects)
        absent = [s for s in subjects if s not in available]
        if absent:
            raise ValueError(f"eval.subjects: no {split} file for {', '.join(absent)} under {data_dir}")
    else:
        if not available:
            others = [s for s in SPLITS if s not in (split, "dev") and list_subjects(data_dir, s)]
            hint = f"; it has {others[0]}/ files: set eval.split={others[0]}" if others else ""
            raise ValueError(f"eval.data_dir={data_dir}: no {bench.title} files {split}/<subject>_{split}.csv "
                             f"(eval.split={split}){hint}")
        bench.check_subjects(available, key=f"files in {data_dir}")
    out = []
    for subject in subjects or available:
        dev_path = split_file(data_dir, "dev", subject)
        dev = read_questions(bench, dev_path, subject, need_answers=True) if dev_path else []
        out.append(SubjectData(subject, dev, read_questions(bench, split_file(data_dir, split, subject), subject)))
    return out
