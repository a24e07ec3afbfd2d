"""Evaluation by generation: CMRC2018 reading comprehension and SFT test sets, scored by F1 and EM.

CMRC2018 files are in their published SQuAD-like layout (``cmrc2018_dev.json`` or ``dev.json``:
``{"data": [{"paragraphs": [{"context", "qas": [{"id", "question", "answers": [{"text"}]}]}]}]}``) and are
scored as the official ``cmrc2018_evaluate.py`` does: text lower-cased and segmented into Chinese
characters and English words (``mixed_segmentation``), punctuation removed; F1 from the longest common
substring of answer and prediction segments, EM on the punctuation-free strings, each the best over the
question's reference answers, averaged ×100.

SFT test sets are the training jsonl records ending with an answer (instruction/output, prompt/response,
conversations); the prompt is the record without its last answer in the model's chat format, and the task
F1 is the bag-of-segments overlap F1 (SQuAD's, over the same mixed segmentation, so it serves Chinese and
English text) with EM as above.
"""
from __future__ import annotations

import json
import os
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch

# cmrc2018_evaluate.py's punctuation (sp_char)
PUNCTUATION = set(["-", ":", "_", "*", "^", "/", "\\", "~", "`", "+", "=", "，", "。", "：", "？", "！", "“", "”", "；",
                   "’", "《", "》", "……", "·", "、", "「", "」", "（", "）", "－", "～", "『", "』"])
_CJK = re.compile(r"[\u4e00-\u9fa5]")
# nltk.word_tokenize's split of the non-Chinese runs, for the cases answers have: words, numbers with their
# decimal point or thousands comma, and every other symbol alone (nltk's punkt data is not needed)
_WORD = re.compile(r"\d+(?:[.,]\d+)+|\w+(?:'\w+)?|[^\w\s]")


def mixed_segmentation(text: str, rm_punc: bool = False) -> List[str]:
    """cmrc2018_evaluate.py's segmentation: each Chinese character (and punctuation mark) alone, the runs
    between them split into English words."""
    out, run = [], ""
    for char in str(text).lower().strip():
        if rm_punc and char in PUNCTUATION:
            continue
        if _CJK.search(char) or char in PUNCTUATION:
            out.extend(_WORD.findall(run))
            run = ""
            out.append(char)
        else:
            run += char
    return out + _WORD.findall(run)


def remove_punctuation(text: str) -> str:
    return "".join(c for c in str(text).lower().strip() if c not in PUNCTUATION)


def longest_common_substring(a: Sequence[str], b: Sequence[str]) -> int:
    best, prev = 0, [0] * (len(b) + 1)
    for x in a:
        cur = [0] * (len(b) + 1)
        for j, y in enumerate(b):
            if x == y:
                cur[j + 1] = prev[j] + 1
                best = max(best, cur[j + 1])
        prev = cur
    return best


def cmrc_f1(answers: Sequence[str], prediction: str) -> float:
    """The official CMRC2018 F1 (0..1): the best over the answers of the LCS-based F1 of the segments."""
    scores = []
    pred = mixed_segmentation(prediction, rm_punc=True)
    for answer in answers:
        ref = mixed_segmentation(answer, rm_punc=True)
        common = longest_common_substring(ref, pred)
        if common == 0:
            scores.append(0.0)
            continue
        precision, recall = common / len(pred), common / len(ref)
        scores.append(2 * precision * recall / (precision + recall))
    return max(scores, default=0.0)


def exact_match(answers: Sequence[str], prediction: str) -> float:
    """1.0 when the prediction equals an answer once both are lower-cased and stripped of punctuation."""
    return float(any(remove_punctuation(a) == remove_punctuation(prediction) for a in answers))


def content_segments(text: str) -> List[str]:
    """The mixed segmentation without any punctuation or symbol (all of Unicode's, as SQuAD drops ASCII's)."""
    return [s for s in mixed_segmentation(text, rm_punc=True)
            if not all(unicodedata.category(c)[0] in "PS" for c in s)]


