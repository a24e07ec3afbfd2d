"""Letter scoring on a model whose logits are known and on a real tiny model against a hand computation,
left padding, and the letter tokens of real tokenizers under each eval.letter_scoring."""
import pytest
import torch

from hpcllm.data import load_tokenizer
from hpcllm.eval.scoring import (choose, continuation_ids, continuation_logprobs, left_pad, letter_logprobs,
                                 resolve_letter_scoring)
from hpcllm.stages.eval import plan_batches

VOCAB, LETTER_IDS = 10, [4, 5, 6, 7]


class FixedLogits(torch.nn.Module):
    """Next-token logits looked up by the current token: row t of ``table`` after token t."""

    def __init__(self, table):
        super().__init__()
        self.table = torch.as_tensor(table, dtype=torch.float32)
        self.calls = []

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        self.calls.append((input_ids, attention_mask, position_ids))
        return self.table[input_ids]


def test_the_most_probable_letter_wins():
    table = torch.zeros(VOCAB, VOCAB)
    table[1, LETTER_IDS] = torch.tensor([0.0, 3.0, 1.0, 2.0])  # after token 1: B
    table[2, LETTER_IDS] = torch.tensor([5.0, 0.0, 0.0, 5.0])  # after token 2: a tie of A and D -> A
    table[2, 9] = 50.0  # a non-letter token more probable than any letter changes nothing
    model = FixedLogits(table)
    lp = letter_logprobs(model, [[3, 1], [2], [3, 3, 3, 2]], LETTER_IDS, pad_id=0)
    assert choose(lp) == [1, 0, 0]
    expected = torch.log_softmax(table[1], -1)[LETTER_IDS]
    assert torch.allclose(lp[0], expected)
    assert lp[1, 0] < -40  # log-probabilities over the whole vocabulary, not renormalized over letters


