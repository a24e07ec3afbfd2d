"""Train a byte-level BPE tokenizer on a corpus, or extend a tokenizer with new Chinese words.

    python tools/train_tokenizer.py                      # reproduces hpcllm/data/demo_tokenizer
    python tools/train_tokenizer.py input=corpus/ output=my_tok vocab_size=32000
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


def main(argv):
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainTokenizerConfig), OmegaConf.from_cli(argv)))
    if cfg.extend:
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
