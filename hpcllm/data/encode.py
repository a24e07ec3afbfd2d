"""Records -> token ids and labels -> fixed-length rows. Runs inside the worker processes.

Labels are aligned with ``input_ids`` (the model shifts them, as Hugging Face models do);
``-100`` marks a token that is not learned and every padding position.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np

from hpcllm.data.prompts import Chat, Piece, PromptFormat, Turn
from hpcllm.data.records import Preference, Prompt, Record, RecordError, Text, parse_line

IGNORE = -100
KINDS = ("pretrain", "sft", "preference", "prompt")
MODES = ("pack", "truncate", "split")
LM_KEYS = ("input_ids", "attention_mask", "labels")
KEYS = {
    "pretrain": LM_KEYS,
    "sft": LM_KEYS,
    "preference": tuple(f"{side}_{k}" for side in ("chosen", "rejected") for k in LM_KEYS),
    "prompt": ("input_ids", "attention_mask"),
}
# What each record shape is to each kind of output.
ACCEPTS = {"pretrain": (Text, Chat), "sft": (Text, Chat), "preference": (Preference,),
           "prompt": (Prompt, Chat, Preference)}


def kind_of(record: Record) -> str:
    return {Text: "pretrain", Chat: "sft", Preference: "preference", Prompt: "prompt"}[type(record)]


@dataclass
class ChunkResult:
    rows: Dict[str, np.ndarray]  # key -> int32 [n, seq_len]
    stream: np.ndarray  # pack mode: text tokens the parent cuts into rows across chunks
    records: int = 0
    tokens: int = 0  # tokens of the samples before truncation
    truncated: int = 0  # samples cut to fit seq_len
    errors: List[Tuple[int, int, str, str]] = field(default_factory=list)  # (file index, line, reason, message)
    skipped: Dict[str, int] = field(default_factory=dict)  # samples dropped whatever on_error says


class Encoder:
    def __init__(self, tokenizer, fmt: Optional[PromptFormat], special_tokens: Optional[dict], kind: str, seq_len: int, mode: str):
        self.tok, self.fmt, self.kind, self.seq_len, self.mode = tokenizer, fmt, kind, seq_len, mode
        self.tokens = fmt.resolve_tokens(special_tokens, tokenizer) if fmt is not None else {}
        self.special_ids = {t: special_id(tokenizer, t, fmt.id) for t in self.tokens.values()}
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id
        self.backend = getattr(tokenizer, "backend_tokenizer", None)
        if self.backend is not None and self.special_ids:
            self.backend = with_single_token_specials(self.backend, self.special_ids, fmt.id)

    def encode_texts(self, texts: List[str], add_special_tokens: bool = False) -> List[List[int]]:
        if not texts:
            return []
        if self.backend is not None:  # the Rust tokenizer directly; the fast variant skips the offsets
            encode = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)
            return [e.ids for e in encode(texts, add_special_tokens=add_special_tokens)]
        return [self.tok.encode(t, add_special_tokens=add_special_tokens) for t in texts]

    def encode_pieces(self, renders: List[List[Piece]]) -> List[Tuple[np.ndarray, np.ndarray]]:
        """Token ids and labels of rendered conversations.

        The whole conversation is tokenized as one text, as the family's chat template and an
        inference server tokenize it (tokenizing the pieces one by one would put a lone ``▁``
        before every answer with SentencePiece tokenizers); a token is learned when any of its
        characters is. Slow tokenizers have no character offsets: their pieces are tokenized
        one by one."""
        if self.backend is None:
            return self._encode_piecewise(renders)
        texts, learned_chars = zip(*map(_text_and_learned_chars, renders)) if renders else ((), ())
        out = []
        for enc, learned in zip(self.backend.encode_batch(list(texts), add_special_tokens=False), learned_chars):
            ids = np.asarray(enc.ids, np.int32)
            offsets = np.asarray(enc.offsets, np.int64).reshape(-1, 2)
            before = np.concatenate([[0], np.cumsum(learned)])  # learned characters before each position
            start, end = offsets[:, 0], np.maximum(offsets[:, 1], offsets[:, 0] + 1)
            is_learned = before[np.minimum(end, len(learned))] > before[np.minimum(start, len(learned))]
            out.append((ids, np.where(is_learned, ids, IGNORE).astype(np.int32)))
        return out

    def _encode_piecewise(self, renders):
        texts = [p.text for pieces in renders for p in pieces if not p.special]
        encoded = iter(self.encode_texts(texts))
        out = []
        for pieces in renders:
            ids: List[int] = []
            labels: List[int] = []
            for p in pieces:
                piece_ids = [self.special_ids[p.text]] if p.special else next(encoded)
                ids += piece_ids
                labels += piece_ids if p.learned else [IGNORE] * len(piece_ids)
            out.append((np.asarray(ids, np.int32), np.asarray(labels, np.int32)))
        return out

    def encode_documents(self, texts: List[str]) -> List[np.ndarray]:
        """Pretraining text: the tokenizer's own bos handling, and eos between documents."""
        out = []
        for ids in self.encode_texts(texts, add_special_tokens=True):
            if self.eos_id is not None and (not ids or ids[-1] != self.eos_id):
                ids = ids + [self.eos_id]
            out.append(np.asarray(ids, np.int32))
        return out

    def process(self, lines: List[Tuple[int, int, str]]) -> ChunkResult:
        records = []
        result = ChunkResult(rows={}, stream=np.zeros(0, np.int32), records=len(lines))
        for file_idx, lineno, line in lines:
            try:
                record = parse_line(line)
                if not isinstance(record, ACCEPTS[self.kind]):
                    raise RecordError("kind_mismatch", f"a {kind_of(record)} record in {self.kind} data")
                if self.fmt is None and not isinstance(record, Text):
                    raise ValueError(f"{kind_of(record)} records need a prompt format: set model=<conf/model preset>")
                records.append(record)
            except RecordError as e:
                result.errors.append((file_idx, lineno, e.reason, str(e)))
        build = {"preference": self._preference_rows, "prompt": self._prompt_rows}.get(self.kind, self._lm_rows)
        build(records, result)
        return result

    # -- rows per kind -------------------------------------------------------------------
    def _lm_rows(self, records, result):
        docs = self.encode_documents([r.text for r in records if isinstance(r, Text)])
        chats = self.encode_pieces([self.fmt.render(r, self.tokens) for r in records if isinstance(r, Chat)])
        result.tokens = sum(len(d) for d in docs) + sum(len(ids) for ids, _ in chats)
        L = self.seq_len
        rows: List[Tuple[np.ndarray, np.ndarray]] = []
        if self.mode == "pack" and docs:
            result.stream = np.concatenate(docs)
        elif self.mode == "truncate":
            result.truncated += sum(len(d) > L for d in docs)
            rows += [(d[:L], d[:L]) for d in docs]
        else:
            rows += [(d[i:i + L], d[i:i + L]) for d in docs for i in range(0, len(d), L)]
        samples = []
        for ids, labels in chats:
            if len(ids) > L and self.mode == "split":
                samples += [(ids[i:i + L], labels[i:i + L]) for i in range(0, len(ids), L)]
                continue
            if len(ids) > L:
                result.truncated += 1
                ids, labels = ids[:L], labels[:L]
            if (labels == IGNORE).all():
                result.skipped["too_long"] = result.skipped.get("too_long", 0) + 1
            else:
                samples.append((ids, labels))
        if self.mode == "split":  # windows that hold no answer teach nothing
            samples = [s for s in samples if (s[1] != IGNORE).any()]
        if self.mode == "pack":
            rows += self._pack(samples)
        else:
            rows += samples
        result.rows = self._pad_rows(rows)

    def _pack(self, samples):
        """Next-fit: samples in order, a new row when the next one does not fit; labels stay per sample."""
        rows, ids, labels = [], [], []
        for s_ids, s_labels in samples:
            if ids and sum(map(len, ids)) + len(s_ids) > self.seq_len:
                rows.append((np.concatenate(ids), np.concatenate(labels)))
                ids, labels = [], []
            ids.append(s_ids)
            labels.append(s_labels)
        if ids:
            rows.append((np.concatenate(ids), np.concatenate(labels)))
        return rows

    def _pad_rows(self, rows, prefix=""):
        n, L = len(rows), self.seq_len
        ids = np.full((n, L), self.pad_id, np.int32)
        mask = np.zeros((n, L), np.int32)
        labels = np.full((n, L), IGNORE, np.int32)
        for i, (r_ids, r_labels) in enumerate(rows):
            ids[i, :len(r_ids)] = r_ids
            mask[i, :len(r_ids)] = 1
            labels[i, :len(r_ids)] = r_labels
        return {f"{prefix}input_ids": ids, f"{prefix}attention_mask": mask, f"{prefix}labels": labels}

    def _preference_rows(self, records, result):
        """Chosen and rejected of one prompt in the same row of their two files; truncated to fit."""
        renders = []
        for r in records:
            for answer in (r.chosen, r.rejected):
                renders.append(self.fmt.render(Chat(r.prompt.turns + [Turn("assistant", [(answer, True)])], r.prompt.system), self.tokens))
        encoded = self.encode_pieces(renders)
        result.tokens = sum(len(ids) for ids, _ in encoded)
        L = self.seq_len
        chosen, rejected = [], []
        for c, r in zip(encoded[0::2], encoded[1::2]):
            result.truncated += (len(c[0]) > L) + (len(r[0]) > L)
            c, r = (c[0][:L], c[1][:L]), (r[0][:L], r[1][:L])
            if (c[1] == IGNORE).all() or (r[1] == IGNORE).all():
                result.skipped["too_long"] = result.skipped.get("too_long", 0) + 1
                continue
            chosen.append(c)
            rejected.append(r)
        result.rows = {**self._pad_rows(chosen, "chosen_"), **self._pad_rows(rejected, "rejected_")}

    def _prompt_rows(self, records, result):
        """Prompts for generation: left-padded (the answer is generated to the right) and, when too
        long, cut on the left so that the cue handing over to the assistant survives."""
        chats = []
        for r in records:
            chat = r.prompt if isinstance(r, (Prompt, Preference)) else Chat(r.turns[:-1], r.system)
            chats.append(self.fmt.render(chat, self.tokens, generation_prompt=True))
        encoded = self.encode_pieces(chats)
        result.tokens = sum(len(ids) for ids, _ in encoded)
        L = self.seq_len
        ids = np.full((len(encoded), L), self.pad_id, np.int32)
        mask = np.zeros((len(encoded), L), np.int32)
        for i, (r_ids, _) in enumerate(encoded):
            result.truncated += len(r_ids) > L
            r_ids = r_ids[-L:]
            ids[i, L - len(r_ids):] = r_ids
            mask[i, L - len(r_ids):] = 1
        result.rows = {"input_ids": ids, "attention_mask": mask}