def overlap_f1(answers: Sequence[str], prediction: str) -> float:
    """SQuAD's bag-of-tokens F1 over the mixed segmentation (punctuation removed), best over the answers."""
    pred = Counter(content_segments(prediction))
    best = 0.0
    for answer in answers:
        ref = Counter(content_segments(answer))
        common = sum((pred & ref).values())
        if common:
            precision, recall = common / sum(pred.values()), common / sum(ref.values())
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


@dataclass(frozen=True)
class GenItem:
    id: str
    prompt: object  # str (CMRC2018: plain text) or hpcllm.data.prompts.Chat (SFT records)
    answers: Tuple[str, ...]
    source: str  # file:line or the question id, for the predictions file


CMRC_PROMPT = "阅读文章：{context}\n问：{question}\n答："


def cmrc_file(data_dir: str | os.PathLike, split: str) -> Path:
    path = Path(data_dir)
    if path.is_file():
        return path
    for name in (f"cmrc2018_{split}.json", f"{split}.json"):
        if (path / name).is_file():
            return path / name
    raise FileNotFoundError(f"eval.data_dir={data_dir}: no cmrc2018_{split}.json or {split}.json (CMRC2018's layout)")


def load_cmrc(path: Path) -> List[GenItem]:
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not a CMRC2018 JSON file ({err})") from err
    items = []
    try:
        for article in data["data"]:
            for para in article["paragraphs"]:
                for qa in para["qas"]:
                    answers = tuple(a["text"] for a in qa.get("answers", []))
                    items.append(GenItem(str(qa["id"]), CMRC_PROMPT.format(context=para["context"].strip(),
                                                                        question=qa["question"].strip()),
                                         answers, str(qa["id"])))
    except (KeyError, TypeError) as err:
        raise ValueError(f"{path}: not in CMRC2018's layout (data/paragraphs/qas; missing {err})") from err
    return items


def load_sft_records(spec: str) -> List[GenItem]:
    """Records ending with an answer, from a jsonl file or the jsonl files of a folder."""
    from hpcllm.data.files import find_inputs, read_lines
    from hpcllm.data.prompts import Chat
    from hpcllm.data.records import RecordError, parse_line

    items = []
    for path in find_inputs(spec):
        for n, line in read_lines(path):
            if isinstance(line, str) and not line.strip():
                continue
            try:
                record = parse_line(line)
            except RecordError as err:
                raise ValueError(f"{path}:{n}: {err}") from err
            turns = getattr(record, "turns", None)
            if not turns or turns[-1].role != "assistant":
                raise ValueError(f"{path}:{n}: an SFT test record needs an answer (instruction/output, "
                                 "prompt/response or a conversation ending with one)")
            answer = "".join(text for text, _ in turns[-1].content) if not isinstance(turns[-1].content, str) \
                else turns[-1].content
            items.append(GenItem(f"{Path(path).name}:{n}", Chat(turns[:-1], system=record.system), (answer,),
                                 f"{path}:{n}"))
    if not items:
        raise ValueError(f"eval.data_dir={spec}: no records")
    return items


@torch.no_grad()
def greedy_generate(model, prompts: Sequence[Sequence[int]], pad_id: int, stop_ids: Sequence[int],
                    max_new_tokens: int, device: Optional[torch.device] = None, fixed_steps: bool = False) -> List[List[int]]:
    """Greedy continuations of left-padded prompts, each up to a stop token (not included) or max_new_tokens.
    ``fixed_steps`` runs all max_new_tokens steps (partitioned ZeRO-3 forwards are collective: every rank
    must run as many)."""
    from hpcllm.eval.scoring import last_logprobs

    seqs = [list(p) for p in prompts]
    out: List[List[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    for _ in range(max_new_tokens):
        if all(done) and not fixed_steps:
            break
        nxt = last_logprobs(model, seqs, pad_id, 1, device)[:, -1].argmax(-1).tolist()
        for i, token in enumerate(nxt):
            if done[i]:
                continue
            if token in stop_ids:
                done[i] = True
                continue
            seqs[i].append(token)
            out[i].append(token)
    return out
