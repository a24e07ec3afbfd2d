"""Samples tokenized as the model's reference does (issue 16 §3): with a LLaMA-style SentencePiece
tokenizer (BPE, byte fallback, split digits; converted to a fast tokenizer by transformers, Metaspace
with prepend_scheme=first), a sample's ids are those of the family's whole reference text, special
tokens stay single ids and the labels cover exactly the answers and their end token."""
import io
import os

import numpy as np
import pytest

from hpcllm.data import get_format, load_tokenizer
from hpcllm.data.encode import IGNORE, Encoder
from hpcllm.data.records import parse_record

spm = pytest.importorskip("sentencepiece")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SYSTEM = "You are a careful assistant."
ALPACA = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
DIALOG = [("Is the sky green?", "No, it is blue."), ("什么颜色的天空？", "天空是蓝色的。"), ("What is 12 plus 30?", "42")]
# Each family's reference text of DIALOG (system message for llama2 only), written out by hand from
# the family's own code: Meta's chat_completion, Stanford Alpaca's PROMPT_DICT, ChatGLM-6B's
# build_prompt with [gMASK]<sop> before each answer, Baichuan2's user/assistant token ids.
REFERENCE = {
    "llama2_chat": (f"<s>[INST] <<SYS>>\n{SYSTEM}\n<</SYS>>\n\n{DIALOG[0][0]} [/INST] {DIALOG[0][1]} </s>"
                    f"<s>[INST] {DIALOG[1][0]} [/INST] {DIALOG[1][1]} </s><s>[INST] {DIALOG[2][0]} [/INST] {DIALOG[2][1]} </s>"),
    "alpaca": (f"<s>{ALPACA}\n\n### Instruction:\n{DIALOG[0][0]}\n\n### Response:\n{DIALOG[0][1]}</s>\n\n"
               f"### Instruction:\n{DIALOG[1][0]}\n\n### Response:\n{DIALOG[1][1]}</s>\n\n"
               f"### Instruction:\n{DIALOG[2][0]}\n\n### Response:\n{DIALOG[2][1]}</s>\n\n"),
    "chatglm": "".join(f"[Round {i}]\n问：{q}\n答：[gMASK]<sop>{a}<eop>\n" for i, (q, a) in enumerate(DIALOG)),
    "baichuan2": "".join(f"<reserved_106>{q}<reserved_107>{a}</s>" for q, a in DIALOG),
}
# What the model writes after each generation prompt: from the end of the cue to its end token.
CUE = {"llama2_chat": "[/INST]", "alpaca": "### Response:\n", "chatglm": "<sop>", "baichuan2": "<reserved_107>"}
END = {"llama2_chat": " </s>", "alpaca": "</s>", "chatglm": "<eop>", "baichuan2": "</s>"}


@pytest.fixture(scope="module")
def sp_tokenizer(tmp_path_factory):
    """A LLaMA-style tokenizer trained here, saved as tokenizer.model and loaded as LLaMA's is."""
    corpus = []
    for name in ("corpus_en.txt", "corpus_zh.txt"):
        with open(os.path.join(ROOT, "data", "demo", name), encoding="utf-8") as f:
            corpus += [line for line in f.read().splitlines() if line.strip()]
    corpus += [text.replace("<s>", "").replace("</s>", "\n") for text in REFERENCE.values()] * 20
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=model, model_type="bpe", vocab_size=1400, byte_fallback=True,
        split_digits=True, character_coverage=0.98, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2,
        control_symbols=["[gMASK]", "<sop>", "<eop>", "<reserved_106>", "<reserved_107>"])
    directory = tmp_path_factory.mktemp("llama_style_tokenizer")
    (directory / "tokenizer.model").write_bytes(model.getvalue())
    (directory / "tokenizer_config.json").write_text('{"tokenizer_class": "LlamaTokenizer", "legacy": false}')
    tok = load_tokenizer(str(directory))
    pre = tok.backend_tokenizer.pre_tokenizer
    assert type(pre).__name__ == "Metaspace" and pre.prepend_scheme == "first"
    return tok


