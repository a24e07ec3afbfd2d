"""Answer = the choice whose continuation is the most probable after the prompt (no generation).

How a letter is scored (``eval.letter_scoring``):

* ``space_letter``: the single token of " A".." D" (a space, then the letter) as the next token, which is
  lm-evaluation-harness's MMLU target; in a SentencePiece vocabulary it is "▁A", the token the official
  C-Eval evaluator scores (``tokenizer.encode("A")[-1]``);
* ``bare_letter``: the single token of "A".."D" right after the prompt;
* ``continuation``: every token of the benchmark's answer text (" A" after MMLU's "Answer:", "A" after
  C-Eval's "答案：") after the prompt, their log-probabilities summed: lm-eval's loglikelihood, for
  vocabularies where that text is more than one token;
* ``auto``: the benchmark's answer text as one token (``space_letter`` where it starts with a space,
  ``bare_letter`` where it does not) when every letter is one, else ``continuation``, with a warning.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

from hpcllm.eval.benchmarks import LETTERS

LETTER_SCORINGS = ("auto", "space_letter", "bare_letter", "continuation")


@dataclass(frozen=True)
class LetterScoring:
    mode: str  # space_letter | bare_letter | continuation (auto resolved)
    requested: str  # eval.letter_scoring as given
    text: str  # the scored text after the prompt, with {letter}
    continuations: Tuple[Tuple[int, ...], ...]  # per letter, the token ids scored
    fallback: Optional[str] = None  # why auto did not score single letter tokens

    @property
    def longest(self) -> int:
        return max(len(c) for c in self.continuations)


def continuation_ids(tokenizer, context: str, continuation: str) -> List[int]:
    """The tokens of ``continuation`` after ``context`` as lm-evaluation-harness splits them: the context's
    trailing whitespace moves to the continuation, the whole is encoded and the context's tokens cut off."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    base = tokenizer.encode(context, add_special_tokens=False)
    whole = tokenizer.encode(context + continuation, add_special_tokens=False)
    return whole[len(base):]


def _single_tokens(tokenizer, context: str, text: str, letters: Sequence[str]) -> Optional[List[int]]:
    """Each letter's text as one distinct token after ``context``, or None where some is not."""
    ids = [continuation_ids(tokenizer, context, text.format(letter=letter)) for letter in letters]
    if all(len(i) == 1 for i in ids) and len({i[0] for i in ids}) == len(letters):
        return [i[0] for i in ids]
    return None


def _describe(tokenizer, context: str, text: str, letters: Sequence[str]) -> str:
    pieces = {letter: continuation_ids(tokenizer, context, text.format(letter=letter)) for letter in letters}
    convert = getattr(tokenizer, "convert_ids_to_tokens", lambda ids: ids)
    return ", ".join(f"{text.format(letter=l)!r} -> {convert(ids)}" for l, ids in pieces.items())


def resolve_letter_scoring(tokenizer, context: str, sep: str = "", mode: str = "auto",
                           letters: Sequence[str] = LETTERS) -> LetterScoring:
    """The tokens each answer letter is scored by after ``context`` (the prompt's answer cue, e.g. "Answer:");
    ``sep`` is what the benchmark writes between the cue and the letter (" " for MMLU)."""
    if mode not in LETTER_SCORINGS:
        raise ValueError(f"eval.letter_scoring={mode!r}; valid: {', '.join(LETTER_SCORINGS)}")
    answer_text = sep + "{letter}"
    if mode == "continuation":
        ids = [continuation_ids(tokenizer, context, answer_text.format(letter=l)) for l in letters]
        return LetterScoring(mode, mode, answer_text, tuple(tuple(i) for i in ids))
    if mode in ("space_letter", "bare_letter"):
        text = " {letter}" if mode == "space_letter" else "{letter}"
        single = _single_tokens(tokenizer, context, text, letters)
        if single is None:
            raise ValueError(f"eval.letter_scoring={mode}: the letters are not one distinct token each after "
                             f"{context!r} in this tokenizer ({_describe(tokenizer, context, text, letters)}); "
                             "set eval.letter_scoring=continuation (or auto)")
        return LetterScoring(mode, mode, text, tuple((i,) for i in single))
    single = _single_tokens(tokenizer, context, answer_text, letters)
    if single is not None:
        return LetterScoring("space_letter" if sep.startswith(" ") else "bare_letter", mode, answer_text,
                             tuple((i,) for i in single))
    scoring = resolve_letter_scoring(tokenizer, context, sep, "continuation", letters)
    why = (f"the answer letters are not single tokens after {context!r} "
           f"({_describe(tokenizer, context, answer_text, letters)}): each is scored by the summed log-probabilities "
           "of its tokens (eval.letter_scoring=continuation, as lm-evaluation-harness does)")
    return LetterScoring(scoring.mode, mode, scoring.text, scoring.continuations, fallback=why)


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input_ids, attention_mask and position_ids of a left-padded batch: every prompt ends at the last column,
    and positions count from each prompt's first real token, so padding changes nothing."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, positions


def _accepts(model, name: str) -> bool:
    model = getattr(model, "module", model)  # a DeepSpeed engine passes keywords on to its module
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return name in inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return False


def last_logprobs(model, seqs: Sequence[Sequence[int]], pad_id: int, keep: int = 1,
                  device: Optional[torch.device] = None) -> torch.Tensor:
    """[batch, keep, vocab]: next-token log-probabilities at each sequence's last ``keep`` positions."""
    ids, mask, positions = (t.to(device) if device is not None else t for t in left_pad(seqs, pad_id))
    kwargs = {"logits_to_keep": keep} if _accepts(model, "logits_to_keep") else {}
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, **kwargs)
    logits = (out.logits if hasattr(out, "logits") else out)[:, -keep:].float()
    return torch.log_softmax(logits, dim=-1)


@torch.no_grad()
def letter_logprobs(model, seqs: Sequence[Sequence[int]], letter_ids: Sequence[int], pad_id: int,
                    device: Optional[torch.device] = None) -> torch.Tensor:
    """[batch, letters]: log-probabilities (over the whole vocabulary) of each letter as the next token."""
    return last_logprobs(model, seqs, pad_id, 1, device)[:, -1, list(letter_ids)].cpu()


@torch.no_grad()
def continuation_logprobs(model, seqs: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]],
                          pad_id: int, device: Optional[torch.device] = None) -> torch.Tensor:
    """[batch, choices]: the summed log-probabilities of each choice's tokens after each prompt, as
    lm-evaluation-harness's loglikelihood (the model reads the prompt and the choice's tokens but its last).
    Single-token choices need one forward per prompt; longer ones one per prompt and choice."""
    if all(len(c) == 1 for c in continuations):
        return letter_logprobs(model, seqs, [c[0] for c in continuations], pad_id, device)
    keep = max(len(c) for c in continuations)
    inputs = [list(s) + list(c[:-1]) for s in seqs for c in continuations]
    logprobs = last_logprobs(model, inputs, pad_id, keep, device).cpu()
    scores = torch.empty(len(seqs) * len(continuations))
    for row, cont in enumerate(c for _ in seqs for c in continuations):
        targets = torch.tensor(cont).unsqueeze(-1)
        scores[row] = logprobs[row, keep - len(cont):].gather(-1, targets).sum()
    return scores.view(len(seqs), len(continuations))


def choose(logprobs: torch.Tensor) -> List[int]:
    """Index of the most probable letter per row (the first one on a tie)."""
    return logprobs.argmax(dim=-1).tolist()
