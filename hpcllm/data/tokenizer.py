"""Loading tokenizers, fingerprinting them, and training the small demo tokenizer."""
from __future__ import annotations

import collections
import hashlib
import json
import os
import re
from typing import Iterable, List, Optional

from hpcllm.data.prompts import all_special_tokens

DEMO_TOKENIZER_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo_tokenizer")
BASE_SPECIALS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
# Markers that are plain text in the families' tokenizers but single tokens in the demo one.
TEXT_MARKERS = ["[INST]", "[/INST]", "<<SYS>>", "<</SYS>>", "<|observation|>", "<|endoftext|>"]
# Looked up by name but short enough to occur inside words: matched only as a whole word.
WHOLE_WORD = {"sop"}
REMOTE_CODE_FIX = ("if you trust it, set model.trust_remote_code=true (tools/memmap_gen.py: trust_remote_code=true; "
                   "tools/merge_lora.py: --trust-remote-code)")


def untrusted_code(err: Exception) -> bool:
    """transformers refused to run a directory's own code (auto_map) because it was not trusted."""
    return "contains custom code" in str(err) or REMOTE_CODE_FIX in str(err)


def load_tokenizer(spec: Optional[str], model_path: Optional[str] = None, trust_remote_code: bool = False):
    """``"demo"`` -> the bundled tokenizer; ``None`` -> the model's own; else a path or hub name.

    The result always has a pad token (the eos or unk token when the tokenizer defines none),
    because every memmap row is padded to ``seq_len``. A tokenizer shipping Python code of its own
    (``auto_map``) is refused unless ``trust_remote_code`` (the model preset's ``trust_remote_code``).
    """
    from transformers import AutoTokenizer

    if spec == "demo":
        path = DEMO_TOKENIZER_DIR
    elif spec is None:
        if model_path is None:
            raise ValueError("no tokenizer: set model.tokenizer (a path, a hub name or 'demo') or model.path")
        path = model_path
    else:
        path = spec
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=bool(trust_remote_code))
    except ValueError as err:
        if not untrusted_code(err):
            raise
        raise ValueError(f"tokenizer {path} ships Python code of its own (auto_map), which runs only when trusted: "
                         f"{REMOTE_CODE_FIX}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    if tok.pad_token is None:
        raise ValueError(f"tokenizer {path} has no pad, eos or unk token to pad with")
    return tok


def tokenizer_hash(tokenizer) -> str:
    """A fingerprint of what the tokenizer does: its full serialization when it is a fast one
    (vocabulary, merges, normalizer, added tokens), else its vocabulary and special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        payload = backend.to_str()
    else:
        payload = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    payload += json.dumps([tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token], ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


def demo_special_tokens() -> List[str]:
    out = list(BASE_SPECIALS.values())
    for t in all_special_tokens() + TEXT_MARKERS:
        if t not in out:
            out.append(t)
    return out


def template_texts(repeat: int = 20) -> List[str]:
    """The fixed text of every prompt format (e.g. Alpaca's preamble), so that a small tokenizer
    learns it as a few tokens rather than spelling it out byte by byte."""
    from hpcllm.data.prompts import FORMATS, Chat, Turn

    chat = Chat([Turn("user", "question", input="input"), Turn("assistant", [("answer", True)]),
                 Turn("user", "question")], system="system")
    out = []
    for fmt in FORMATS.values():
        for pieces in (fmt.render(chat, {n: "" for n in fmt.token_names()}),
                       fmt.render(Chat(chat.turns[:1]), {n: "" for n in fmt.token_names()})):
            out.append("".join(p.text for p in pieces))
    return out * repeat


def train_bpe(texts: Iterable[str], output: str, vocab_size: int = 4096, min_frequency: int = 2,
              max_token_length: Optional[int] = 8) -> int:
    """Train a byte-level BPE tokenizer (any text encodes) and save a transformers-loadable dir.

    ``vocab_size`` counts everything, special tokens included. Returns the final vocab size.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = demo_special_tokens()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
        special_tokens=[t for t in specials if t not in WHOLE_WORD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        # Chinese has no spaces: without a cap, sentences that recur in a small corpus become one token.
        max_token_length=max_token_length,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    # The trainer drops single_word, so these are added afterwards.
    tok.add_special_tokens([AddedToken(t, special=True, single_word=True, normalized=False) for t in WHOLE_WORD])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False, **BASE_SPECIALS)
    fast.add_special_tokens({"additional_special_tokens": [
        AddedToken(t, special=True, single_word=t in WHOLE_WORD, normalized=False)
        for t in specials if t not in BASE_SPECIALS.values()]})
    fast.model_max_length = 1 << 20
    fast.save_pretrained(output)
    return len(fast)


def extend_vocab(tokenizer, texts: Iterable[str], num_new: int, min_count: int = 5) -> List[str]:
    """Add the most frequent Chinese words (2-4 characters) that the tokenizer splits into
    several tokens. Returns the added tokens; the model's embeddings must be resized to
    ``len(tokenizer)`` before training."""
    counts = collections.Counter()
    for text in texts:
        for run in re.findall(r"[\u4e00-\u9fff]+", text):
            for n in (2, 3, 4):
                counts.update(run[i:i + n] for i in range(len(run) - n + 1))
    vocab = tokenizer.get_vocab()
    new = []
    for word, count in counts.most_common():
        if len(new) >= num_new or count < min_count:
            break
        if word not in vocab and len(tokenizer.tokenize(word)) > 1:
            new.append(word)
    tokenizer.add_tokens(new)
    return new
