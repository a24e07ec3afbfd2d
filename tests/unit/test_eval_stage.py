"""method=eval's multiple-choice stage run in-process on one rank (no DeepSpeed, the tiny preset's real model):
what results.json and results.md record about letter scoring and prompts that overflow the context."""
import csv
import json

import pytest

from hpcllm.config import ConfigError, compose, derive
from hpcllm.data import load_tokenizer
from hpcllm.distributed import DistEnv
from hpcllm.stages.base import StageContext
from hpcllm.stages.eval import run_eval


def run_in_process(run_dir, *overrides):
    cfg = compose(["method=eval", "data.train=null", *overrides])
    run_dir.mkdir(parents=True, exist_ok=True)
    ctx = StageContext(cfg, derive(cfg), run_dir, DistEnv(0, 0, 1, "127.0.0.1", 0), {},
                       load_tokenizer(cfg.model.tokenizer, None))
    assert run_eval(ctx) == "completed"
    with open(run_dir / "predictions.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return (json.loads((run_dir / "results.json").read_text()), (run_dir / "results.md").read_text(encoding="utf-8"),
            rows)


def test_mmlu_on_a_vocabulary_without_single_space_letters_scores_continuations_and_says_so(tmp_path, capsys):
    results, md, rows = run_in_process(tmp_path, "eval.benchmark=mmlu", "eval.shots=1")
    assert results["split"] == "test"  # MMLU's published split is the default
    assert results["letter_scoring"] == "continuation" and results["letter_scoring_requested"] == "auto"
    assert results["letter_tokens"]["D"] == ["Ġ", "D"]
    assert "not single tokens" in results["letter_fallback"]
    assert "[eval] warning: the answer letters are not single tokens" in capsys.readouterr().err
    assert "Letters scored: `continuation` (eval.letter_scoring=auto" in md and "**Fallback:**" in md
    assert results["prompts"]["comparable"] and len(rows) == results["prompts"]["questions"]

    bare, bare_md, bare_rows = run_in_process(tmp_path / "bare", "eval.benchmark=mmlu", "eval.shots=1",
                                              "eval.letter_scoring=bare_letter")
    assert bare["letter_scoring"] == "bare_letter" and bare["letter_fallback"] is None and "Fallback" not in bare_md
    assert [r["prob_A"] for r in bare_rows] != [r["prob_A"] for r in rows]


def test_ceval_defaults_to_val(tmp_path):
    results, _, rows = run_in_process(tmp_path, "eval.benchmark=ceval", "eval.shots=0")
    assert results["split"] == "val" and results["letter_scoring"] == "bare_letter" and len(rows) == 24


@pytest.mark.parametrize("mode", ["drop_shots", "truncate_left", "fail"])
def test_prompts_longer_than_the_context(tmp_path, mode):
    args = ("eval.benchmark=ceval", "eval.shots=5", "model.max_positions=160", "method.seq_len=160", f"eval.on_overflow={mode}")
    if mode == "fail":
        with pytest.raises(ConfigError, match=r"eval.on_overflow=fail: \w+ question \d+: the 5-shot prompt is \d+ "
                                              r"tokens, more than the 160 that fit. Lower eval.shots"):
            run_in_process(tmp_path, *args)
        return
    results, md, rows = run_in_process(tmp_path, *args)
    assert all(int(r["prompt_tokens"]) <= 160 for r in rows)
    shots = [int(r["shots"]) for r in rows]
    p = results["prompts"]
    assert p["mean_shots"] == pytest.approx(sum(shots) / len(shots))
    if mode == "drop_shots":
        assert min(shots) < 5 and not p["comparable"] and p["fewer_shots"] == sum(s < 5 for s in shots)
        assert md.startswith(f"# C-Eval val, 5-shot (mean {p['mean_shots']:.2f} shots used: {p['fewer_shots']} of 24 "
                             "prompts dropped shots to fit 160 tokens; NOT COMPARABLE with 5-shot results)")
    else:
        assert shots == [5] * 24 and p["comparable"] and p["truncated"] > 0 and md.startswith("# C-Eval val, 5-shot: ")


def test_bad_eval_keys_are_named_before_anything_loads(tmp_path):
    from types import SimpleNamespace

    from hpcllm.eval.config import eval_config_errors

    cfg = compose(["method=eval", "eval.letter_scoring=best", "eval.on_overflow=shrink", "eval.template=harness",
                   "eval.shots=-1", "eval.benchmark=ocnli", "eval.chat_format=true"]).eval
    errors = eval_config_errors(cfg)
    assert "eval.letter_scoring='best'; valid: auto, space_letter, bare_letter, continuation" in errors
    assert "eval.on_overflow='shrink'; valid: drop_shots, truncate_left, fail" in errors
    assert "eval.template='harness'; valid: official, lm_eval" in errors
    assert "eval.shots=-1 must be at least 0" in errors
    assert any(e.startswith("eval.chat_format=true: ocnli is scored on the plain prompt") for e in errors)
    bad = SimpleNamespace(**dict(compose(["method=eval"]).eval, benchmark="mmmlu"))
    assert eval_config_errors(bad)[0].startswith("eval.benchmark='mmmlu'; valid: ceval, mmlu, afqmc")
    with pytest.raises(ConfigError, match="eval.letter_scoring='best'"):
        run_in_process(tmp_path, "eval.letter_scoring=best")
