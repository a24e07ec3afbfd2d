"""prompt_format=tokenizer (issue 16 §4): the tokenizer's own chat_template renders the conversation,
the assistant turns (with their end token) are learned, and it is the default without a model preset."""
import json
import os
import subprocess
import sys

import pytest

from hpcllm.data import MemmapDataset, get_format, load_tokenizer, prepare_memmap
from hpcllm.data.encode import IGNORE, Encoder
from hpcllm.data.records import parse_record

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Qwen2's template, shortened: system, user, assistant and tool messages as ChatML
TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'tool' %}<|im_start|>user\n<tool_response>\n{{ m['content'] }}\n"
            "</tool_response><|im_end|>\n{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}"
            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
RECORD = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                       {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "3*4?"},
                       {"role": "assistant", "content": None, "tool_calls": [
                           {"function": {"name": "calc", "arguments": "{\"x\": \"3*4\"}"}}]},
                       {"role": "tool", "content": "12"}, {"role": "assistant", "content": "12."}]}


@pytest.fixture(scope="module")
def templated(tmp_path_factory):
    directory = tmp_path_factory.mktemp("templated_tokenizer")
    tok = load_tokenizer("demo")
    tok.chat_template = TEMPLATE
    tok.save_pretrained(directory)
    return str(directory), load_tokenizer(str(directory))


def test_ids_are_the_template_text_and_the_assistant_turns_are_learned(templated):
    _, tok = templated
    enc = Encoder(tok, get_format("tokenizer"), None, "sft", 512, "truncate")
    sample, = enc.encode_chats([parse_record(RECORD)])
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "3*4?"},
                {"role": "assistant", "content": 'Action: calc\nAction Input: {"x": "3*4"}\n'},
                {"role": "tool", "content": "Observation: 12\n"}, {"role": "assistant", "content": "12."}]
    text = tok.apply_chat_template(messages, tokenize=False)
    assert sample.ids.tolist() == tok(text, add_special_tokens=False).input_ids
    spans, cur = [], []
    for i, label in zip(sample.ids, sample.labels):
        if label != IGNORE:
            cur.append(int(i))
        elif cur:
            spans, cur = spans + [tok.decode(cur)], []
    assert spans + ([tok.decode(cur)] if cur else []) == [
        "Hello!<|im_end|>\n", 'Action: calc\nAction Input: {"x": "3*4"}\n<|im_end|>\n', "12.<|im_end|>\n"]
    assert "<tool_response>\nObservation: 12\n\n</tool_response>" in tok.decode(sample.ids)


def test_generation_prompts_end_with_the_templates_cue(templated):
    _, tok = templated
    enc = Encoder(tok, get_format("tokenizer"), None, "prompt", 64, "truncate")
    sample, = enc.encode_chats([parse_record({"prompt": "Hi"}).prompt], generation_prompt=True)
    assert tok.decode(sample.ids) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert (sample.labels == IGNORE).all()


def test_memmap_gen_without_a_model_preset_takes_the_tokenizers_template(templated, tmp_path):
    directory, tok = templated
    (tmp_path / "chat.jsonl").write_text(json.dumps(RECORD) + "\n")
    r = subprocess.run([sys.executable, "tools/memmap_gen.py", f"input={tmp_path / 'chat.jsonl'}", f"output={tmp_path / 'out'}",
                        f"tokenizer={directory}", "seq_len=128", "progress=false"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    ds = MemmapDataset(str(tmp_path / "out"))
    assert ds.meta["prompt_format"] == "tokenizer" and ds.meta["kind"] == "sft"
    assert tok.decode(ds[0]["input_ids"][ds[0]["attention_mask"] == 1]).startswith("<|im_start|>system\nBe brief.")


def test_a_tokenizer_without_a_template_and_no_preset_is_a_clear_error(tmp_path):
    (tmp_path / "chat.jsonl").write_text(json.dumps(RECORD) + "\n")
    with pytest.raises(ValueError, match="needs a prompt format: set model=.*or use a tokenizer with a chat_template"):
        prepare_memmap(str(tmp_path / "chat.jsonl"), str(tmp_path / "out"), "demo", 64, progress=False)
