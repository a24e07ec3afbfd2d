"""Records -> token ids and labels -> fixed-length rows. Runs inside the worker processes.

Labels are aligned with ``input_ids`` (the model shifts them, as Hugging Face models do);
``-100`` marks a token that is not learned and every padding position.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np

from hpcllm.data.prompts import Chat, ChatTemplateFormat, Piece, PromptFormat, Turn
from hpcllm.data.records import Preference, Prompt, Record, RecordError, Text, parse_line

IGNORE = -100
KINDS = ("pretrain", "sft", "preference", "prompt")
MODES = ("pack", "truncate", "split")
LM_KEYS = ("input_ids", "attention_mask", "labels")
PACKED_KEYS = LM_KEYS + ("position_ids",)  # sft pack mode: positions restart at every sample
KEYS = {
    "pretrain": LM_KEYS,
    "sft": LM_KEYS,
    "preference": tuple(f"{side}_{k}" for side in ("chosen", "rejected") for k in LM_KEYS),
    "prompt": ("input_ids", "attention_mask"),
}
# What each record shape is to each kind of output.
ACCEPTS = {"pretrain": (Text, Chat), "sft": (Text, Chat), "preference": (Preference,),
           "prompt": (Prompt, Chat, Preference)}


def keys_for(kind: str, mode: str) -> Tuple[str, ...]:
    return PACKED_KEYS if (kind, mode) == ("sft", "pack") else KEYS[kind]


def kind_of(record: Record) -> str:
    return {Text: "pretrain", Chat: "sft", Preference: "preference", Prompt: "prompt"}[type(record)]


@dataclass
class ChunkResult:
    rows: Dict[str, np.ndarray]  # key -> int32 [n, seq_len]
    stream: np.ndarray  # pack mode: text tokens the parent cuts into rows across chunks
    records: int = 0
    tokens: int = 0  # tokens of the samples before truncation
    truncated: int = 0  # samples (preference: pairs) cut to fit seq_len or max_prompt_len
    prompts_cut: int = 0  # of those, samples whose prompt was cut from the left
    answers_cut: int = 0  # of those, samples whose answer was cut at the end
    errors: List[Tuple[int, int, str, str]] = field(default_factory=list)  # (file index, line, reason, message)
    skipped: Dict[str, int] = field(default_factory=dict)  # samples dropped whatever on_error says


@dataclass
class Encoded:
    """One tokenized conversation: ``head`` tokens (the format's prefix and system message) come
    before the first user turn, the last answer starts at ``answer_start``."""
    ids: np.ndarray
    labels: np.ndarray
    head: int
    answer_start: int
    turn_starts: np.ndarray  # where each user turn starts: a prompt is best cut there


class Encoder:
    def __init__(self, tokenizer, fmt: Optional[PromptFormat], special_tokens: Optional[dict], kind: str, seq_len: int,
                 mode: str, max_prompt_len: Optional[int] = None):
        self.tok, self.fmt, self.kind, self.seq_len, self.mode = tokenizer, fmt, kind, seq_len, mode
        self.max_prompt_len = max_prompt_len
        if isinstance(fmt, ChatTemplateFormat):
            self.fmt = fmt = fmt.bind(tokenizer)
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

    def encode_chats(self, chats: List[Chat], generation_prompt: bool = False) -> List[Encoded]:
        renders, marks = [], []
        for chat in chats:
            marks.append([])
            renders.append(self.fmt.render(chat, self.tokens, generation_prompt=generation_prompt, marks=marks[-1]))
        out = []
        for (ids, labels, starts), chat_marks in zip(self.encode_pieces(renders, with_starts=True), marks):
            users = [pos for role, pos in chat_marks if role == "user"] or [0]
            last_answer = next((pos for role, pos in reversed(chat_marks) if role == "assistant"), None)
            # the first token at or after each character
            tokens_at = np.searchsorted(starts, users + [last_answer if last_answer is not None else 0])
            out.append(Encoded(ids, labels, int(tokens_at[0]), int(tokens_at[-1]) if last_answer is not None else len(ids),
                               tokens_at[:-1]))
        return out

    def encode_pieces(self, renders: List[List[Piece]], with_starts: bool = False) -> list:
        """Token ids and labels (and with ``with_starts`` each token's first character) of rendered
        conversations.

        The whole conversation is tokenized as one text, as the family's chat template and an
        inference server tokenize it (tokenizing the pieces one by one would put a lone ``▁``
        before every answer with SentencePiece tokenizers); a token is learned when any of its
        characters is. Slow tokenizers have no character offsets: their pieces are tokenized
        one by one."""
        if self.backend is None:
            out = self._encode_piecewise(renders)
        else:
            out = self._encode_whole(renders)
        return out if with_starts else [(ids, labels) for ids, labels, _ in out]

    def _encode_whole(self, renders):
        """One batch call; the labels of the whole batch from a few array operations, not per record."""
        if not renders:
            return []
        texts, spans, base = [], [], 0
        for pieces in renders:
            pos = 0
            for p in pieces:
                if p.learned:
                    spans.append((base + pos, base + pos + len(p.text)))
                pos += len(p.text)
            texts.append("".join(p.text for p in pieces))
            base += pos
        encodings = self.backend.encode_batch(texts, add_special_tokens=False)
        counts = np.fromiter((len(e.ids) for e in encodings), np.int64, len(encodings))
        ids = np.fromiter(itertools.chain.from_iterable(e.ids for e in encodings), np.int32, int(counts.sum()))
        offsets = np.fromiter(itertools.chain.from_iterable(itertools.chain.from_iterable(e.offsets for e in encodings)),
                              np.int64, 2 * len(ids)).reshape(-1, 2)
        text_starts = np.cumsum([0] + [len(t) for t in texts])
        start = offsets[:, 0] + np.repeat(text_starts[:-1], counts)  # in the batch's characters
        end = np.maximum(offsets[:, 1] + np.repeat(text_starts[:-1], counts), start + 1)
        learned = np.zeros(base + 1, np.int32)  # +1 at a learned span's start, -1 at its end
        if spans:
            np.add.at(learned, [a for a, _ in spans], 1)
            np.add.at(learned, [b for _, b in spans], -1)
        before = np.concatenate([[0], np.cumsum(np.cumsum(learned)[:-1] > 0)])  # learned characters before each one
        is_learned = before[np.minimum(end, base)] > before[np.minimum(start, base)]
        labels = np.where(is_learned, ids, IGNORE).astype(np.int32)
        bounds = np.cumsum(counts)[:-1]
        return list(zip(np.split(ids, bounds), np.split(labels, bounds), np.split(offsets[:, 0], bounds)))

    def _encode_piecewise(self, renders):
        texts = [p.text for pieces in renders for p in pieces if not p.special]
        encoded = iter(self.encode_texts(texts))
        out = []
        for pieces in renders:
            ids: List[int] = []
            labels: List[int] = []
            starts: List[int] = []
            pos = 0
            for p in pieces:
                piece_ids = [self.special_ids[p.text]] if p.special else next(encoded)
                ids += piece_ids
                labels += piece_ids if p.learned else [IGNORE] * len(piece_ids)
                starts += [pos] * len(piece_ids)
                pos += len(p.text)
            out.append((np.asarray(ids, np.int32), np.asarray(labels, np.int32), np.asarray(starts, np.int64)))
        return out

    def fit(self, sample: Encoded, answer_room: int) -> Tuple[np.ndarray, np.ndarray, bool, bool]:
        """Cut a conversation to ``seq_len``: the prompt first, from the left, keeping the head (prefix
        and system message), down to ``max_prompt_len`` or to what leaves ``answer_room`` tokens for
        the answer (but not below half of seq_len): whole oldest turns when the rest fits, else
        inside the last question; then an answer still too long at its end.
        Returns ids, labels, whether the prompt and whether the answer was cut."""
        L, a = self.seq_len, sample.answer_start
        budget = max(L - answer_room, min(a, L // 2))
        if self.max_prompt_len is not None:
            budget = min(budget, self.max_prompt_len)
        ids, labels, cut_prompt = sample.ids, sample.labels, a > budget
        if cut_prompt:
            head = sample.head if sample.head < budget else 0
            cut = a - (budget - head)
            whole_turns = sample.turn_starts[(sample.turn_starts >= cut) & (sample.turn_starts < a)]
            cut = int(whole_turns[0]) if len(whole_turns) else cut  # drop the oldest turns whole when one fits
            keep = np.r_[0:head, cut:len(ids)]
            ids, labels = ids[keep], labels[keep]
        return ids[:L], labels[:L], cut_prompt, len(ids) > L

    def check_round_trip(self, texts: List[str]) -> None:
        """Refuse a broken tokenizer (one that encodes text to nothing, to a handful of ids or to
        unknown tokens, e.g. a slow-to-fast conversion gone wrong) before it writes a useless dataset."""
        texts = [t for t in texts if t.strip()]
        if not texts:
            return
        chars = sum(len("".join(t.split())) for t in texts)
        ids = self.encode_texts(texts)
        back = sum(len("".join(self.tok.decode(i, skip_special_tokens=True).split())) for i in ids)
        if back < chars / 2:
            raise ValueError(f"the tokenizer encodes {chars} characters of the first {len(texts)} records to "
                             f"{sum(map(len, ids))} tokens that decode back to {back} characters: it loses the text "
                             "(a broken tokenizer, e.g. a slow-to-fast conversion gone wrong); use the model's own tokenizer")

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
        chats = self.encode_chats([r for r in records if isinstance(r, Chat)])
        result.tokens = sum(len(d) for d in docs) + sum(len(c.ids) for c in chats)
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
        for c in chats:
            if len(c.ids) > L and self.mode == "split":
                samples += [(c.ids[i:i + L], c.labels[i:i + L]) for i in range(0, len(c.ids), L)]
                continue
            ids, labels, cut_prompt, cut_answer = self.fit(c, len(c.ids) - c.answer_start)
            _count_cuts(result, cut_prompt, cut_answer)
            if (labels == IGNORE).all():
                result.skipped["too_long"] = result.skipped.get("too_long", 0) + 1
            else:
                samples.append((ids, labels))
        if self.mode == "split":  # windows that hold no answer teach nothing
            samples = [s for s in samples if (s[1] != IGNORE).any()]
        if self.mode == "pack":
            result.rows = self._pad_rows(self._pack(samples), packed=True)
        else:
            result.rows = self._pad_rows(rows + samples)

    def _pack(self, samples):
        """Next-fit: samples in order, a new row when the next one does not fit. Each sample keeps
        its own positions (0, 1, ...), from which the model builds attention that does not cross
        samples; a sample's first token is never a target (it would be predicted from the sample before)."""
        rows, parts = [], []
        for s_ids, s_labels in samples:
            if parts and sum(len(p[0]) for p in parts) + len(s_ids) > self.seq_len:
                rows.append(tuple(np.concatenate(x) for x in zip(*parts)))
                parts = []
            s_labels = s_labels.copy()
            s_labels[:1] = IGNORE
            parts.append((s_ids, s_labels, np.arange(len(s_ids), dtype=np.int32)))
        if parts:
            rows.append(tuple(np.concatenate(x) for x in zip(*parts)))
        return rows

    def _pad_rows(self, rows, prefix="", packed=False):
        n, L = len(rows), self.seq_len
        ids = np.full((n, L), self.pad_id, np.int32)
        mask = np.zeros((n, L), np.int32)
        labels = np.full((n, L), IGNORE, np.int32)
        positions = np.tile(np.arange(L, dtype=np.int32), (n, 1))
        for i, row in enumerate(rows):
            k = len(row[0])
            ids[i, :k], mask[i, :k], labels[i, :k] = row[0], 1, row[1]
            if packed:  # the padding after the last sample is a sequence of its own
                positions[i, :k], positions[i, k:] = row[2], np.arange(L - k)
        out = {f"{prefix}input_ids": ids, f"{prefix}attention_mask": mask, f"{prefix}labels": labels}
        return {**out, f"{prefix}position_ids": positions} if packed else out

    def _preference_rows(self, records, result):
        """Chosen and rejected of one prompt in the same row of their two files. A pair too long
        keeps both sides: their shared prompt is cut alike (from the left), then an answer at its end."""
        sides = self.encode_chats([Chat(r.prompt.turns + [Turn("assistant", [(answer, True)])], r.prompt.system)
                                   for r in records for answer in (r.chosen, r.rejected)])
        result.tokens = sum(len(c.ids) for c in sides)
        for side in sides:  # only the compared answers are scored, not the answers in the prompt's history
            side.labels[:side.answer_start] = IGNORE
        chosen, rejected = [], []
        for c, r in zip(sides[0::2], sides[1::2]):
            room = max(len(c.ids) - c.answer_start, len(r.ids) - r.answer_start)
            c_ids, c_labels, c_prompt, c_answer = self.fit(c, room)
            r_ids, r_labels, r_prompt, r_answer = self.fit(r, room)
            _count_cuts(result, c_prompt or r_prompt, c_answer or r_answer)
            if (c_labels == IGNORE).all() or (r_labels == IGNORE).all():
                result.skipped["too_long"] = result.skipped.get("too_long", 0) + 1
                continue
            chosen.append((c_ids, c_labels))
            rejected.append((r_ids, r_labels))
        result.rows = {**self._pad_rows(chosen, "chosen_"), **self._pad_rows(rejected, "rejected_")}

    def _prompt_rows(self, records, result):
        """Prompts for generation: left-padded (the answer is generated to the right) and, when too
        long, cut on the left (keeping the system message) so that the cue handing over to the
        assistant survives."""
        chats = [r.prompt if isinstance(r, (Prompt, Preference)) else Chat(r.turns[:-1], r.system) for r in records]
        encoded = self.encode_chats(chats, generation_prompt=True)
        result.tokens = sum(len(c.ids) for c in encoded)
        L = self.seq_len
        ids = np.full((len(encoded), L), self.pad_id, np.int32)
        mask = np.zeros((len(encoded), L), np.int32)
        for i, c in enumerate(encoded):
            r_ids, _, cut_prompt, _ = self.fit(c, 0)
            _count_cuts(result, cut_prompt, False)
            ids[i, L - len(r_ids):] = r_ids
            mask[i, L - len(r_ids):] = 1
        result.rows = {"input_ids": ids, "attention_mask": mask}


def _count_cuts(result: ChunkResult, cut_prompt: bool, cut_answer: bool):
    if cut_prompt or cut_answer:
        result.truncated += 1
        result.prompts_cut += cut_prompt
        result.answers_cut += cut_answer


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
