"""Prompt formats: label masks token by token, special tokens as single ids, every preset's format."""
import glob
import os

import numpy as np
import pytest
from omegaconf import OmegaConf

from hpcllm.data import FORMATS, get_format, load_tokenizer
from hpcllm.data.encode import IGNORE, Encoder, special_id
from hpcllm.data.prompts import Chat, Piece, Turn
from hpcllm.data.records import parse_record

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# What closes every answer, per format, in the demo tokenizer.
EOT = {"pangu": "<eot>", "glm": "<|endofpiece|>", "chatglm": "<eop>", "llama3_chat": "<|eot_id|>", "chatml": "<|im_end|>"}


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("demo")


def encode(tok, fmt_id, record, kind="sft", seq_len=512):
    enc = Encoder(tok, get_format(fmt_id), None, kind, seq_len, "truncate")
    chat = parse_record(record)
    (ids, labels), = enc.encode_pieces([enc.fmt.render(chat, enc.tokens)])
    return enc, ids, labels


def learned_text(tok, ids, labels):
    """The learned spans, decoded one span at a time, so the test sees where each one ends."""
    spans, cur = [], []
    for i, l in zip(ids, labels):
        if l != IGNORE:
            assert l == i  # labels are aligned with input_ids
            cur.append(int(i))
        elif cur:
            spans.append(cur)
            cur = []
    if cur:
        spans.append(cur)
    return [tok.decode(s) for s in spans]


CONV = {"type": "conversation", "rounds": [["ask", "Hi"], ["ans", "Hello!"], ["ask", "2+2?"], ["ans", "4"]]}


@pytest.mark.parametrize("fmt_id", sorted(FORMATS))
def test_every_answer_turn_and_its_end_token_are_learned(tok, fmt_id):
    _, ids, labels = encode(tok, fmt_id, CONV)
    eot = EOT.get(fmt_id, tok.eos_token)
    # a token that spans the cue's trailing space and the answer (" 4") is learned: the model writes it
    spans = [s.lstrip(" ") for s in learned_text(tok, ids, labels)]
    if fmt_id == "llama2_chat":  # the template's " answer </s>"
        assert spans == [f"Hello! {eot}", f"4 {eot}"]
    else:
        assert spans == [f"Hello!{eot}", f"4{eot}"]
    assert (labels[:3] == IGNORE).all()  # the prompt is never learned


def test_alpaca_token_by_token(tok):
    enc, ids, labels = encode(tok, "alpaca", {"instruction": "Add", "input": "2 and 3", "output": "5"})
    prompt = ("Below is an instruction that describes a task, paired with an input that provides further context. "
              "Write a response that appropriately completes the request.\n\n"
              "### Instruction:\nAdd\n\n### Input:\n2 and 3\n\n### Response:\n")
    p_ids = tok.encode(prompt, add_special_tokens=False)
    a_ids = tok.encode("5", add_special_tokens=False)
    sep = tok.encode("\n\n", add_special_tokens=False)
    expected_ids = [tok.bos_token_id] + p_ids + a_ids + [tok.eos_token_id] + sep
    expected_labels = [IGNORE] * (1 + len(p_ids)) + a_ids + [tok.eos_token_id] + [IGNORE] * len(sep)
    assert ids.tolist() == expected_ids
    assert labels.tolist() == expected_labels


def test_chatml_token_by_token(tok):
    _, ids, labels = encode(tok, "chatml", {"prompt": "Hi", "response": "Yo"})
    s, e = tok.convert_tokens_to_ids("<|im_start|>"), tok.convert_tokens_to_ids("<|im_end|>")
    t = lambda x: tok.encode(x, add_special_tokens=False)
    expected = ([s] + t("system\nYou are a helpful assistant.") + [e] + t("\n") + [s] + t("user\nHi") + [e] + t("\n")
                + [s] + t("assistant\n") + t("Yo") + [e] + t("\n"))
    assert ids.tolist() == expected
    learned = [i for i, l in zip(ids, labels) if l != IGNORE]
    assert learned == t("Yo") + [e]


def test_pangu_sep_stays_one_token(tok):
    _, ids, labels = encode(tok, "pangu", {"prompt": "你好", "answer": "您好"})
    sep = tok.convert_tokens_to_ids("<sep>")
    assert ids.tolist() == tok.encode("你好", add_special_tokens=False) + [sep] + tok.encode("您好", add_special_tokens=False) + [tok.convert_tokens_to_ids("<eot>")]
    assert tok.convert_tokens_to_ids("<") not in ids.tolist()


