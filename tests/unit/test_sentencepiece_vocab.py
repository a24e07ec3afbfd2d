"""tools/train_tokenizer.py kind=sentencepiece: a real SentencePiece model trained here, merged into a
base vocabulary as Chinese-LLaMA does, written as a Hugging Face tokenizer, the model resized."""
import subprocess
import sys
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

ROOT = Path(__file__).resolve().parents[2]
EN, ZH = ROOT / "data/demo/corpus_en.txt", ROOT / "data/demo/corpus_zh.txt"


def _tool(*args):
    proc = subprocess.run([sys.executable, "tools/train_tokenizer.py", "kind=sentencepiece", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sp")
    _tool(f"input={EN}", f"output={tmp / 'base'}", "vocab_size=400", "with_templates=false")
    base_tok = AutoTokenizer.from_pretrained(tmp / "base")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(base_tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2)
    LlamaForCausalLM(config).save_pretrained(tmp / "model")
    out = _tool(f"input={ZH}", f"output={tmp / 'merged'}", "vocab_size=1200", "with_templates=false",
                f"merge_into={tmp / 'base'}", f"resize_model={tmp / 'model'}", f"output_model={tmp / 'model_zh'}")
    return tmp, out


def test_merge_keeps_every_original_id_and_appends_new_pieces(merged):
    tmp, out = merged
    base = spm.SentencePieceProcessor(model_file=str(tmp / "base/tokenizer.model"))
    new = spm.SentencePieceProcessor(model_file=str(tmp / "merged/tokenizer.model"))
    assert new.get_piece_size() > base.get_piece_size()
    assert all(new.id_to_piece(i) == base.id_to_piece(i) for i in range(base.get_piece_size()))
    assert "every original id is kept" in out


def test_merged_tokenizer_encodes_chinese_in_fewer_tokens(merged):
    tmp, _ = merged
    base, new = AutoTokenizer.from_pretrained(tmp / "base"), AutoTokenizer.from_pretrained(tmp / "merged")
    text = ZH.read_text()[:2000]
    assert len(new(text).input_ids) < 0.7 * len(base(text).input_ids)
    assert new.decode(new(text, add_special_tokens=False).input_ids) == text
    # The Hugging Face tokenizer agrees with SentencePiece itself on the corpus.
    sp = spm.SentencePieceProcessor(model_file=str(tmp / "merged/tokenizer.model"))
    lines = [line for line in ZH.read_text().splitlines() if line][:50]
    assert all(sp.encode(line) == new(line, add_special_tokens=False).input_ids for line in lines)


def test_resized_model_gets_mean_rows_and_keeps_the_old_ones(merged):
    tmp, _ = merged
    old = AutoModelForCausalLM.from_pretrained(tmp / "model")
    new = AutoModelForCausalLM.from_pretrained(tmp / "model_zh")
    n_old, n_new = old.config.vocab_size, len(AutoTokenizer.from_pretrained(tmp / "merged"))
    assert new.config.vocab_size == n_new > n_old
    for get in ("get_input_embeddings", "get_output_embeddings"):
        w_old, w_new = getattr(old, get)().weight, getattr(new, get)().weight
        assert torch.equal(w_new[:n_old], w_old)
        assert torch.allclose(w_new[n_old:], w_old.mean(dim=0).expand(n_new - n_old, -1), atol=1e-6)


def test_unigram_model_type_trains(tmp_path):
    out = _tool(f"input={ZH}", f"output={tmp_path / 'uni'}", "vocab_size=1200", "model_type=unigram",
                "with_templates=false")
    assert (tmp_path / "uni/tokenizer.model").is_file() and "unigram tokenizer" in out


def test_a_vocabulary_too_small_for_the_corpus_says_what_to_change(tmp_path):
    proc = subprocess.run([sys.executable, "tools/train_tokenizer.py", "kind=sentencepiece", f"input={ZH}",
                           f"output={tmp_path / 'small'}", "vocab_size=300"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode != 0 and "raise vocab_size or lower character_coverage" in proc.stderr
