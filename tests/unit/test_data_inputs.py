"""Nothing lost, nothing silently wrong (issue 13): the output never destroys an input, damaged
and compressed input files, bad conversation content, SIGTERM, a run's damaged prepared data."""
import gzip
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import zstandard

from hpcllm.data import DataError, prepare_memmap

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LINES = [{"text": f"document number {i} " + "words " * 20} for i in range(400)]


def jsonl(records) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()


def prepare(inp, out, **kw):
    kw = {"tokenizer_spec": "demo", "seq_len": 64, "mode": "truncate", "model_preset": "tiny_qwen2", "progress": False, **kw}
    return prepare_memmap(str(inp), str(out), **kw)


@pytest.fixture
def corpus(tmp_path):
    d = tmp_path / "corpus"
    d.mkdir()
    (d / "a.jsonl").write_bytes(jsonl(LINES[:3]))
    (d / "notes.txt").write_text("my notes")
    return d


def tree(path):
    return sorted(os.path.relpath(os.path.join(r, f), path) for r, _, fs in os.walk(path) for f in fs)


# -- overwrite never destroys anything but an earlier output -----------------------------------
@pytest.mark.parametrize("where", ["input dir", "inside input", "input file", "parent of input"])
def test_an_output_that_is_contains_or_lies_in_an_input_is_refused(tmp_path, corpus, where):
    out = {"input dir": corpus, "inside input": corpus / "out", "input file": corpus / "a.jsonl",
           "parent of input": tmp_path}[where]
    inp = corpus / "a.jsonl" if where == "input file" else corpus
    before = tree(tmp_path)
    with pytest.raises(FileExistsError, match="the input"):
        prepare(inp, out, overwrite=True)
    assert tree(tmp_path) == before and (corpus / "notes.txt").read_text() == "my notes"


def test_overwrite_refuses_a_file_and_a_foreign_directory(tmp_path, corpus):
    (tmp_path / "x.jsonl").write_text("precious\n")
    with pytest.raises(FileExistsError, match="existing file"):
        prepare(corpus, tmp_path / "x.jsonl", overwrite=True)
    assert (tmp_path / "x.jsonl").read_text() == "precious\n"
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="not a memmap_gen output"):
        prepare(corpus, other, overwrite=True)
    assert (other / "keep.txt").read_text() == "keep"


def test_overwrite_replaces_an_earlier_output_and_an_empty_dir_is_fine(tmp_path, corpus):
    (tmp_path / "empty").mkdir()
    assert prepare(corpus, tmp_path / "empty")["num_samples"] == 3
    with pytest.raises(FileExistsError, match="pass overwrite=true"):
        prepare(corpus, tmp_path / "empty")
    assert prepare(corpus, tmp_path / "empty", seq_len=32, overwrite=True)["seq_len"] == 32
    assert sorted(os.listdir(tmp_path)) == ["corpus", "empty"]


