"""Cross-check with lm-evaluation-harness: hpcllm's predictions on the tiny preset's exported model (demo tokenizer)
against lm-eval's on the same model and the same local files, through the generated task config.
Skipped, with the reason, where lm-eval is not installed (tools/setup.sh installs it: pip install 'hpcllm[lmeval]')."""
import json

import pytest

from hpcllm.eval.lm_eval_check import cross_check, expected_to_agree, lm_eval_missing, task_config

from test_eval_stage import run_in_process

needs_lm_eval = pytest.mark.skipif(lm_eval_missing() is not None, reason=str(lm_eval_missing()))


@pytest.fixture(scope="module")
def exported_model(tmp_path_factory):
    """The tiny preset with seeded random weights, saved as a Hugging Face directory (model.path)."""
    from hpcllm.config import compose
    from hpcllm.data import load_tokenizer
    from hpcllm.models.build import build_model

    out = tmp_path_factory.mktemp("exported model")
    model_cfg = compose([]).model
    tokenizer = load_tokenizer(model_cfg.tokenizer, None)
    build_model(model_cfg, tokenizer=tokenizer).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_task_config_is_hpcllms_template_in_lm_evals_terms():
    results = {"benchmark": "ceval", "template": "official"}
    config = task_config(results, "computer_network", {"test": "t.jsonl", "dev": "d.jsonl"})
    assert config["description"] == "以下是中国关于计算机网络考试的单项选择题，请选出其中的正确答案。\n\n"
    assert config["doc_to_text"] == "{{question.strip()}}\nA. {{A}}\nB. {{B}}\nC. {{C}}\nD. {{D}}\n答案："
    assert config["target_delimiter"] == "" and config["fewshot_config"] == {"sampler": "first_n"}
    assert task_config(dict(results, template="lm_eval"), "computer_network", {})["target_delimiter"] == " "
    assert expected_to_agree({"benchmark": "mmlu", "letter_text": "{letter}", "chat_format": "chatml",
                              "prompts": {"comparable": False}}) == [
        "chat_format=chatml: lm-eval scores the plain prompt",
        "letter_scoring=None scores '{letter}' where lm-eval scores the template's ' {letter}'",
        "prompts dropped shots (on_overflow=drop_shots); lm-eval cuts them from the left"]


SUBJECTS = {"mmlu": "[abstract_algebra,nutrition]", "ceval": "[computer_network,high_school_physics]"}


@needs_lm_eval
@pytest.mark.timeout(600)
@pytest.mark.parametrize("benchmark,template", [("mmlu", "official"), ("ceval", "official"), ("ceval", "lm_eval")])
def test_predictions_agree_with_lm_eval_question_by_question(tmp_path, exported_model, benchmark, template, capsys):
    # With the demo tokenizer " D" is two tokens: MMLU and ceval-valid score every letter by its summed
    # continuation (auto's fallback); C-Eval's official "答案：A" has single bare letters.
    args = (f"eval.benchmark={benchmark}", "eval.shots=2", f"eval.subjects={SUBJECTS[benchmark]}",
            f"model.path={exported_model}")
    results, _, rows = run_in_process(tmp_path / "run", *args, f"eval.template={template}")
    assert results["letter_scoring"] == ("bare_letter" if template == "official" and benchmark == "ceval"
                                         else "continuation")
    report = cross_check(tmp_path / "run", tmp_path / "check")
    assert report["differs_by_design"] == []
    assert report["questions"] == len(rows) > 0
    assert report["same_prediction"] == report["questions"], report["per_question"]
    assert report["max_prob_diff"] < 1e-5  # hpcllm's probabilities are written to 6 decimals
    assert json.loads((tmp_path / "check" / "lm_eval_check.json").read_text())["agreement"] == 1.0
    if benchmark == "ceval" and template == "official":  # the command line: exit 0, the agreement printed
        import importlib.util
        from pathlib import Path

        spec = importlib.util.spec_from_file_location(
            "compare_evals", Path(__file__).resolve().parents[2] / "tools" / "compare_evals.py")
        tool = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(tool)
        assert tool.main([str(tmp_path / "run"), "--lm-eval"]) == 0
        assert "lm-eval agreement: 12 of 12 predictions the same (100.0%)" in capsys.readouterr().out
    if benchmark == "mmlu":  # the check can fail: bare letters are not what lm-eval scores after "Answer:"
        run_in_process(tmp_path / "bare", *args, "eval.letter_scoring=bare_letter")
        bare = cross_check(tmp_path / "bare", tmp_path / "bare check")
        assert bare["differs_by_design"] and bare["max_prob_diff"] > 1e-3
