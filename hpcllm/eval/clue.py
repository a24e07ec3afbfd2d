"""CLUE classification tasks scored by perplexity over label words, zero- or few-shot.

Files in their published CLUE layouts (one JSON object a line), ``data_dir/{train,dev,test}.json``:

* AFQMC ``{"sentence1", "sentence2", "label": "0"|"1"}``;
* CMNLI, OCNLI ``{"sentence1", "sentence2", "label": "entailment"|"neutral"|"contradiction"|"-"}``
  (OCNLI's train file may be ``train.50k.json``; "-" marks an example without a majority label: skipped,
  and counted in the report, as CLUE does);
* TNEWS ``{"label": "102", "label_desc": "news_entertainment", "sentence", "keywords"}``;
* IFLYTEK ``{"label": "11", "label_des": "薅羊毛", "sentence"}`` (the label names: ``labels.json`` beside
  the data, else those the files use);
* CSL ``{"id", "abst", "keyword": [...], "label": "0"|"1"}``.

Every label has a word (or a few); the prompt ends with a cue the word follows, and the predicted label
is the one whose word has the lowest perplexity after the prompt (mean negative log-likelihood per token
of the word, so labels of different lengths compare). Few-shot prompts put the first ``shots`` train
examples, each answered with its label word, before the question.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

TNEWS_WORDS = {
    "news_story": "故事", "news_culture": "文化", "news_entertainment": "娱乐", "news_sports": "体育",
    "news_finance": "财经", "news_house": "房产", "news_car": "汽车", "news_edu": "教育", "news_tech": "科技",
    "news_military": "军事", "news_travel": "旅游", "news_world": "国际", "news_stock": "股票",
    "news_agriculture": "农业", "news_game": "电竞",
}
NLI_WORDS = {"entailment": "对", "neutral": "也许", "contradiction": "错"}


@dataclass(frozen=True)
class Example:
    line: int
    text: str  # the prompt of this example up to the cue
    label: Optional[str]  # the label's key; None where the file gives none (a test split)


@dataclass(frozen=True)
class ClueTask:
    name: str
    title: str
    render: Callable[[dict], str]  # the example's text up to the cue
    label_key: str = "label"
    fixed_words: Optional[Dict[str, str]] = None  # label -> word; None = read from the data (IFLYTEK)
    unlabeled: Tuple[str, ...] = ()  # label values meaning "no gold label"


def _keywords(obj) -> str:
    words = obj.get("keyword", [])
    return "，".join(words) if isinstance(words, list) else str(words)


CLUE_TASKS = {
    "afqmc": ClueTask("afqmc", "AFQMC", lambda o: f"语句一：{o['sentence1']}\n语句二：{o['sentence2']}\n两句话的意思相同吗？答：",
                      fixed_words={"0": "不同", "1": "相同"}),
    "cmnli": ClueTask("cmnli", "CMNLI", lambda o: f"{o['sentence1']}\n问：{o['sentence2']}？\n答：",
                      fixed_words=NLI_WORDS, unlabeled=("-",)),
    "ocnli": ClueTask("ocnli", "OCNLI", lambda o: f"{o['sentence1']}\n问：{o['sentence2']}？\n答：",
                      fixed_words=NLI_WORDS, unlabeled=("-",)),
    "tnews": ClueTask("tnews", "TNEWS", lambda o: f"新闻：{o['sentence']}\n类别：", label_key="label_desc",
                      fixed_words=TNEWS_WORDS),
    "iflytek": ClueTask("iflytek", "IFLYTEK", lambda o: f"应用描述：{o['sentence']}\n类别：", label_key="label_des"),
    "csl": ClueTask("csl", "CSL", lambda o: f"摘要：{o['abst']}\n关键词：{_keywords(o)}\n这些都是这篇摘要的关键词吗？答：",
                    fixed_words={"0": "不是", "1": "是"}),
}
CUE = "答："  # the cue of most tasks: the label word's tokens are split off after it (as lm-eval does)


def cue_of(task: ClueTask) -> str:
    return "类别：" if task.name in ("tnews", "iflytek") else CUE


def split_path(data_dir: str | os.PathLike, split: str, task: str) -> Path:
    names = [f"{split}.json", f"{split}.jsonl"] + (["train.50k.json"] if split == "train" else [])
    for name in names:
        if (Path(data_dir) / name).is_file():
            return Path(data_dir) / name
    raise FileNotFoundError(f"eval.data_dir={data_dir}: no {split}.json for {task} (CLUE's layout: "
                            f"{{train,dev,test}}.json, one JSON object a line)")


def read_objects(path: Path) -> List[Tuple[int, dict]]:
    """(line, object) of a JSON-lines file; a line that is not a JSON object is refused with its number."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from err
    out = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{n}: not a JSON object ({err.msg}); CLUE files hold one a line") from err
        if not isinstance(obj, dict):
            raise ValueError(f"{path}:{n}: not a JSON object; CLUE files hold one a line")
        out.append((n, obj))
    return out


