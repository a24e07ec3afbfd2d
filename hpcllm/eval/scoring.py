"""Answer = the choice whose letter token is the most probable next token after the prompt (no generation)."""
from __future__ import annotations

import inspect
from typing import List, Optional, Sequence, Tuple

import torch

from hpcllm.eval.benchmarks import LETTERS


def letter_token_ids(tokenizer, context: str, sep: str = "", letters: Sequence[str] = LETTERS) -> Tuple[List[int], str]:
    """The token each letter is after ``context`` (e.g. ``"Answer:"``): ``sep + letter`` as the tokenizer
    splits it there (" A" is one token in most BPE vocabularies), or the bare letter when some
    ``sep + letter`` takes two tokens (then its first token, a lone space, would not tell the letters apart).
    Returns (ids, the variant used)."""
    base = tokenizer.encode(context, add_special_tokens=False)
    for variant in dict.fromkeys((sep, "")):
        ids = []
        for letter in letters:
            full = tokenizer.encode(context + variant + letter, add_special_tokens=False)
            if full[:len(base)] != base or len(full) != len(base) + 1:
                break
            ids.append(full[-1])
        if len(ids) == len(letters) and len(set(ids)) == len(letters):
            return ids, variant + "{letter}"
    raise ValueError(f"the tokenizer has no single token for each answer letter after {context!r}; "
                     "multiple-choice scoring needs one")


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


@torch.no_grad()
def letter_logprobs(model, seqs: Sequence[Sequence[int]], letter_ids: Sequence[int], pad_id: int,
                    device: Optional[torch.device] = None) -> torch.Tensor:
    """[batch, letters]: log-probabilities (over the whole vocabulary) of each letter as the next token."""
    ids, mask, positions = (t.to(device) if device is not None else t for t in left_pad(seqs, pad_id))
    kwargs = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, **kwargs)
    logits = (out.logits if hasattr(out, "logits") else out)[:, -1].float()
    return torch.log_softmax(logits, dim=-1)[:, list(letter_ids)].cpu()


def choose(logprobs: torch.Tensor) -> List[int]:
    """Index of the most probable letter per row (the first one on a tie)."""
    return logprobs.argmax(dim=-1).tolist()