def encode(tok, fmt_id, record):
    enc = Encoder(tok, get_format(fmt_id), None, "sft", 1024, "truncate")
    (ids, labels), = enc.encode_pieces([enc.fmt.render(parse_record(record), enc.tokens)])
    return ids, labels


def record_for(fmt_id):
    rounds = [r for q, a in DIALOG for r in (["ask", q], ["ans", a])]
    record = {"type": "conversation", "rounds": rounds}
    return dict(record, system=SYSTEM) if fmt_id == "llama2_chat" else record


@pytest.mark.parametrize("fmt_id", sorted(REFERENCE))
def test_ids_equal_the_whole_reference_text_and_labels_cover_the_answers(sp_tokenizer, fmt_id):
    tok, text = sp_tokenizer, REFERENCE[fmt_id]
    ids, labels = encode(tok, fmt_id, record_for(fmt_id))
    reference = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    assert ids.tolist() == reference["input_ids"]
    # the learned tokens: those that touch an answer and its end token in the reference text
    spans, pos = [], 0
    for _, answer in DIALOG:
        start = text.index(CUE[fmt_id], pos) + len(CUE[fmt_id])
        spans.append((start, text.index(answer + END[fmt_id], start) + len(answer + END[fmt_id])))
        pos = spans[-1][1]
    touches = [any(s < t and b < max(e, s + 1) for b, t in spans) for s, e in reference["offset_mapping"]]
    assert labels.tolist() == [i if t else IGNORE for i, t in zip(reference["input_ids"], touches)]
    learned = tok.decode([i for i in labels if i != IGNORE])
    assert learned.replace(" ", "") == "".join(a + END[fmt_id] for _, a in DIALOG).replace(" ", "")


@pytest.mark.parametrize("fmt_id", sorted(REFERENCE))
def test_special_tokens_stay_single_ids(sp_tokenizer, fmt_id):
    tok = sp_tokenizer
    ids, _ = encode(tok, fmt_id, record_for(fmt_id))
    for name, token in get_format(fmt_id).resolve_tokens(None, tok).items():
        tid = tok.convert_tokens_to_ids(token)
        assert (ids == tid).sum() == REFERENCE[fmt_id].count(token), (name, token)


def test_no_lone_metaspace_before_an_answer_nor_after_an_end_token(sp_tokenizer):
    tok = sp_tokenizer
    ids, labels = encode(tok, "llama2_chat", record_for("llama2_chat"))
    tokens = tok.convert_ids_to_tokens(ids.tolist())
    first_learned = [i for i in range(len(ids)) if labels[i] != IGNORE and (i == 0 or labels[i - 1] == IGNORE)]
    assert [tokens[i] for i in first_learned[:2]] == ["▁No", "▁天空是蓝色的"]  # not "▁" + "No"
    assert tokens[first_learned[2]:first_learned[2] + 3] == ["▁", "4", "2"]  # split digits: the "▁" is learned too
    # tokenizing the prompt and the answer apart gives the lone "▁" the issue reported
    apart = [tok.convert_ids_to_tokens(tok(t, add_special_tokens=False).input_ids) for t in ("[/INST]", " ", "No")]
    assert apart[1:] == [["▁"], ["▁No"]] and tokens[first_learned[0] - 1:first_learned[0] + 1] == ["]", "▁No"]
    ids, _ = encode(tok, "alpaca", record_for("alpaca"))
    tokens = tok.convert_ids_to_tokens(ids.tolist())
    after_eos = tokens[tokens.index("</s>") + 1:tokens.index("</s>") + 3]
    assert after_eos == ["<0x0A>", "<0x0A>"]  # "\n\n" after </s> is two tokens, not "▁" + two


def test_a_slow_tokenizer_without_offsets_is_tokenized_piece_by_piece(monkeypatch):
    tok = load_tokenizer("demo")
    enc = Encoder(tok, get_format("chatml"), None, "sft", 256, "truncate")
    pieces = enc.fmt.render(parse_record({"prompt": "Hi", "response": "Yo"}), enc.tokens)
    (ids, labels), = enc.encode_pieces([pieces])
    enc.backend = None
    (slow_ids, slow_labels), = enc.encode_pieces([pieces])
    assert slow_ids.tolist() == ids.tolist() and np.array_equal(slow_labels, labels)
