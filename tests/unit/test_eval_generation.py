"""CMRC2018's official F1/EM and the SFT task F1 against hand-computed examples; greedy generation against
Hugging Face's; the generation stage in-process on the tiny preset."""
import pytest
import torch

from hpcllm.eval.generation import (cmrc_f1, exact_match, greedy_generate, load_cmrc, load_sft_records,
                                    mixed_segmentation, overlap_f1)
from hpcllm.eval.benchmarks import SAMPLE_DIR

from test_eval_stage import run_in_process


def test_mixed_segmentation_splits_chinese_characters_and_english_words():
    assert mixed_segmentation("Guido van Rossum在1991年发布") == ["guido", "van", "rossum", "在", "1991", "年", "发", "布"]
    assert mixed_segmentation("约3.5万人，") == ["约", "3.5", "万", "人", "，"]
    assert mixed_segmentation("约3.5万人，", rm_punc=True) == ["约", "3.5", "万", "人"]


@pytest.mark.parametrize("answers,prediction,f1,em", [
    (["山海关"], "山海关", 1.0, 1.0),
    (["山海关"], "山海关。", 1.0, 1.0),  # punctuation removed before both
    # answer 超过两万公里 (6 segments), prediction 两万公里左右 (6): LCS 两万公里 = 4 -> P = R = 4/6, F1 = 2/3
    (["超过两万公里"], "两万公里左右", 2 / 3, 0.0),
    # the best over the answers: 两万公里 (4) against 两万公里左右 (6): P = 4/6, R = 1, F1 = 0.8
    (["超过两万公里", "两万公里"], "两万公里左右", 0.8, 0.0),
    # English words: answer [guido, van, rossum], prediction [van, rossum, 发, 布]: LCS 2, P = 2/4, R = 2/3, F1 = 4/7
    (["Guido van Rossum"], "van Rossum发布", 4 / 7, 0.0),
    (["Guido van Rossum"], "guido VAN rossum", 1.0, 1.0),  # lower-cased
    # longest common *substring*: 关山海 against 山海关 shares 山海 (2 of 3 each): F1 = 2/3
    (["山海关"], "关山海", 2 / 3, 0.0),
    (["山海关"], "", 0.0, 0.0),
])
def test_cmrc_f1_and_em_by_hand(answers, prediction, f1, em):
    assert cmrc_f1(answers, prediction) == pytest.approx(f1)
    assert exact_match(answers, prediction) == em


def test_task_f1_is_the_bag_of_segments_overlap():
    # 关山海 against 山海关: every segment shared (bag overlap 3) although the LCS is 2
    assert overlap_f1(["山海关"], "关山海") == pytest.approx(1.0)
    # "I like reading." vs "I like books!": punctuation dropped, overlap 2, P = 2/3, R = 2/3
    assert overlap_f1(["I like reading."], "I like books!") == pytest.approx(2 / 3)
    # the official CMRC2018 F1 keeps "." (not in its punctuation list), as nltk makes it a token: R = 2/4
    assert cmrc_f1(["I like reading."], "I like books!") == pytest.approx(2 * (2 / 4) * (2 / 4) / (2 / 4 + 2 / 4))
    assert overlap_f1(["北京"], "北京北京") == pytest.approx(2 * (2 / 4) * 1 / (2 / 4 + 1))  # P 2/4, R 2/2


def test_bundled_files_read_in_their_published_layouts(tmp_path):
    items = load_cmrc(SAMPLE_DIR / "cmrc2018" / "cmrc2018_dev.json")
    assert [i.id for i in items][:2] == ["DEV_0_QUERY_0", "DEV_0_QUERY_1"]
    assert items[1].answers == ("超过两万公里", "两万公里") and items[0].prompt.endswith("问：明长城东起哪里？\n答：")
    sft = load_sft_records(str(SAMPLE_DIR / "sft" / "test.jsonl"))
    assert [i.answers for i in sft] == [("I like reading.",), ("北京",), ("2",), ("《红楼梦》",)]
    assert [t.role for t in sft[3].prompt.turns] == ["user", "assistant", "user"]  # the history stays in the prompt
    (tmp_path / "bad.json").write_text('{"data": [{"title": "x"}]}')
    with pytest.raises(ValueError, match="bad.json: not in CMRC2018's layout"):
        load_cmrc(tmp_path / "bad.json")
    (tmp_path / "q.jsonl").write_text('{"prompt": "only a question"}\n')
    with pytest.raises(ValueError, match=r"q.jsonl:1: an SFT test record needs an answer"):
        load_sft_records(str(tmp_path / "q.jsonl"))


def test_greedy_generation_equals_hugging_face_greedy_search():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=64)).eval()
    prompts = [[3, 9, 12, 40, 41], [5, 6]]
    ours = greedy_generate(model, prompts, pad_id=0, stop_ids=[], max_new_tokens=6)
    for prompt, got in zip(prompts, ours):
        ref = model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert got == ref[0, len(prompt):].tolist()
    stop = ours[0][2]
    cut = greedy_generate(model, prompts[:1], pad_id=0, stop_ids=[stop], max_new_tokens=6)
    assert cut[0] == ours[0][:ours[0].index(stop)]


@pytest.mark.parametrize("benchmark", ["cmrc2018", "generation"])
def test_generation_stage_scores_each_answer(tmp_path, benchmark):
    results, md, rows = run_in_process(tmp_path, f"eval.benchmark={benchmark}", "eval.max_new_tokens=4",
                                       "eval.shots=0")
    assert len(rows) == 4 and all(int(r["new_tokens"]) <= 4 for r in rows)
    score = cmrc_f1 if benchmark == "cmrc2018" else overlap_f1
    for r in rows:
        answers = r["answers"].split(" | ")
        assert float(r["f1"]) == pytest.approx(score(answers, r["prediction"]))
        assert float(r["em"]) == exact_match(answers, r["prediction"])
    assert results["metrics"]["f1"] == pytest.approx(sum(float(r["f1"]) for r in rows) / 4)
    assert "| Model | Examples | F1 | EM |" in md