def read_examples(task: ClueTask, path: Path) -> Tuple[List[Example], int]:
    """The file's examples and how many were skipped for having no gold label ("-")."""
    out, skipped = [], 0
    for n, obj in read_objects(path):
        label = obj.get(task.label_key)
        label = None if label is None or str(label).strip() == "" else str(label)
        if label in task.unlabeled:
            skipped += 1
            continue
        try:
            text = task.render(obj)
        except KeyError as err:
            raise ValueError(f"{path}:{n}: no field {err} ({task.title}'s published format)") from err
        out.append(Example(n, text, label))
    return out, skipped


def label_words(task: ClueTask, data_dir: str | os.PathLike, seen: Sequence[Example]) -> Dict[str, str]:
    """label -> word: the fixed words, IFLYTEK's names from labels.json (else those the examples use)."""
    if task.fixed_words is not None:
        return dict(task.fixed_words)
    labels = Path(data_dir) / "labels.json"
    if labels.is_file():
        return {str(o[task.label_key]): str(o[task.label_key]) for _, o in read_objects(labels)}
    return {e.label: e.label for e in seen if e.label is not None}


@dataclass
class ClueData:
    task: ClueTask
    words: Dict[str, str]
    shots: List[Example]
    examples: List[Example]
    skipped: int
    path: Path


def load_clue(name: str, data_dir: str | os.PathLike, split: str, shots: int) -> ClueData:
    task = CLUE_TASKS[name]
    path = split_path(data_dir, split, name)
    examples, skipped = read_examples(task, path)
    train = read_examples(task, split_path(data_dir, "train", name))[0][:shots] if shots else []
    words = label_words(task, data_dir, examples + train)
    if not words:
        raise ValueError(f"{path}: no label names to score ({task.title}'s labels.json is not in {data_dir} and the "
                         "file has no labels)")
    for e in examples + train:
        if e.label is not None and e.label not in words:
            raise ValueError(f"{path}:{e.line}: label {e.label!r} is not one of {task.title}'s: "
                             f"{', '.join(sorted(words))}")
    if len(train) < shots:
        raise ValueError(f"eval.shots={shots}: {task.title}'s train file has {len(train)} labeled examples")
    return ClueData(task, words, train, examples, skipped, path)


def clue_prompt(data: ClueData, example: Example, shots: Optional[int] = None) -> str:
    """The first ``shots`` train examples (all loaded by default), each followed by its label word, then the
    example up to the cue."""
    chosen = data.shots if shots is None else data.shots[:shots]
    return "".join(f"{s.text}{data.words[s.label]}\n\n" for s in chosen) + example.text


def choose_by_perplexity(summed: Sequence[float], lengths: Sequence[int]) -> Tuple[int, List[float]]:
    """The label whose word has the lowest perplexity (highest mean log-probability per token); the first on a
    tie. Returns (index, per label the mean negative log-likelihood)."""
    nll = [-s / n for s, n in zip(summed, lengths)]
    return min(range(len(nll)), key=lambda i: (nll[i], i)), nll
