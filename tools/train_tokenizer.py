"""Train a tokenizer on a corpus: byte-level BPE (the demo tokenizer) or SentencePiece (LLaMA's kind),
merge a Chinese SentencePiece vocabulary into LLaMA's, or extend a tokenizer with new Chinese words.

    python tools/train_tokenizer.py                      # reproduces hpcllm/data/demo_tokenizer
    python tools/train_tokenizer.py input=corpus/ output=my_tok vocab_size=32000
    python tools/train_tokenizer.py kind=sentencepiece input=zh_corpus/ output=zh_sp vocab_size=20000
    python tools/train_tokenizer.py kind=sentencepiece input=zh_corpus/ output=merged vocab_size=20000 \
        merge_into=llama-7b/ resize_model=llama-7b/ output_model=llama-7b-zh/   # Chinese-LLaMA's recipe
    python tools/train_tokenizer.py extend=path/to/tokenizer input=zh_corpus/ output=extended num_new=2000

Input: files or directories of *.txt (a line is a text) and *.jsonl / *.jsonl.zst / *.json
(every string in a record is a text). The trained tokenizer has every special token the
prompt formats in hpcllm.data.prompts need.
"""
import itertools
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from omegaconf import OmegaConf  # noqa: E402

from hpcllm.data.files import find_inputs, read_lines  # noqa: E402
from hpcllm.data.tokenizer import DEMO_TOKENIZER_DIR, extend_vocab, load_tokenizer, template_texts, train_bpe  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class TrainTokenizerConfig:
    input: str = os.path.join(ROOT, "data", "demo")  # files or directories, comma-separated
    output: str = DEMO_TOKENIZER_DIR
    vocab_size: int = 4096  # all tokens, special tokens included
    min_frequency: int = 2
    max_token_length: Optional[int] = 8  # characters of the byte-level form (a CJK character is 3)
    extend: Optional[str] = None  # a tokenizer to extend instead of training a new one
    num_new: int = 1000  # extend: at most this many new tokens
    with_templates: bool = True  # also train on the prompt formats' fixed text
    kind: str = "byte_bpe"  # byte_bpe (the demo tokenizer's kind) | sentencepiece (LLaMA, Baichuan, ChatGLM)
    model_type: str = "bpe"  # sentencepiece: bpe | unigram
    byte_fallback: bool = True  # sentencepiece: unknown characters become their UTF-8 bytes, never <unk>
    split_digits: bool = True  # sentencepiece: every digit is its own piece
    character_coverage: float = 0.9995  # sentencepiece: share of characters kept as pieces (CJK: 0.9995)
    merge_into: Optional[str] = None  # sentencepiece: a tokenizer dir with tokenizer.model to append new pieces to
    resize_model: Optional[str] = None  # a model dir whose embeddings grow to the merged vocabulary
    output_model: Optional[str] = None  # where the resized model is written


def texts(spec: str):
    for path in find_inputs(spec, suffixes=(".txt", ".jsonl", ".jsonl.zst", ".json")):
        for _, line in read_lines(path):
            if isinstance(line, bytes):
                continue  # not UTF-8
            if path.endswith(".txt"):
                yield line.strip()
            else:
                yield from _strings(json.loads(line))


def _strings(obj):
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v)


def sentencepiece(cfg: TrainTokenizerConfig) -> None:
    from hpcllm.data.sentencepiece_vocab import agreement, merge_vocab, to_hf, train_sentencepiece

    out = Path(cfg.output)
    try:
        trained = train_sentencepiece(texts(cfg.input), out / "trained" if cfg.merge_into else out,
                                      vocab_size=cfg.vocab_size, model_type=cfg.model_type,
                                      byte_fallback=cfg.byte_fallback, split_digits=cfg.split_digits,
                                      character_coverage=cfg.character_coverage)
    except ValueError as err:
        sys.exit(f"train_tokenizer: {err}")
    model_file = trained
    if cfg.merge_into:
        base = Path(cfg.merge_into) / "tokenizer.model"
        if not base.is_file():
            sys.exit(f"merge_into={cfg.merge_into}: no tokenizer.model there (a SentencePiece tokenizer is needed)")
        model_file, added = merge_vocab(base, trained, out)
        print(f"merged {len(added)} new pieces into {base} (e.g. {added[:10]}); every original id is kept")
    tokenizer = to_hf(model_file, out)
    sample = list(itertools.islice(texts(cfg.input), 2000))
    share = agreement(model_file, tokenizer, sample)
    print(f"SentencePiece {cfg.model_type} tokenizer with {len(tokenizer)} tokens saved to {out}; the Hugging Face "
          f"tokenizer encodes {share:.1%} of {len(sample)} corpus texts exactly as SentencePiece does")
    if cfg.resize_model:
        resize(cfg.resize_model, cfg.output_model, len(tokenizer), tokenizer)


def resize(model_dir: str, output_model: Optional[str], vocab_size: int, tokenizer) -> None:
    from transformers import AutoModelForCausalLM

    from hpcllm.models.build import resize_embeddings

    if not output_model:
        sys.exit("resize_model= needs output_model=DIR (the original weights are never overwritten)")
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    added = resize_embeddings(model, vocab_size)
    model.save_pretrained(output_model)
    tokenizer.save_pretrained(output_model)
    print(f"resized {model_dir} by {added} embedding rows (the mean of the old ones) -> {output_model}")


def main(argv):
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainTokenizerConfig), OmegaConf.from_cli(argv)))
    if cfg.kind not in ("byte_bpe", "sentencepiece"):
        sys.exit(f"kind={cfg.kind!r} is not one of byte_bpe, sentencepiece")
    if cfg.kind == "sentencepiece":
        sentencepiece(cfg)
    elif cfg.extend:
        tok = load_tokenizer(cfg.extend)
        before = len(tok)
        new = extend_vocab(tok, texts(cfg.input), cfg.num_new)
        tok.save_pretrained(cfg.output)
        print(f"added {len(new)} tokens ({before} -> {len(tok)}), e.g. {new[:10]}; "
              f"resize the model's embeddings to {len(tok)}; saved to {cfg.output}")
    else:
        corpus = itertools.chain(texts(cfg.input), template_texts() if cfg.with_templates else [])
        size = train_bpe(corpus, cfg.output, cfg.vocab_size, cfg.min_frequency, cfg.max_token_length)
        print(f"trained a byte-level BPE tokenizer with {size} tokens; saved to {cfg.output}")


if __name__ == "__main__":
    main(sys.argv[1:])
