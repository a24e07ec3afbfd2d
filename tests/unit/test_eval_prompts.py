"""k-shot prompt text against the benchmarks' published wording, chat wrapping and the fit-to-context rule."""
import pytest

from hpcllm.data import load_tokenizer
from hpcllm.eval.benchmarks import Question, default_data_dir, get_benchmark, load_benchmark
from hpcllm.eval.prompts import PromptOverflow, Prompter, build_prompt, fit_prompt

CEVAL, MMLU = get_benchmark("ceval"), get_benchmark("mmlu")


def q(n, answer="B"):
    return Question("computer_network", str(n), f"问题{n}", (f"a{n}", f"b{n}", f"c{n}", f"d{n}"), answer)


CEVAL_HEADER = "以下是中国关于计算机网络考试的单项选择题，请选出其中的正确答案。\n\n"
CEVAL_QUESTION = "问题9\nA. a9\nB. b9\nC. c9\nD. d9\n答案："


def ceval_shot(n):
    return f"问题{n}\nA. a{n}\nB. b{n}\nC. c{n}\nD. d{n}\n答案：B\n\n"


@pytest.mark.parametrize("k", [0, 1, 5])
def test_ceval_prompt_k_shot(k):
    shots = [q(i) for i in range(k)]
    assert build_prompt(CEVAL, "computer_network", shots, q(9, None)) == \
        CEVAL_HEADER + "".join(ceval_shot(i) for i in range(k)) + CEVAL_QUESTION


def test_ceval_one_shot_from_the_sample_verbatim():
    [sd] = load_benchmark(CEVAL, default_data_dir("ceval"), "val", ["computer_network"])
    assert build_prompt(CEVAL, "computer_network", sd.dev[:1], sd.questions[0]) == (
        "以下是中国关于计算机网络考试的单项选择题，请选出其中的正确答案。\n\n"
        "在OSI参考模型中，负责路由选择的是____。\nA. 物理层\nB. 数据链路层\nC. 网络层\nD. 传输层\n答案：C\n\n"
        "将域名转换为IP地址的协议是____。\nA. ARP\nB. DNS\nC. DHCP\nD. ICMP\n答案：")


@pytest.mark.parametrize("k", [0, 1, 5])
def test_mmlu_prompt_k_shot(k):
    [sd] = load_benchmark(MMLU, default_data_dir("mmlu"), "test", ["abstract_algebra"])
    expected = "The following are multiple choice questions (with answers) about abstract algebra.\n\n"
    for s in sd.dev[:k]:
        expected += f"{s.question}\nA. {s.choices[0]}\nB. {s.choices[1]}\nC. {s.choices[2]}\nD. {s.choices[3]}\nAnswer: {s.answer}\n\n"
    expected += "What is the characteristic of the ring Z_6?\nA. 0\nB. 2\nC. 3\nD. 6\nAnswer:"
    assert build_prompt(MMLU, "abstract_algebra", sd.dev[:k], sd.questions[0]) == expected
    if k == 1:
        assert expected.endswith("about abstract algebra.\n\nFind all c in Z_3 such that Z_3[x]/(x^2 + c) is a field."
                                 "\nA. 0\nB. 1\nC. 2\nD. 3\nAnswer: B\n\nWhat is the characteristic of the ring Z_6?"
                                 "\nA. 0\nB. 2\nC. 3\nD. 6\nAnswer:")


def words(text):  # a stand-in tokenizer: one token per character
    return [ord(c) for c in text]


def test_fit_drops_shots_first():
    build = lambda k: "H" + "S" * 10 * k + "Q" * 5
    assert fit_prompt(words, build, 5, 100).shots == 5
    fitted = fit_prompt(words, build, 5, 30)  # 1 + 10k + 5 <= 30: k = 2
    assert (fitted.shots, fitted.truncated, len(fitted.ids)) == (2, False, 26)


