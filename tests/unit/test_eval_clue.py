"""CLUE classification: the published file formats, few-shot prompts, and label-word perplexity scoring
against a hand computation on the tiny preset's real model."""
import json

import pytest
import torch

from hpcllm.config import compose, derive
from hpcllm.data import load_tokenizer
from hpcllm.distributed import DistEnv
from hpcllm.eval.benchmarks import SAMPLE_DIR
from hpcllm.eval.clue import CLUE_TASKS, choose_by_perplexity, clue_prompt, load_clue
from hpcllm.stages.base import StageContext
from hpcllm.stages.eval import load_eval_model

from test_eval_stage import run_in_process


@pytest.mark.parametrize("task", sorted(CLUE_TASKS))
def test_bundled_samples_read_in_their_published_formats(task):
    data = load_clue(task, SAMPLE_DIR / "clue" / task, "dev", 2)
    assert len(data.examples) == 4 and len(data.shots) == 2
    assert all(e.label in data.words for e in data.examples + data.shots)


def test_examples_without_a_gold_label_are_skipped_and_counted():
    data = load_clue("ocnli", SAMPLE_DIR / "clue" / "ocnli", "dev", 0)
    assert data.skipped == 1 and [e.line for e in data.examples] == [1, 2, 3, 5]


def test_label_words_and_few_shot_prompt():
    data = load_clue("afqmc", SAMPLE_DIR / "clue" / "afqmc", "dev", 2)
    assert data.words == {"0": "不同", "1": "相同"}
    assert clue_prompt(data, data.examples[1]) == (
        "语句一：花呗怎么还款\n语句二：花呗如何还钱\n两句话的意思相同吗？答：相同\n\n"
        "语句一：借呗可以提前还吗\n语句二：借呗额度怎么提升\n两句话的意思相同吗？答：不同\n\n"
        "语句一：怎么关闭花呗\n语句二：花呗怎么关掉\n两句话的意思相同吗？答：")
    assert clue_prompt(data, data.examples[1], 0) == "语句一：怎么关闭花呗\n语句二：花呗怎么关掉\n两句话的意思相同吗？答："
    iflytek = load_clue("iflytek", SAMPLE_DIR / "clue" / "iflytek", "dev", 0)
    assert iflytek.words["薅羊毛"] == "薅羊毛" and len(iflytek.words) == 7  # the names of labels.json
    assert load_clue("tnews", SAMPLE_DIR / "clue" / "tnews", "dev", 0).words["news_game"] == "电竞"


def test_bad_files_are_named(tmp_path):
    (tmp_path / "dev.json").write_text('{"sentence1": "a", "sentence2": "b", "label": "2"}\n')
    with pytest.raises(ValueError, match=r"dev.json:1: label '2' is not one of AFQMC's: 0, 1"):
        load_clue("afqmc", tmp_path, "dev", 0)
    (tmp_path / "dev.json").write_text('{"sentence1": "a", "sentence2": "b", "label": "1"}\nnot json\n')
    with pytest.raises(ValueError, match=r"dev.json:2: not a JSON object \(Expecting value\); CLUE files hold one a line"):
        load_clue("afqmc", tmp_path, "dev", 0)
    (tmp_path / "dev.json").write_text('{"sentence1": "a", "label": "1"}\n')
    with pytest.raises(ValueError, match=r"dev.json:1: no field 'sentence2' \(AFQMC's published format\)"):
        load_clue("afqmc", tmp_path, "dev", 0)
    (tmp_path / "dev.json").write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(ValueError, match="dev.json: not UTF-8 text"):
        load_clue("afqmc", tmp_path, "dev", 0)
    with pytest.raises(FileNotFoundError, match="no train.json for afqmc"):
        (tmp_path / "dev.json").write_text('{"sentence1": "a", "sentence2": "b", "label": "1"}\n')
        load_clue("afqmc", tmp_path, "dev", 1)


def test_perplexity_picks_the_lowest_mean_nll_per_token():
    # label 0: one token at log-prob -2 (NLL 2); label 1: two tokens summing to -3 (mean NLL 1.5) -> 1
    assert choose_by_perplexity([-2.0, -3.0], [1, 2]) == (1, [2.0, 1.5])
    assert choose_by_perplexity([-2.0, -4.0], [1, 2])[0] == 0  # a tie goes to the first label


@pytest.mark.parametrize("task,shots", [("tnews", 0), ("csl", 2), ("ocnli", 1)])
def test_predictions_equal_a_hand_computation_on_the_tiny_model(tmp_path, task, shots):
    results, md, rows = run_in_process(tmp_path, f"eval.benchmark={task}", f"eval.shots={shots}")
    cfg = compose(["method=eval", "data.train=null"])
    tok = load_tokenizer(cfg.model.tokenizer, None)
    model = load_eval_model(StageContext(cfg, derive(cfg), tmp_path, DistEnv(0, 0, 1, "127.0.0.1", 0), {}, tok))
    data = load_clue(task, SAMPLE_DIR / "clue" / task, "dev", shots)
    cue = "类别：" if task == "tnews" else "答："
    for row, example in zip(rows, data.examples):
        prompt = tok.encode(clue_prompt(data, example))
        nll = {}
        for label, word in data.words.items():
            word_ids = tok.encode(cue + word)[len(tok.encode(cue)):]
            with torch.no_grad():
                logprobs = torch.log_softmax(model(input_ids=torch.tensor([prompt + word_ids])).logits[0].float(), -1)
            nll[label] = -sum(logprobs[len(prompt) - 1 + j, t].item() for j, t in enumerate(word_ids)) / len(word_ids)
        best = min(nll, key=lambda l: (nll[l], list(data.words).index(l)))
        assert row["prediction"] == best
        assert float(row["nll_prediction"]) == pytest.approx(nll[best], abs=1e-4)
        assert float(row["nll_label"]) == pytest.approx(nll[example.label], abs=1e-4)
        assert int(row["shots"]) == shots
    accuracy = sum(r["prediction"] == e.label for r, e in zip(rows, data.examples)) / len(rows)
    assert results["metrics"]["accuracy"] == pytest.approx(accuracy)
    assert results["label_words"] == data.words and md.startswith(f"# {data.task.title} dev, {shots}-shot: ")
    assert json.loads((tmp_path / "results.json").read_text())["skipped_unlabeled"] == (1 if task == "ocnli" else 0)


def test_a_test_split_without_labels_needs_the_label_names(tmp_path):
    (tmp_path / "test.json").write_text('{"sentence": "每天推送新闻", "label": ""}\n', encoding="utf-8")
    with pytest.raises(ValueError, match="test.json: no label names to score \\(IFLYTEK's labels.json is not in"):
        load_clue("iflytek", tmp_path, "test", 0)
    (tmp_path / "labels.json").write_text('{"label": "22", "label_des": "新闻"}\n', encoding="utf-8")
    data = load_clue("iflytek", tmp_path, "test", 0)
    assert data.words == {"新闻": "新闻"} and data.examples[0].label is None
