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


STYLES = {
    # hkust-nlp/ceval, the official answer-only prompt
    "ceval": PromptStyle("以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案。\n\n", "\n答案：", ""),
    # hendrycks/test evaluate.py (its subject has a leading space, giving "about  x"; one space here, as
    # lm-evaluation-harness writes it)
    "mmlu": PromptStyle("The following are multiple choice questions (with answers) about {subject}.\n\n",
                        "\nAnswer:", " "),
}


def format_question(style: PromptStyle, q: Question, with_answer: bool) -> str:
    text = q.question + "".join(f"\n{letter}. {choice}" for letter, choice in zip(LETTERS, q.choices)) + style.cue
    return text + f"{style.answer_sep}{q.answer}\n\n" if with_answer else text


def build_prompt(bench: Benchmark, subject: str, shots: Sequence[Question], question: Question) -> str:
    """Header, the answered shots, then the question ending with the answer cue."""
    style = STYLES[bench.name]
    header = style.header.format(subject=bench.prompt_names[subject])
    return header + "".join(format_question(style, s, True) for s in shots) + format_question(style, question, False)


@dataclass(frozen=True)
class FittedPrompt:
    ids: List[int]
    shots: int  # shots kept
    truncated: bool  # cut from the left because even the zero-shot prompt was too long


def fit_prompt(encode: Callable[[str], List[int]], build: Callable[[int], str], shots: int,
               max_len: int, keep_first: int = 0) -> FittedPrompt:
    """The prompt with the most shots (up to ``shots``) that fits ``max_len`` tokens; when even
    zero shots do not fit, its last tokens (the question and the answer cue survive) after its
    first ``keep_first`` (a bos token)."""
    for k in range(shots, -1, -1):
        ids = encode(build(k))
        if len(ids) <= max_len:
            return FittedPrompt(ids, k, False)
    return FittedPrompt(ids[:keep_first] + ids[len(ids) - (max_len - keep_first):], 0, True)


class Prompter:
    """Prompts as token ids for one tokenizer, plain or in the model family's chat format."""

    def __init__(self, bench: Benchmark, tokenizer, chat_format: Optional[str] = None,
                 special_tokens: Optional[dict] = None) -> None:
        self.bench, self.tok = bench, tokenizer
        self.style = STYLES[bench.name]
        self.chat = None
        if chat_format:
            from hpcllm.data.encode import special_id
            from hpcllm.data.prompts import get_format

            self.chat = get_format(chat_format)
            self.chat_tokens = self.chat.resolve_tokens(special_tokens, tokenizer)
            self.special_ids = {t: special_id(tokenizer, t, chat_format) for t in self.chat_tokens.values()}
        bos = tokenizer.bos_token_id
        self.keep_first = int(bos is not None and self.encode("x")[:1] == [bos])

    def _pieces(self, text: str):
        from hpcllm.data.prompts import Chat, Turn

        return self.chat.render(Chat([Turn("user", text)]), self.chat_tokens, generation_prompt=True)

    def encode(self, text: str) -> List[int]:
        if self.chat is None:
            ids = self.tok.encode(text, add_special_tokens=True)
            # Some tokenizers close every encoding with eos; the answer must follow the cue directly.
            return ids[:-1] if ids and ids[-1] == self.tok.eos_token_id and not text.endswith(self.tok.eos_token) else ids
        ids = []
        for p in self._pieces(text):
            ids += [self.special_ids[p.text]] if p.special else self.tok.encode(p.text, add_special_tokens=False)
        return ids

    def answer_context(self) -> Tuple[str, str]:
        """(text the answer letter follows, separator): the cue of a plain prompt; in a chat format the end
        of the user turn, and the text the family's answers begin with (Llama-2's " ", ChatGLM3's "\n")."""
        if self.chat is None:
            return self.style.cue, self.style.answer_sep
        last = self._pieces("?")[-1]
        first = self.chat.assistant[0]
        return ("" if last.special else last.text), (first[1] if first[0] == "text" else "")

    def fit(self, subject: str, dev: Sequence[Question], question: Question, shots: int,
            max_len: int) -> FittedPrompt:
        shots = min(shots, len(dev))
        return fit_prompt(self.encode, lambda k: build_prompt(self.bench, subject, dev[:k], question), shots, max_len,
                          self.keep_first)