@pytest.mark.parametrize("fmt_id", sorted(FORMATS))
def test_special_tokens_are_single_ids_in_the_demo_tokenizer(tok, fmt_id):
    fmt = get_format(fmt_id)
    for token in fmt.resolve_tokens(None, tok).values():
        tid = special_id(tok, token, fmt_id)
        assert tok.encode(token, add_special_tokens=False) == [tid]


def test_a_missing_special_token_is_a_clear_error(tok):
    with pytest.raises(ValueError, match="no single token '<bogus>'.*pangu"):
        Encoder(tok, get_format("pangu"), {"sep": "<bogus>"}, "sft", 64, "pack")


def test_every_model_preset_names_a_known_format():
    presets = glob.glob(os.path.join(ROOT, "conf", "model", "*.yaml"))
    assert presets
    for path in presets:
        assert OmegaConf.load(path).prompt_format in FORMATS, path


def test_system_text_goes_where_the_family_puts_it(tok):
    chat = Chat([Turn("user", "Q"), Turn("assistant", [("A", True)])], system="SYS")
    text = lambda fid: "".join(p.text for p in get_format(fid).render(chat, get_format(fid).resolve_tokens(None, tok)))
    assert text("llama2_chat").startswith("<s>[INST] <<SYS>>\nSYS\n<</SYS>>\n\nQ [/INST] A </s>")
    assert text("chatml").startswith("<|im_start|>system\nSYS<|im_end|>\n")
    assert text("chatglm2") == "[gMASK]sop[Round 1]\n\n问：SYS\n\nQ\n\n答：A</s>\n\n"
    assert text("chatglm3") == "[gMASK]sop<|system|>\nSYS<|user|>\nQ<|assistant|>\nA</s>"
    assert text("llama3_chat").startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nSYS<|eot_id|>")
    assert text("baichuan2") == "SYS<reserved_106>Q<reserved_107>A</s>"
    assert text("mistral_inst") == "<s>[INST] SYS\n\nQ [/INST]A</s>"


def test_generation_prompt_ends_with_the_assistant_cue(tok):
    fmt = get_format("chatml")
    pieces = fmt.render(Chat([Turn("user", "Q")]), fmt.resolve_tokens(None, tok), generation_prompt=True)
    assert "".join(p.text for p in pieces).endswith("<|im_start|>assistant\n")
    assert not any(p.learned for p in pieces)


def test_tool_results_are_not_learned(tok):
    record = {"type": "conversation", "api_desc": "calc(x)", "rounds": [
        ["ask", "3*4?"],
        ["ans-api", {"actions": [{"thought": "multiply", "api_name": "calc", "params": {"x": "3*4"}, "result": 12}],
                     "answer": "12"}]]}
    _, ids, labels = encode(tok, "chatml", record)
    spans = learned_text(tok, ids, labels)
    assert spans == ['Thought: multiply\nAction: calc\nAction Input: {"x": "3*4"}\n', "12<|im_end|>"]
    assert "Observation: 12" in tok.decode(ids) and "calc(x)" in tok.decode(ids)


def test_pieces_merge_only_alike_neighbours():
    fmt = get_format("bloom")
    pieces = fmt.render(Chat([Turn("user", "Q"), Turn("assistant", [("A", True)])]), {"eos": "</s>"})
    assert pieces == [Piece("Human: Q\n\nAssistant: ", False), Piece("A", True), Piece("</s>", True, True), Piece("\n\n", False)]
    assert np.all([isinstance(p, Piece) for p in pieces])


def test_model_presets_resolve_by_name_dict_or_composed_config():
    from hpcllm.config import compose
    from hpcllm.data import load_model_preset

    assert load_model_preset("tiny_llama")["prompt_format"] == "alpaca"
    assert load_model_preset(compose(["model=tiny_qwen2"]).model)["prompt_format"] == "chatml"
    assert load_model_preset({"prompt_format": "pangu", "special_tokens": {"eot": "<eod>"}})["special_tokens"] == {"eot": "<eod>"}
    with pytest.raises(ValueError, match="unknown model preset 'nope'; valid: .*tiny_llama"):
        load_model_preset("nope")
