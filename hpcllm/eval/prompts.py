"""k-shot prompts in each benchmark's published wording, optionally wrapped in a chat format,
and the rule that makes a prompt fit the model's context.

Text building is pure (``build_prompt``); ``Prompter`` adds the tokenizer: encoding, the chat
wrapping from ``hpcllm.data.prompts`` and fitting (``fit_prompt``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

from hpcllm.eval.benchmarks import LETTERS, Benchmark, Question


@dataclass(frozen=True)
class PromptStyle:
    header: str  # with {subject}
    cue: str  # ends every question; the answer letter follows it
    answer_sep: str  # between the cue and the letter in an answered shot


TEMPLATES = ("official", "lm_eval")
STYLES = {
    # hkust-nlp/ceval, the official answer-only prompt (code/evaluator_series: "以下是中国关于{科目}考试的单项选择题，
    # 请选出其中的正确答案。", the letter right after "答案：")
    ("ceval", "official"): PromptStyle("以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案。\n\n", "\n答案：", ""),
    # lm-evaluation-harness's ceval-valid task: no "考试" in the header, a space before the letter
    ("ceval", "lm_eval"): PromptStyle("以下是中国关于{subject}的单项选择题，请选出其中的正确答案。\n\n", "\n答案：", " "),
    # hendrycks/test evaluate.py (its subject has a leading space, giving "about  x"; one space here, as
    # lm-evaluation-harness's mmlu task writes it: the two templates are the same)
    ("mmlu", "official"): PromptStyle("The following are multiple choice questions (with answers) about {subject}.\n\n",
                                      "\nAnswer:", " "),
}
STYLES[("mmlu", "lm_eval")] = STYLES[("mmlu", "official")]


def get_style(bench: Benchmark, template: str = "official") -> PromptStyle:
    if template not in TEMPLATES:
        raise ValueError(f"eval.template={template!r}; valid: {', '.join(TEMPLATES)}")
    return STYLES[(bench.name, template)]


def format_question(style: PromptStyle, q: Question, with_answer: bool) -> str:
    text = q.question + "".join(f"\n{letter}. {choice}" for letter, choice in zip(LETTERS, q.choices)) + style.cue
    return text + f"{style.answer_sep}{q.answer}\n\n" if with_answer else text


def build_prompt(bench: Benchmark, subject: str, shots: Sequence[Question], question: Question,
                 template: str = "official") -> str:
    """Header, the answered shots, then the question ending with the answer cue."""
    style = get_style(bench, template)
    header = style.header.format(subject=bench.prompt_names[subject])
    return header + "".join(format_question(style, s, True) for s in shots) + format_question(style, question, False)


OVERFLOWS = ("drop_shots", "truncate_left", "fail")


class PromptOverflow(ValueError):
    pass


@dataclass(frozen=True)
class FittedPrompt:
    ids: List[int]
    shots: int  # shots in the prompt (truncate_left: all asked for, the first ones possibly cut)
    truncated: bool  # cut from the left


def fit_prompt(encode: Callable[[str], List[int]], build: Callable[[int], str], shots: int,
               max_len: int, keep_first: int = 0, on_overflow: str = "drop_shots") -> FittedPrompt:
    """Make the k-shot prompt fit ``max_len`` tokens (``eval.on_overflow``):

    * ``drop_shots``: the most shots (up to ``shots``) that fit; when even zero shots do not, the last
      tokens (the question and the answer cue survive) after the first ``keep_first`` (a bos token);
    * ``truncate_left``: every shot, cut to its last ``max_len`` tokens, as lm-evaluation-harness does;
    * ``fail``: refuse (``PromptOverflow``)."""
    if on_overflow not in OVERFLOWS:
        raise ValueError(f"eval.on_overflow={on_overflow!r}; valid: {', '.join(OVERFLOWS)}")
    ids = encode(build(shots))
    if len(ids) <= max_len:
        return FittedPrompt(ids, shots, False)
    if on_overflow == "fail":
        raise PromptOverflow(f"the {shots}-shot prompt is {len(ids)} tokens, more than the {max_len} that fit")
    if on_overflow == "truncate_left":
        return FittedPrompt(ids[len(ids) - max_len:], shots, True)
    for k in range(shots - 1, -1, -1):
        ids = encode(build(k))
        if len(ids) <= max_len:
            return FittedPrompt(ids, k, False)
    return FittedPrompt(ids[:keep_first] + ids[len(ids) - (max_len - keep_first):], 0, True)


def encode_plain(tokenizer, text: str) -> List[int]:
    ids = tokenizer.encode(text, add_special_tokens=True)
    # Some tokenizers close every encoding with eos; the answer must follow the prompt directly.
    return ids[:-1] if ids and ids[-1] == tokenizer.eos_token_id and not text.endswith(tokenizer.eos_token) else ids


class ChatEncoder:
    """Conversations as token ids in a model family's chat format, ending where the answer begins."""

    def __init__(self, tokenizer, chat_format: str, special_tokens: Optional[dict] = None) -> None:
        from hpcllm.data.encode import special_id
        from hpcllm.data.prompts import get_format

        self.tok, self.format = tokenizer, get_format(chat_format)
        self.tokens = self.format.resolve_tokens(special_tokens, tokenizer)
        self.special_ids = {t: special_id(tokenizer, t, chat_format) for t in self.tokens.values()}

    def pieces(self, chat):
        return self.format.render(chat, self.tokens, generation_prompt=True)

    def encode(self, chat) -> List[int]:
        ids = []
        for p in self.pieces(chat):
            ids += [self.special_ids[p.text]] if p.special else self.tok.encode(p.text, add_special_tokens=False)
        return ids


def user_turn(text: str):
    from hpcllm.data.prompts import Chat, Turn

    return Chat([Turn("user", text)])


class Prompter:
    """Prompts as token ids for one tokenizer, plain or in the model family's chat format."""

    def __init__(self, bench: Benchmark, tokenizer, chat_format: Optional[str] = None,
                 special_tokens: Optional[dict] = None, template: str = "official") -> None:
        self.bench, self.tok, self.template = bench, tokenizer, template
        self.style = get_style(bench, template)
        self.chat = ChatEncoder(tokenizer, chat_format, special_tokens) if chat_format else None
        bos = tokenizer.bos_token_id
        self.keep_first = int(bos is not None and self.encode("x")[:1] == [bos])

    def encode(self, text: str) -> List[int]:
        return encode_plain(self.tok, text) if self.chat is None else self.chat.encode(user_turn(text))

    def answer_context(self) -> Tuple[str, str]:
        """(text the answer letter follows, separator): the cue of a plain prompt; in a chat format the end
        of the user turn, and the text the family's answers begin with (Llama-2's " ", ChatGLM3's "\n")."""
        if self.chat is None:
            return self.style.cue, self.style.answer_sep
        last = self.chat.pieces(user_turn("?"))[-1]
        first = self.chat.format.assistant[0]
        return ("" if last.special else last.text), (first[1] if first[0] == "text" else "")

    def build(self, subject: str, dev: Sequence[Question], question: Question, shots: int) -> str:
        return build_prompt(self.bench, subject, dev[:shots], question, self.template)

    def fit(self, subject: str, dev: Sequence[Question], question: Question, shots: int,
            max_len: int, on_overflow: str = "drop_shots") -> FittedPrompt:
        shots = min(shots, len(dev))
        return fit_prompt(self.encode, lambda k: self.build(subject, dev, question, k), shots, max_len,
                          self.keep_first, on_overflow)
