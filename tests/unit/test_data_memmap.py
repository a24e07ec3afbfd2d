"""The memmap writer: formats and kinds end to end, packing, shuffling, bad input, atomic output."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import zstandard

from hpcllm.data import DataError, MemmapDataset, load_tokenizer, prepare_memmap, tokenizer_hash
from hpcllm.data import memmap as memmap_module
from hpcllm.data.encode import IGNORE

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEMO = os.path.join(ROOT, "data", "demo")


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("demo")


@pytest.fixture
def tmp(tmp_path):
    d = tmp_path / "a dir with spaces"
    d.mkdir()
    return d


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n")
    return str(path)


def prepare(inp, out, **kw):
    kw = {"tokenizer_spec": "demo", "seq_len": 64, "mode": "truncate", "model_preset": "tiny_qwen2", "progress": False, **kw}
    return prepare_memmap(str(inp), str(out), **kw)


MIXED = [
    {"text": "plain text"},
    {"title": "T", "content": "WuDao style"},
    {"text": "Pile style", "meta": {"pile_set_name": "x"}},
    {"instruction": "Q1", "input": "I", "output": "A1"},
    {"instruct": "Q2", "output": "A2"},
    {"prompt": "Q3", "answer": "A3"},
    {"prompt": "Q4", "response": "A4"},
    {"type": "conversation", "rounds": [["ask", "a"], ["ask", "b"], ["ans", "A5"], ["ask", "c"], ["ans", "A6"]]},
]


def test_mixed_file_every_record_format(tmp, tok):
    meta = prepare(write_jsonl(tmp / "mixed.jsonl", MIXED), tmp / "out", seed=0)
    ds = MemmapDataset(str(tmp / "out"))
    assert meta["kind"] == "pretrain" and len(ds) == len(MIXED) and meta["num_records_used"] == len(MIXED)
    learned = sorted(tok.decode([int(i) for i, l in zip(r["input_ids"], r["labels"]) if l != IGNORE])
                     for r in (ds[i] for i in range(len(ds))))
    im_end = "<|im_end|>"
    assert learned == sorted(["plain text</s>", "T\nWuDao style</s>", "Pile style</s>", f"A1{im_end}", f"A2{im_end}",
                              f"A3{im_end}", f"A4{im_end}", f"A5{im_end}A6{im_end}"])
    for key, spec in meta["files"].items():
        assert spec["shape"] == [len(MIXED), 64] and os.path.getsize(tmp / "out" / f"{key}.bin") == len(MIXED) * 64 * np.dtype(spec["dtype"]).itemsize
    assert meta["files"]["input_ids"]["dtype"] == "uint16" and meta["files"]["labels"]["dtype"] == "int32"
    assert meta["tokenizer"] == {"name": "demo", "hash": tokenizer_hash(tok), "vocab_size": len(tok), "pad_token_id": tok.pad_token_id,
                                 "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}
    assert meta["prompt_format"] == "chatml" and meta["seed"] == 0 and meta["inputs"][0]["size"] > 0
    assert len(meta["inputs"][0]["sha256"]) == 64
    padding = 1 - sum(ds[i]["attention_mask"].sum() for i in range(len(ds))) / (len(ds) * 64)
    assert meta["padding_ratio"] == pytest.approx(padding, abs=1e-6)


def test_pretrain_pack_fills_rows_and_learns_every_token(tmp):
    meta = prepare(os.path.join(DEMO, "pretrain.jsonl"), tmp / "out", mode="pack", model_preset=None, seq_len=128)
    ds = MemmapDataset(str(tmp / "out"))
    masks = np.stack([ds[i]["attention_mask"] for i in range(len(ds))])
    assert (masks.sum(1) == 128).sum() == len(ds) - 1  # only the last row is padded
    assert meta["num_tokens"] == meta["num_learned_tokens"] and meta["padding_ratio"] < 1 / len(ds)


def test_split_mode_keeps_every_token_in_windows(tmp, tok):
    text = " ".join(f"word{i}" for i in range(200))
    meta = prepare(write_jsonl(tmp / "t.jsonl", [{"text": text}]), tmp / "out", mode="split", seq_len=32, model_preset=None)
    n_tokens = len(tok.encode(text, add_special_tokens=False)) + 1
    assert meta["num_tokens"] == n_tokens and meta["num_samples"] == -(-n_tokens // 32)


def test_sft_pack_keeps_per_sample_masks(tmp, tok):
    records = [{"prompt": f"Q{i}", "answer": f"A{i}"} for i in range(30)]
    meta = prepare(write_jsonl(tmp / "s.jsonl", records), tmp / "out", mode="pack", seq_len=128, model_preset="pangu_350m")
    ds = MemmapDataset(str(tmp / "out"))
    assert meta["kind"] == "sft" and len(ds) < 30  # several samples a row
    eot, sep = tok.convert_tokens_to_ids("<eot>"), tok.convert_tokens_to_ids("<sep>")
    answers = []
    for i in range(len(ds)):
        row = ds[i]
        n = int(row["attention_mask"].sum())
        ids, labels = row["input_ids"][:n].tolist(), row["labels"][:n].tolist()
        # every sample is "Q<sep>A<eot>": learned exactly from after <sep> to <eot>, sample by sample
        start = 0
        for end in [j for j, t in enumerate(ids) if t == eot]:
            s = ids.index(sep, start)
            assert all(l == IGNORE for l in labels[start:s + 1])
            assert labels[s + 1:end + 1] == ids[s + 1:end + 1]
            answers.append(tok.decode(ids[s + 1:end]))
            start = end + 1
        assert start == n
    assert sorted(answers) == sorted(f"A{i}" for i in range(30))


def test_preference_rows_are_aligned_and_learn_responses_only(tmp, tok):
    prepare(os.path.join(DEMO, "preference.jsonl"), tmp / "out", seq_len=96, model_preset="tiny_llama", mode="pack")
    ds = MemmapDataset(str(tmp / "out"))
    assert ds.kind == "preference" and ds.meta["mode"] == "truncate" and len(ds) == 200
    pairs = {(r["prompt"], r["chosen"] + "</s>", r["rejected"] + "</s>")
             for r in map(json.loads, open(os.path.join(DEMO, "preference.jsonl"), encoding="utf-8"))}
    for i in range(0, 200, 37):
        row = ds[i]
        sides = {}
        for side in ("chosen", "rejected"):
            ids, labels = row[f"{side}_input_ids"], row[f"{side}_labels"]
            sides[side] = tok.decode([int(t) for t, l in zip(ids, labels) if l != IGNORE])
            prompt_len = int(np.argmax(labels != IGNORE))
            sides[side + "_prompt"] = ids[:prompt_len].tolist()
        assert sides["chosen_prompt"] == sides["rejected_prompt"]  # same prompt, same row
        question = tok.decode(sides["chosen_prompt"]).split("### Instruction:\n")[1].split("\n\n### Response")[0]
        assert (question, sides["chosen"], sides["rejected"]) in pairs


def test_prompt_kind_is_left_padded(tmp, tok):
    meta = prepare(os.path.join(DEMO, "prompt.jsonl"), tmp / "out", seq_len=48)
    ds = MemmapDataset(str(tmp / "out"))
    assert ds.kind == "prompt" and meta["padding_side"] == "left" and set(meta["files"]) == {"input_ids", "attention_mask"}
    row = ds[0]
    assert row["attention_mask"][-1] == 1 and row["attention_mask"][0] == 0
    assert tok.decode(row["input_ids"][row["attention_mask"] == 1]).endswith("<|im_start|>assistant\n")


def test_shuffle_is_seeded_and_a_permutation(tmp):
    inp = write_jsonl(tmp / "n.jsonl", [{"text": f"number {i}"} for i in range(300)])
    def rows(out, seed):
        prepare(inp, out, seed=seed, model_preset=None)
        return [MemmapDataset(str(out))[i]["input_ids"].tobytes() for i in range(300)]

    a, b, c = rows(tmp / "a", 1), rows(tmp / "b", 1), rows(tmp / "c", 2)
    assert a == b and a != c and sorted(a) == sorted(c) and len(set(a)) == 300


def test_workers_give_the_same_bytes(tmp, monkeypatch):
    monkeypatch.setattr(memmap_module, "CHUNK_RECORDS", 16)
    inp = os.path.join(DEMO, "sft.jsonl")
    prepare(inp, tmp / "one", mode="pack", seq_len=128, num_workers=1)
    prepare(inp, tmp / "two", mode="pack", seq_len=128, num_workers=2)
    for key in ("input_ids", "attention_mask", "labels"):
        assert (tmp / "one" / f"{key}.bin").read_bytes() == (tmp / "two" / f"{key}.bin").read_bytes()


def test_directories_zst_and_json_arrays(tmp):
    d = tmp / "corpus"
    (d / "sub").mkdir(parents=True)
    write_jsonl(d / "a.jsonl", [{"text": "one"}])
    (d / "sub" / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(b'{"text": "two"}\n{"text": "three"}\n'))
    (d / "c.json").write_text(json.dumps([{"text": "four"}, {"text": "five"}]))
    (d / "ignored.txt").write_text("not data")
    meta = prepare(d, tmp / "out", model_preset=None)
    assert meta["num_records"] == 5 and [os.path.basename(i["path"]) for i in meta["inputs"]] == ["a.jsonl", "c.json", "b.jsonl.zst"]


BAD = [
    {"text": "fine"},
    "{not json",
    {"mystery": 1},
    {"instruction": "Q", "output": ""},
    {"type": "conversation", "rounds": [["ask", "q"], ["ans", "a"], ["ask", "unanswered"]]},
    {"prompt": "Q", "chosen": "a", "rejected": "b"},
]


def test_bad_input_fails_naming_file_and_line(tmp):
    inp = write_jsonl(tmp / "bad.jsonl", BAD)
    with pytest.raises(DataError, match=r"bad\.jsonl:2: not valid JSON .*\[invalid_json\].*on_error=skip"):
        prepare(inp, tmp / "out")
    assert not os.path.exists(tmp / "out") and os.listdir(tmp) == ["bad.jsonl"]


def test_a_line_that_is_not_utf8_is_named(tmp):
    (tmp / "latin1.jsonl").write_bytes('{"text": "ok"}\n{"text": "caf\u00e9"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.jsonl:2: not UTF-8 text \[invalid_utf8\]"):
        prepare(tmp / "latin1.jsonl", tmp / "out")


def test_on_error_skip_counts_by_reason(tmp, capsys):
    meta = prepare(write_jsonl(tmp / "bad.jsonl", BAD), tmp / "out", on_error="skip")
    assert meta["num_samples"] == 1 and meta["num_records"] == 6 and meta["num_records_used"] == 1
    assert meta["skipped"] == {"invalid_json": 1, "unknown_format": 1, "empty_answer": 1, "no_final_answer": 1, "kind_mismatch": 1}
    assert "SKIPPED" in capsys.readouterr().err


def test_an_interrupted_run_leaves_nothing_that_looks_finished(tmp, monkeypatch):
    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(memmap_module, "_write_memmaps", boom)
    with pytest.raises(KeyboardInterrupt):
        prepare(os.path.join(DEMO, "sft.jsonl"), tmp / "out")
    assert os.listdir(tmp) == []


def test_a_killed_run_leaves_only_an_unfinished_temporary_dir(tmp):
    code = ("import os, signal\nfrom hpcllm.data import memmap\n"
            "memmap._write_memmaps = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)\n"
            f"memmap.prepare_memmap({os.path.join(DEMO, 'pretrain.jsonl')!r}, {str(tmp / 'out')!r}, 'demo', 64, progress=False)\n")
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == -9
    left = os.listdir(tmp)
    assert "out" not in left and all(n.startswith("out.tmp-") for n in left)
    with pytest.raises(FileNotFoundError, match="not a finished memmap directory"):
        MemmapDataset(str(tmp / left[0]))


def test_refuses_to_overwrite_unless_asked(tmp):
    inp = os.path.join(DEMO, "prompt.jsonl")
    prepare(inp, tmp / "out", seq_len=32)
    with pytest.raises(FileExistsError, match="overwrite=true"):
        prepare(inp, tmp / "out", seq_len=32)
    assert prepare(inp, tmp / "out", seq_len=48, overwrite=True)["seq_len"] == 48
    assert sorted(os.listdir(tmp)) == ["out"]


def test_eval_fraction_holds_out_rows(tmp):
    inp = write_jsonl(tmp / "p.jsonl", [{"prompt": f"question {i}"} for i in range(100)])
    meta = prepare(inp, tmp / "out", seq_len=32, eval_fraction=0.1)
    ev = MemmapDataset(str(tmp / "out_eval"))
    assert meta["num_samples"] == 90 and len(ev) == 10 and ev.meta["split"] == "eval"
    rows = lambda ds: {ds[i]["input_ids"].tobytes() for i in range(len(ds))}
    assert len(rows(ev) | rows(MemmapDataset(str(tmp / "out")))) == 100


SYSTEM_HEAD = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"


def rows_as_text(tok, ds, prefix=""):
    out = []
    for i in range(len(ds)):
        row = ds[i]
        ids = row[prefix + "input_ids"][row[prefix + "attention_mask"] == 1]
        out.append((tok.decode(ids), tok.decode(row[prefix + "input_ids"][row[prefix + "labels"] != IGNORE])))
    return out


def test_a_too_long_prompt_is_cut_from_the_left_keeping_the_system_message(tmp, tok, capsys):
    long_prompt = " ".join(f"w{i}" for i in range(200))
    records = [{"prompt": long_prompt, "answer": "The answer."}, {"prompt": "Q", "answer": "A " * 100}]
    meta = prepare(write_jsonl(tmp / "s.jsonl", records), tmp / "out", seq_len=48, seed=3)
    texts = dict((t[1], t[0]) for t in rows_as_text(tok, MemmapDataset(str(tmp / "out"))))
    kept = texts["The answer.<|im_end|>"]
    assert kept.startswith(SYSTEM_HEAD) and kept.endswith("w199<|im_end|>\n<|im_start|>assistant\nThe answer.<|im_end|>\n")
    assert "w0 " not in kept
    long_answer = next(t for t in texts.values() if t.startswith(SYSTEM_HEAD + "<|im_start|>user\nQ<|im_end|>"))
    assert "A A A" in long_answer and not long_answer.endswith("<|im_end|>")  # cut at its end
    assert meta["num_samples"] == 2 and meta["skipped_samples"] == {}
    assert (meta["truncated_samples"], meta["truncated_prompts"], meta["truncated_answers"]) == (2, 1, 1)
    assert "2 samples truncated (prompt cut from the left in 1, answer cut at the end in 1)" in capsys.readouterr().err


def test_max_prompt_len_caps_every_prompt(tmp, tok):
    prompt = " ".join(f"w{i}" for i in range(30))
    meta = prepare(write_jsonl(tmp / "s.jsonl", [{"prompt": prompt, "answer": "yes"}]), tmp / "out", seq_len=256,
                   max_prompt_len=24)
    ds = MemmapDataset(str(tmp / "out"))
    labels = ds[0]["labels"]
    first_learned = int(np.flatnonzero(labels != IGNORE)[0])
    assert first_learned <= 24 and meta["truncated_prompts"] == 1 and meta["max_prompt_len"] == 24
    assert rows_as_text(tok, ds)[0][0].startswith(SYSTEM_HEAD) and rows_as_text(tok, ds)[0][1] == "yes<|im_end|>"
    with pytest.raises(ValueError, match="max_prompt_len=256: must be between 1 and seq_len-1=255"):
        prepare(tmp / "s.jsonl", tmp / "out2", seq_len=256, max_prompt_len=256)


def test_a_preference_pair_too_long_keeps_both_sides_by_cutting_the_shared_prompt(tmp, tok, capsys):
    history = [r for i in range(12) for r in (["ask", f"question {i} " + "filler " * 5], ["ans", f"answer {i}"])]
    records = [{"rounds": history + [["ask", "last question"]], "chosen": "good answer", "rejected": "bad"}] * 3
    meta = prepare(write_jsonl(tmp / "p.jsonl", records), tmp / "out", seq_len=64)
    ds = MemmapDataset(str(tmp / "out"))
    assert len(ds) == 3 and meta["skipped_samples"] == {} and meta["truncated_samples"] == 3
    (chosen, c_learned), = set(rows_as_text(tok, ds, "chosen_"))
    (rejected, r_learned), = set(rows_as_text(tok, ds, "rejected_"))
    assert c_learned == "good answer<|im_end|>" and r_learned == "bad<|im_end|>"
    assert chosen.startswith(SYSTEM_HEAD) and rejected.startswith(SYSTEM_HEAD)
    assert chosen.rsplit("assistant\n", 1)[0] == rejected.rsplit("assistant\n", 1)[0]  # the same prompt, cut alike
    assert "last question" in chosen and "question 0 " not in chosen
    assert chosen[len(SYSTEM_HEAD):].startswith("<|im_start|>user\nquestion ")  # the oldest turns dropped whole
    assert "3 pairs truncated (prompt cut from the left in 3, answer cut at the end in 0)" in capsys.readouterr().err


def test_cli(tmp):
    out = tmp / "cli out"
    run = lambda *args: subprocess.run([sys.executable, "tools/memmap_gen.py", *args], cwd=ROOT, capture_output=True, text=True)
    r = run(f"input={DEMO}/sft.jsonl", f"output={out}", "tokenizer=demo", "model=chatglm2_6b", "seq_len=128",
            "mode=pack", "kind=sft", "num_workers=2", "seed=7", "on_error=fail", "progress=false")
    assert r.returncode == 0, r.stderr
    meta = json.loads((out / "meta.json").read_text())
    assert meta["prompt_format"] == "chatglm2" and meta["seed"] == 7 and meta["special_tokens"]["sop"] == "sop"
    r = run("inptu=x", "output=y", "seq_len=8")
    assert r.returncode == 2 and "valid keys: input, output" in r.stderr
    r = run("--help")
    assert r.returncode == 0 and "Key '--help'" not in r.stdout + r.stderr
    assert re.search(r"  max_prompt_len +cap on a sample's prompt tokens", r.stdout) and "  num_workers " in r.stdout
    assert re.search(r"  trust_remote_code +run the tokenizer's own Python code", r.stdout)
    assert re.search(r"  seq_len +tokens a row holds \(the job's method.seq_len\) \(default: required\)", r.stdout)


def test_ctrl_c_stops_the_workers_and_removes_the_unfinished_output(tmp):
    inp = write_jsonl(tmp / "big.jsonl", [{"text": f"document {i} " + "some words here " * 200} for i in range(6000)])
    code = ("import signal, sys\nsignal.signal(signal.SIGINT, signal.default_int_handler)\n"
            "from hpcllm.data import prepare_memmap\n"
            f"prepare_memmap({inp!r}, {str(tmp / 'out')!r}, 'demo', 256, num_workers=2, progress=False)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not any(n.startswith("out.tmp-") for n in os.listdir(tmp)) and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(0.3)  # into the tokenizing
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0 and "KeyboardInterrupt" in err
    assert sorted(os.listdir(tmp)) == ["big.jsonl"]


def test_sft_split_keeps_windows_that_hold_answers(tmp, tok):
    rounds = [r for i in range(8) for r in (["ask", f"question {i} " + "filler " * 10], ["ans", f"answer {i}"])]
    meta = prepare(write_jsonl(tmp / "c.jsonl", [{"type": "conversation", "rounds": rounds}]), tmp / "out",
                   mode="split", seq_len=32, kind="sft")
    ds = MemmapDataset(str(tmp / "out"))
    learned = [int(t) for i in range(len(ds)) for t, l in zip(ds[i]["input_ids"], ds[i]["labels"]) if l != IGNORE]
    assert all((ds[i]["labels"] != IGNORE).any() for i in range(len(ds)))
    assert sorted(tok.decode(learned).split("<|im_end|>")[:-1]) == sorted(f"answer {i}" for i in range(8))
    assert meta["truncated_samples"] == 0


SEED_FILE = """[
  {"type": "pretrain", "text": "Cai Xukun is a Chinese singer-songwriter."},
  {"type": "instruct", "instruct": "Fill out the blank", "input": "loves ______", "output": "playing basketball"},
  {"type": "instruct", "instruct": "Write a poem about rain.", "output": "Rain is falling all around"},
  {"type": "conversation", "rounds": [["ask", "Hello"], ["ans", "Hello, what can I do for you ?"],
      ["ask", "Who is caixukun?"], ["ask", "When was caixukun born?"], ["ans", "In the year of 1998."]]},
  {"type": "conver_has_api", "api_desc": "search: Search the book.", "rounds": [["ask", "find love"],
      ["ans-api", {"actions": [{"inner_thought": "use search", "api_name": "search", "api_param": "{\\"query\\": \\"love\\"}",
                               "api_res": "Status Code: 200. Mark 12:31"}], "ans": "Mark 12:31."}]]},
  {"type": "ref_qa", "reference": "On January 10, 2019, Kun was named ambassador.",
   "rounds": [["ask", "When was Kun named?"], ["ans", "On January 10, 2019"]]}
]"""


def test_the_seeds_json_array_file_verbatim(tmp, tok):
    (tmp / "seed.json").write_text(SEED_FILE, encoding="utf-8")
    meta = prepare(tmp / "seed.json", tmp / "out", kind="sft", seq_len=256)
    assert meta["num_records_used"] == 6 and meta["skipped"] == {}
    ds = MemmapDataset(str(tmp / "out"))
    texts = {}
    for i in range(len(ds)):
        ids, labels = ds[i]["input_ids"], ds[i]["labels"]
        texts[tok.decode(ids[ds[i]["attention_mask"] == 1])] = tok.decode(ids[labels != IGNORE])
    api = next(t for t in texts if "search" in t)
    assert "Observation: Status Code: 200. Mark 12:31" in api and "search: Search the book." in api
    assert texts[api] == ('Thought: use search\nAction: search\nAction Input: {"query": "love"}\n'
                          "Mark 12:31.<|im_end|>")
    assert any("Reference:\nOn January 10, 2019" in t for t in texts)
    assert any("Who is caixukun?\nWhen was caixukun born?" in t for t in texts)


def test_multi_turn_preference_pairs_from_public_formats(tmp):
    records = [
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}, {"from": "human", "value": "joke?"}],
         "chosen": {"from": "gpt", "value": "A pun."}, "rejected": {"from": "gpt", "value": "No."}},
        {"chosen": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: joke?\n\nAssistant: A pun.",
         "rejected": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: joke?\n\nAssistant: No."}]
    meta = prepare(write_jsonl(tmp / "p.jsonl", records), tmp / "out", seq_len=64)
    ds = MemmapDataset(str(tmp / "out"))
    assert meta["kind"] == "preference" and len(ds) == 2
    assert (ds[0]["chosen_input_ids"] == ds[1]["chosen_input_ids"]).all()  # both formats give the same sample


def test_an_unknown_format_names_the_keys_and_the_formats(tmp):
    with pytest.raises(DataError, match=r"q.jsonl:1: a record with keys \['question', 'reply'\] matches no known format; "
                                        r"known: .*ShareGPT"):
        prepare(write_jsonl(tmp / "q.jsonl", [{"question": "q", "reply": "a"}]), tmp / "out")
