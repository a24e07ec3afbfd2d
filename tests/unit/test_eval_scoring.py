"""Letter scoring on a model whose logits are known, left padding, and the letter tokens of real tokenizers."""
import pytest
import torch

from hpcllm.data import load_tokenizer
from hpcllm.eval.scoring import choose, left_pad, letter_logprobs, letter_token_ids
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
    ids, variant = letter_token_ids(tok, "\n答案：")
    assert tok.convert_ids_to_tokens(ids) == ["A", "B", "C", "D"] and variant == "{letter}"
    # " D" is two tokens in the demo vocabulary ("Ġ", "D"), so MMLU's " A" falls back to the bare letters.
    ids, variant = letter_token_ids(tok, "\nAnswer:", " ")
    assert tok.convert_ids_to_tokens(ids) == ["A", "B", "C", "D"] and variant == "{letter}"


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
    assert letter_token_ids(SpaceLetters(), "Answer:", " ") == ([2, 3, 4, 5], " {letter}")
    assert letter_token_ids(SpaceLetters(), "Answer:", "") == ([6, 7, 8, 9], "{letter}")
    with pytest.raises(ValueError, match="no single token"):
        letter_token_ids(SpaceLetters(), "Answer:", "", letters=("A", "EF"))


def test_batches_do_not_depend_on_the_world_size():
    batches = plan_batches([5, 9, 1, 9, 3], 2)
    assert batches == [[1, 3], [0, 4], [2]]
    shards = [batches[r::2] for r in range(2)]
    assert sorted(b for s in shards for b in s) == sorted(batches)