def test_the_cli_refuses_the_input_as_output(tmp_path, corpus):
    r = subprocess.run([sys.executable, "tools/memmap_gen.py", f"input={corpus}", f"output={corpus}", "tokenizer=demo",
                        "seq_len=32", "overwrite=true", "progress=false"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 1 and "is the input" in r.stderr and tree(corpus) == ["a.jsonl", "notes.txt"]


# -- compressed and damaged input files ------------------------------------------------------
def test_gzip_and_zstd_inputs_read_like_plain_ones(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    (d / "a.jsonl.gz").write_bytes(gzip.compress(jsonl(LINES[:2])))
    (d / "b.json.gz").write_bytes(gzip.compress(json.dumps(LINES[2:4]).encode()))
    (d / "c.json.zst").write_bytes(zstandard.ZstdCompressor().compress(json.dumps(LINES[4:5]).encode()))
    # two frames in one file (zstd files concatenated with cat)
    (d / "d.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(jsonl(LINES[5:6]))
                                    + zstandard.ZstdCompressor().compress(jsonl(LINES[6:8])))
    meta = prepare(d, tmp_path / "out")
    assert meta["num_records"] == 8 and meta["skipped"] == {}


@pytest.mark.parametrize("name", ["big.jsonl.zst", "big.jsonl.gz"])
def test_a_truncated_file_is_a_named_file_error_even_with_on_error_skip(tmp_path, name):
    data = jsonl(LINES * 20)
    packed = zstandard.ZstdCompressor().compress(data) if name.endswith(".zst") else gzip.compress(data)
    (tmp_path / name).write_bytes(packed[:len(packed) // 2])
    with pytest.raises(DataError, match=rf"big.jsonl.{name[-3:].strip('.')}: the file is damaged.*truncated|ended"):
        prepare(tmp_path / name, tmp_path / "out", on_error="skip")
    assert sorted(os.listdir(tmp_path)) == [name]


def test_a_corrupt_zst_names_the_file(tmp_path):
    packed = bytearray(zstandard.ZstdCompressor().compress(jsonl(LINES)))
    packed[20:40] = b"\xff" * 20
    (tmp_path / "bad.jsonl.zst").write_bytes(bytes(packed))
    with pytest.raises(DataError, match="bad.jsonl.zst: the file is damaged"):
        prepare(tmp_path / "bad.jsonl.zst", tmp_path / "out")


def test_a_broken_json_array_names_the_file(tmp_path):
    (tmp_path / "a.json").write_text('[{"text": "one"}, {"text": ')
    with pytest.raises(DataError, match="a.json: not a valid JSON array"):
        prepare(tmp_path / "a.json", tmp_path / "out")


# -- conversation content that is not text ---------------------------------------------------
@pytest.mark.parametrize("content", [None, 42, {"text": "x"}, ["a"]])
def test_conversation_content_that_is_not_text_is_refused_with_file_and_line(tmp_path, content):
    good = {"type": "conversation", "rounds": [["ask", "q"], ["ans", "a"]]}
    bad = {"type": "conversation", "rounds": [["ask", "q"], ["ans", content]]}
    (tmp_path / "c.jsonl").write_bytes(jsonl([good, bad]))
    with pytest.raises(DataError, match=r"c.jsonl:2: round 1: the 'ans' content must be a string"):
        prepare(tmp_path / "c.jsonl", tmp_path / "out")
    meta = prepare(tmp_path / "c.jsonl", tmp_path / "out", on_error="skip")
    assert meta["num_records_used"] == 1 and meta["skipped"] == {"bad_field": 1}


# -- SIGTERM cleans up as Ctrl-C does --------------------------------------------------------
def test_sigterm_removes_the_unfinished_output(tmp_path):
    inp = tmp_path / "big.jsonl"
    inp.write_bytes(jsonl({"text": f"document {i} " + "some words here " * 200} for i in range(6000)))
    code = ("from hpcllm.data import prepare_memmap\n"
            f"prepare_memmap({str(inp)!r}, {str(tmp_path / 'out')!r}, 'demo', 256, num_workers=2, progress=False)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not any(n.startswith("out.tmp-") for n in os.listdir(tmp_path)) and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(0.3)  # into the tokenizing
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0 and "stopped by signal 15" in err
    assert sorted(os.listdir(tmp_path)) == ["big.jsonl"]


# -- a run's prepared data without meta.json -------------------------------------------------
def test_a_run_dir_without_meta_json_says_what_to_do(tmp_path):
    from omegaconf import OmegaConf

    from hpcllm.config import ConfigError
    from hpcllm.launch.datasets import ensure_memmaps

    (tmp_path / "t.jsonl").write_bytes(jsonl(LINES[:4]))
    damaged = tmp_path / "run" / "data" / "train"
    damaged.mkdir(parents=True)
    (damaged / "input_ids.bin").write_bytes(b"\0" * 8)
    cfg = OmegaConf.create({"data": {"train": str(tmp_path / "t.jsonl"), "eval": None, "pretrain": None, "eval_fraction": 0.0,
                                     "mode": "pack"},
                            "method": {"stage": "pretrain", "data_kind": "pretrain", "seq_len": 32},
                            "model": {"tokenizer": "demo", "path": None}, "seed": 1, "eval": {"benchmark": None}})
    with pytest.raises(ConfigError) as e:
        ensure_memmaps(cfg, tmp_path / "run")
    assert "holds no meta.json" in str(e.value) and f"rm -r '{damaged}'" in str(e.value)
    assert "overwrite" not in str(e.value)
    assert (damaged / "input_ids.bin").exists()


# -- mismatches caught before anything runs (issue 16 §6) --------------------------------------
def test_a_broken_tokenizer_is_refused_before_writing(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    broken = Tokenizer(models.WordLevel({"<unk>": 0, "</s>": 1}, unk_token="<unk>"))  # every word is unknown
    broken.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=broken, unk_token="<unk>", eos_token="</s>").save_pretrained(tmp_path / "tok")
    (tmp_path / "t.jsonl").write_bytes(jsonl(LINES[:50]))
    with pytest.raises(ValueError, match="decode back to 0 characters: it loses the text"):
        prepare(tmp_path / "t.jsonl", tmp_path / "out", tokenizer_spec=str(tmp_path / "tok"), model_preset=None)
    assert sorted(os.listdir(tmp_path)) == ["t.jsonl", "tok"]


def test_the_dry_run_checks_prepared_data_against_the_job(tmp_path):
    from hpcllm.config import ConfigError, compose
    from hpcllm.launch.job import prepare as prepare_job

    (tmp_path / "t.jsonl").write_bytes(jsonl(LINES[:8]))
    prepare(tmp_path / "t.jsonl", tmp_path / "data", seq_len=64, model_preset="tiny_llama")
    job = lambda *o: prepare_job(compose(["model=tiny_llama", "method=pretrain", f"data.train={tmp_path / 'data'}", *o]),
                                 tmp_path / "run")
    with pytest.raises(ConfigError, match=r"prepared with seq_len=64 but method.seq_len=.*set method.seq_len=64"):
        job("method.seq_len=128")
    other = tmp_path / "other_tok"
    from hpcllm.data import load_tokenizer

    tok = load_tokenizer("demo")
    tok.add_tokens(["brandnewword"])
    tok.save_pretrained(other)
    with pytest.raises(ConfigError, match=r"tokenized with 'demo' .* set model.tokenizer=demo"):
        job("method.seq_len=64", f"model.tokenizer={other}")
    assert job("method.seq_len=64").cfg.method.seq_len == 64


def test_seq_len_beyond_max_positions_offers_both_fixes_for_a_preset_model():
    from hpcllm.config import ConfigError, compose, derive

    with pytest.raises(ConfigError, match=r"lower method.seq_len, or raise model.max_positions=1024"):
        derive(compose(["model=tiny_llama", "method=sft", "method.seq_len=1024"]))