def test_fit_truncates_from_the_left_when_no_shot_fits():
    build = lambda k: "H" * 20 + "S" * 10 * k + "question?"
    fitted = fit_prompt(words, build, 3, 12)
    assert (fitted.shots, fitted.truncated) == (0, True)
    assert "".join(map(chr, fitted.ids)) == "HHHquestion?"  # the end (question and answer cue) survives
    kept = fit_prompt(words, lambda k: "<" + build(k), 3, 12, keep_first=1)
    assert "".join(map(chr, kept.ids)) == "<HHquestion?"  # a bos token stays first


def test_overflow_modes():
    build = lambda k: "H" + "S" * 10 * k + "Q" * 5
    cut = fit_prompt(words, build, 5, 30, on_overflow="truncate_left")  # every shot, its first tokens cut
    assert (cut.shots, cut.truncated, len(cut.ids)) == (5, True, 30)
    assert "".join(map(chr, cut.ids)) == build(5)[-30:]
    with pytest.raises(PromptOverflow, match="the 5-shot prompt is 56 tokens, more than the 30 that fit"):
        fit_prompt(words, build, 5, 30, on_overflow="fail")
    assert fit_prompt(words, build, 5, 56, on_overflow="fail").shots == 5  # what fits passes in every mode
    with pytest.raises(ValueError, match="eval.on_overflow='shrink'; valid: drop_shots, truncate_left, fail"):
        fit_prompt(words, build, 5, 30, on_overflow="shrink")


def test_lm_eval_ceval_valid_template():
    """eval.template=lm_eval: lm-evaluation-harness's ceval-valid task (no 考试, " A" after 答案：)."""
    shots = [q(i) for i in range(2)]
    text = build_prompt(CEVAL, "computer_network", shots, q(9, None), "lm_eval")
    assert text == ("以下是中国关于计算机网络的单项选择题，请选出其中的正确答案。\n\n"
                    + "".join(ceval_shot(i).replace("答案：B", "答案： B") for i in range(2)) + CEVAL_QUESTION)
    mmlu_q = Question("anatomy", "0", "Q?", ("1", "2", "3", "4"), "A")
    assert build_prompt(MMLU, "anatomy", [mmlu_q], mmlu_q, "lm_eval") == build_prompt(MMLU, "anatomy", [mmlu_q], mmlu_q)
    assert Prompter(CEVAL, load_tokenizer("demo"), template="lm_eval").answer_context() == ("\n答案：", " ")
    with pytest.raises(ValueError, match="eval.template='harness'; valid: official, lm_eval"):
        build_prompt(CEVAL, "computer_network", [], q(9), "harness")


def test_prompter_fits_real_tokens():
    tok = load_tokenizer("demo")
    [sd] = load_benchmark(CEVAL, default_data_dir("ceval"), "val", ["computer_network"])
    p = Prompter(CEVAL, tok)
    full = p.fit("computer_network", sd.dev, sd.questions[0], 5, 10_000)
    assert full.shots == 5 and full.ids == tok.encode(build_prompt(CEVAL, "computer_network", sd.dev, sd.questions[0]))
    zero = len(p.fit("computer_network", sd.dev, sd.questions[0], 0, 10_000).ids)
    fewer = p.fit("computer_network", sd.dev, sd.questions[0], 5, zero + 1)
    assert (fewer.shots, fewer.truncated) == (0, False)
    cut = p.fit("computer_network", sd.dev, sd.questions[0], 5, 10)
    assert cut.truncated and len(cut.ids) == 10 and tok.decode(cut.ids).endswith("答案：")


def test_chat_format_wraps_the_whole_prompt_as_one_user_turn():
    tok = load_tokenizer("demo")
    p = Prompter(MMLU, tok, "chatml")
    text = build_prompt(MMLU, "abstract_algebra", [], Question("abstract_algebra", "0", "Q?", ("1", "2", "3", "4"), "A"))
    decoded = tok.decode(p.encode(text))
    assert decoded == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                       + text + "<|im_end|>\n<|im_start|>assistant\n")
    assert p.answer_context() == ("assistant\n", "")
    assert p.keep_first == 0  # the demo tokenizer adds no bos; ChatML has none
    assert Prompter(MMLU, tok, "alpaca").keep_first == 1  # alpaca's prefix is the bos token
    assert Prompter(MMLU, tok, "llama2_chat").answer_context() == ("[INST] ? [/INST]", " ")