def test_left_padding_puts_every_prompt_at_the_end():
    ids, mask, pos = left_pad([[7, 8, 9], [5]], pad_id=0)
    assert ids.tolist() == [[7, 8, 9], [0, 0, 5]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert pos.tolist() == [[0, 1, 2], [0, 0, 0]]


def test_batched_and_single_scores_agree_on_a_real_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(config).eval()
    seqs = [[3, 9, 12, 40, 41, 2], [5, 6], [8, 8, 8, 1]]
    batched = letter_logprobs(model, seqs, [10, 11, 12, 13], pad_id=0)
    single = torch.cat([letter_logprobs(model, [s], [10, 11, 12, 13], pad_id=0) for s in seqs])
    assert torch.allclose(batched, single, atol=1e-5)


def test_letter_tokens_follow_the_prompt():
    tok = load_tokenizer("demo")
    scoring = resolve_letter_scoring(tok, "\n答案：")
    assert [tok.convert_ids_to_tokens(list(c)) for c in scoring.continuations] == [["A"], ["B"], ["C"], ["D"]]
    assert (scoring.mode, scoring.fallback) == ("bare_letter", None)


def test_auto_falls_back_to_continuation_and_says_why():
    # " D" is two tokens in the demo vocabulary ("Ġ", "D"): MMLU's " A".." D" are not all single tokens.
    tok = load_tokenizer("demo")
    scoring = resolve_letter_scoring(tok, "\nAnswer:", " ", "auto")
    assert scoring.mode == "continuation" and scoring.requested == "auto"
    assert "not single tokens" in scoring.fallback and "' D'" in scoring.fallback
    assert tok.convert_ids_to_tokens(list(scoring.continuations[3])) == ["Ġ", "D"]
    assert [tuple(continuation_ids(tok, "\nAnswer:", f" {l}")) for l in "ABCD"] == list(scoring.continuations)
    with pytest.raises(ValueError, match="space_letter.*not one distinct token.*continuation"):
        resolve_letter_scoring(tok, "\nAnswer:", " ", "space_letter")
    bare = resolve_letter_scoring(tok, "\nAnswer:", " ", "bare_letter")
    assert bare.mode == "bare_letter" and bare.fallback is None and bare.longest == 1
    with pytest.raises(ValueError, match="letter_scoring='best'; valid: auto"):
        resolve_letter_scoring(tok, "\nAnswer:", " ", "best")


def test_continuation_moves_the_contexts_trailing_space_as_lm_eval():
    tok = load_tokenizer("demo")
    assert continuation_ids(tok, "Answer: ", "D") == continuation_ids(tok, "Answer:", " D")


def test_continuation_score_is_the_hand_summed_log_probability_on_a_real_model():
    """The demo tokenizer has no single " D": each letter's score is the sum of the log-probabilities of its
    tokens, computed here by hand from one unpadded forward over prompt + continuation."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = load_tokenizer("demo")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = LlamaForCausalLM(config).eval()
    scoring = resolve_letter_scoring(tok, "\nAnswer:", " ", "auto")
    assert sorted({len(c) for c in scoring.continuations}) == [1, 2]  # a mix: " A" is one token, " D" two
    prompts = [tok.encode("What is 2+2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer:"), tok.encode("Pick one.\nAnswer:")]
    got = continuation_logprobs(model, prompts, scoring.continuations, pad_id=tok.pad_token_id)
    for row, prompt in enumerate(prompts):
        for col, cont in enumerate(scoring.continuations):
            ids = torch.tensor([prompt + list(cont)])
            with torch.no_grad():
                logprobs = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
            hand = sum(logprobs[len(prompt) - 1 + j, t].item() for j, t in enumerate(cont))
            assert got[row, col].item() == pytest.approx(hand, abs=1e-5)
    single = continuation_logprobs(model, prompts, [(c[-1],) for c in scoring.continuations], tok.pad_token_id)
    assert torch.allclose(single, letter_logprobs(model, prompts, [c[-1] for c in scoring.continuations],
                                                  tok.pad_token_id))


class SpaceLetters:
    """A vocabulary where " A".." D" are single tokens, as in GPT-2's and LLaMA's."""

    vocab = {"Answer:": 1, " A": 2, " B": 3, " C": 4, " D": 5, "A": 6, "B": 7, "C": 8, "D": 9}

    def encode(self, text, add_special_tokens=False):
        out = []
        while text:
            piece = max((p for p in self.vocab if text.startswith(p)), key=len, default=text[0])
            out.append(self.vocab[piece] if piece in self.vocab else 100 + ord(piece))
            text = text[len(piece):]
        return out


def test_space_letter_tokens_are_used_where_single():
    auto = resolve_letter_scoring(SpaceLetters(), "Answer:", " ")
    assert (auto.mode, auto.continuations, auto.fallback) == ("space_letter", ((2,), (3,), (4,), (5,)), None)
    assert resolve_letter_scoring(SpaceLetters(), "Answer:", " ", "bare_letter").continuations == ((6,), (7,), (8,), (9,))
    # C-Eval's answer follows "答案：" with no space: auto scores the bare letter, space_letter the " A" token
    # (SentencePiece's "▁A", which the official C-Eval evaluator scores)
    assert resolve_letter_scoring(SpaceLetters(), "Answer:", "").mode == "bare_letter"
    assert resolve_letter_scoring(SpaceLetters(), "Answer:", "", "space_letter").continuations[0] == (2,)
    with pytest.raises(ValueError, match="not one distinct token"):
        resolve_letter_scoring(SpaceLetters(), "Answer:", "", "bare_letter", letters=("A", "EF"))


def test_batches_do_not_depend_on_the_world_size():
    batches = plan_batches([5, 9, 1, 9, 3], 2)
    assert batches == [[1, 3], [0, 4], [2]]
    shards = [batches[r::2] for r in range(2)]
    assert sorted(b for s in shards for b in s) == sorted(batches)


def sentencepiece_like_tokenizer():
    """A Metaspace ("▁") Unigram tokenizer as LLaMA's: a word-initial letter is "▁A", one inside a word "A"."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pieces = ["<unk>", "<s>", "</s>", "▁", "\n", "答", "案", "：", *"ABCD", *[f"▁{l}" for l in "ABCD"]]
    tok = Tokenizer(models.Unigram([(p, -1.0) for p in pieces], unk_id=0))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def test_ceval_letters_in_a_sentencepiece_vocabulary():
    """C-Eval's official prompt puts the letter right after "答案：", where SentencePiece writes "A"; the official
    evaluator scores tokenizer.encode("A")[-1], which is "▁A": letter_scoring=space_letter reproduces it."""
    tok = sentencepiece_like_tokenizer()
    official_ids = [tok.encode(l, add_special_tokens=False)[-1] for l in "ABCD"]
    assert tok.convert_ids_to_tokens(official_ids) == ["▁A", "▁B", "▁C", "▁D"]
    auto = resolve_letter_scoring(tok, "\n答案：", "", "auto")
    assert auto.mode == "bare_letter" and tok.convert_ids_to_tokens([c[0] for c in auto.continuations]) == list("ABCD")
    space = resolve_letter_scoring(tok, "\n答案：", "", "space_letter")
    assert [c[0] for c in space.continuations] == official_ids
    # lm-eval's ceval-valid writes " A" after "答案：": auto then scores "▁A" too
    assert resolve_letter_scoring(tok, "\n答案：", " ", "auto").continuations == space.continuations
