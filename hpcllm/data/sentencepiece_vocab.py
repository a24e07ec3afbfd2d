"""SentencePiece tokenizers as the Chinese-LLaMA line builds them: train one with the ``sentencepiece``
library, merge a Chinese vocabulary into LLaMA's, and write either as a Hugging Face tokenizer.

The merge appends the new pieces after every original one, so each original id keeps its meaning (the
model's embedding rows stay valid; only new rows are added). The new pieces keep their own order, ranked
after all original pieces, so the base's merges keep their priority.
"""
from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Iterable, List, Tuple

SPECIAL = {"unk_id": 0, "bos_id": 1, "eos_id": 2, "pad_id": -1}


def train_sentencepiece(texts: Iterable[str], out_dir: str | Path, *, vocab_size: int, model_type: str = "bpe",
                        byte_fallback: bool = True, split_digits: bool = True,
                        character_coverage: float = 0.9995) -> Path:
    """Train ``out_dir/tokenizer.model`` (LLaMA's settings: byte fallback, split digits, no normalization)."""
    import sentencepiece as spm

    if model_type not in ("bpe", "unigram"):
        raise ValueError(f"model_type={model_type!r} is not one of bpe, unigram")
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=(t for t in texts if t), model_writer=model, vocab_size=vocab_size,
            model_type=model_type, byte_fallback=byte_fallback, split_digits=split_digits,
            character_coverage=character_coverage, hard_vocab_limit=False, allow_whitespace_only_pieces=True,
            remove_extra_whitespaces=False, normalization_rule_name="identity", minloglevel=2, **SPECIAL)
    except RuntimeError as err:
        needed = re.search(r"smaller than required_chars\. \d+ vs (\d+)", str(err))
        if not needed:
            raise
        raise ValueError(f"vocab_size={vocab_size} is below the {needed.group(1)} pieces the corpus needs at "
                         f"character_coverage={character_coverage}: raise vocab_size or lower "
                         "character_coverage") from None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.model").write_bytes(model.getvalue())
    return out / "tokenizer.model"


def _proto(path: str | Path):
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(Path(path).read_bytes())
    return proto


def merge_vocab(base_model: str | Path, extra_model: str | Path, out_dir: str | Path) -> Tuple[Path, List[str]]:
    """Append ``extra_model``'s pieces that ``base_model`` lacks; returns (merged tokenizer.model, new pieces)."""
    base, extra = _proto(base_model), _proto(extra_model)
    known = {p.piece for p in base.pieces}
    lowest = min((p.score for p in base.pieces), default=0.0)
    normal = type(extra.pieces[0]).NORMAL
    added = []
    for rank, piece in enumerate(p for p in extra.pieces if p.type == normal and p.piece not in known):
        new = base.pieces.add()
        new.piece, new.score, new.type = piece.piece, lowest - 1.0 - rank, normal
        added.append(piece.piece)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.model").write_bytes(base.SerializeToString())
    return out / "tokenizer.model", added


def to_hf(model_file: str | Path, out_dir: str | Path):
    """Write a Hugging Face (fast) tokenizer for a SentencePiece model, LLaMA-style (Metaspace, byte fallback)."""
    from transformers import LlamaTokenizer

    model_file, out = Path(model_file), Path(out_dir)
    staging = out / ".sentencepiece"
    staging.mkdir(parents=True, exist_ok=True)
    (staging / "tokenizer.model").write_bytes(model_file.read_bytes())
    tokenizer = LlamaTokenizer.from_pretrained(str(staging))
    tokenizer.save_pretrained(str(out))
    (staging / "tokenizer.model").unlink()
    staging.rmdir()
    if model_file.parent.resolve() != out.resolve():
        (out / "tokenizer.model").write_bytes(model_file.read_bytes())
    return tokenizer


def agreement(model_file: str | Path, tokenizer, texts: Iterable[str]) -> float:
    """Share of texts that the Hugging Face tokenizer encodes exactly as SentencePiece itself does."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    texts = [t for t in texts if t]
    same = sum(sp.encode(t) == tokenizer(t, add_special_tokens=False).input_ids for t in texts)
    return same / max(1, len(texts))