def _text_and_learned_chars(pieces: List[Piece]) -> Tuple[str, np.ndarray]:
    text = "".join(p.text for p in pieces)
    learned = np.zeros(len(text), np.int8)
    pos = 0
    for p in pieces:
        if p.learned:
            learned[pos:pos + len(p.text)] = 1
        pos += len(p.text)
    return text, learned


def with_single_token_specials(backend, special_ids: Dict[str, int], format_id: str):
    """A copy of the Rust tokenizer in which every special token of the format is matched as one
    token inside a text (the families' tokenizers do so for theirs; a token that is only in the
    vocabulary would otherwise be spelt out). Checked on a sample text."""
    from tokenizers import AddedToken, Tokenizer

    added = {t.content for t in backend.get_added_tokens_decoder().values()}
    missing = [t for t in special_ids if t not in added]
    if missing:
        backend = Tokenizer.from_str(backend.to_str())
        # whole words only for names made of letters (chatglm2's "sop"), so "desktop" stays a word
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False, single_word=t.isalnum()) for t in missing])
    for token, tid in special_ids.items():
        ids = backend.encode(f"x {token} x", add_special_tokens=False).ids
        if tid not in ids:
            raise ValueError(f"the tokenizer does not keep {token!r} (id {tid}) as one token inside a text, which "
                             f"prompt format {format_id!r} needs; use the model family's own tokenizer")
    return backend


def special_id(tokenizer, token: str, format_id: str) -> int:
    """The single id of a special token; a clear error when the tokenizer lacks it."""
    tid = tokenizer.convert_tokens_to_ids(token)
    if tid is None or (tid == tokenizer.unk_token_id and token != tokenizer.unk_token):
        raise ValueError(f"the tokenizer has no single token {token!r}, which prompt format {format_id!r} needs; "
                         "use the model family's own tokenizer or map the name in model.special_tokens")
    return tid
