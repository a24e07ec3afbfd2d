"""The bundled demo tokenizer and tools/train_tokenizer.py."""
import os
import subprocess
import sys

import pytest

from hpcllm.data import DEMO_TOKENIZER_DIR, load_tokenizer
from hpcllm.data.tokenizer import demo_special_tokens, extend_vocab

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("demo")


def test_demo_tokenizer_fits_the_tiny_models(tok):
    assert len(tok) <= 4096  # the tiny presets have vocab_size 4096
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == ("<s>", "</s>", "<pad>", "<unk>")
    for t in demo_special_tokens():
        assert len(tok.encode(t, add_special_tokens=False)) == 1, t


def test_any_text_round_trips(tok):
    text = "Mixed 中文 and English, emoji 🙂, tabs\tand ünïcödé; 数字 12345."
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    assert "sop" not in tok.tokenize("philosophy")  # a whole-word special token only


def test_load_tokenizer_paths(tok):
    assert load_tokenizer(None, model_path=DEMO_TOKENIZER_DIR).get_vocab() == tok.get_vocab()
    assert len(load_tokenizer(DEMO_TOKENIZER_DIR)) == len(tok)
    with pytest.raises(ValueError, match="model.tokenizer"):
        load_tokenizer(None)


def test_train_tokenizer_reproduces_the_bundled_one(tmp_path):
    r = subprocess.run([sys.executable, "tools/train_tokenizer.py", f"output={tmp_path / 'tok'}"], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    with open(tmp_path / "tok" / "tokenizer.json") as a, open(os.path.join(DEMO_TOKENIZER_DIR, "tokenizer.json")) as b:
        assert a.read() == b.read()


def test_extend_adds_frequent_chinese_words(tok):
    tok = load_tokenizer("demo")
    before = len(tok)
    new = extend_vocab(tok, ["量子计算机很快。"] * 10 + ["量子纠缠"] * 10, num_new=3)
    assert len(new) == 3 and len(tok) == before + 3
    assert all(len(tok.tokenize(w)) == 1 for w in new) and "量子" in new
