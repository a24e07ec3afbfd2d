"""Each cleaning rule on hand-written Chinese and English text: the filters alone, then the whole
zh_web / en_web pipelines on two-shard fixtures (tests/unit/data/clean, written by make_fixtures.py)
where every record names the rule that must remove it ("expect")."""
import glob
import io
import json
import os
import sys
from pathlib import Path

import pytest
import zstandard
from datatrove.data import Document
from datatrove.pipeline.filters import GopherRepetitionFilter

from hpcllm.clean import filters as F
from hpcllm.clean.text import ScriptWordTokenizer, detect_language, sentences

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "unit" / "data" / "clean"
sys.path.insert(0, str(ROOT / "tools"))
import clean as clean_tool  # noqa: E402

ZH = ("今天天气很好，我们一起去公园散步。公园里有很多人在锻炼身体，有的人在跑步，有的人在打太极拳。孩子们在草地上玩耍，笑声不断。"
      "我们走了一个小时，感觉非常舒服。")
EN = ("The library in our town was built more than a hundred years ago. It has a large reading room with tall "
      "windows. Every Saturday there is a story hour for children.")


def verdict(step, text, **meta):
    result = step.filter(Document(text=text, id="t", metadata=dict(meta)))
    return result if result is True else result[1]


def test_tokenizer_splits_han_characters_and_latin_words():
    tok = ScriptWordTokenizer()
    assert tok.word_tokenize("我们去Beijing玩。") == ["我", "们", "去", "Beijing", "玩", "。"]
    assert sentences("今天很好。你呢？Fine, thanks! 没有句号的结尾") == ["今天很好。", "你呢？", "Fine, thanks!", "没有句号的结尾"]


def test_language_by_script():
    assert detect_language(ZH)[0] == "zh" and detect_language(EN)[0] == "en"
    assert detect_language("Привет, как дела? Всё хорошо.")[0] == "other"
    keep_zh = F.LanguageFilter(["zh"], 0.5)
    assert verdict(keep_zh, ZH + " iPhone 15 Pro") is True  # Latin names inside Chinese text
    assert verdict(keep_zh, EN) == "language_en"


def test_length_counts_characters_not_words():
    rule = F.LengthFilter(min_chars=50, max_chars=200, min_lines=1, max_line_chars=None)
    assert verdict(rule, ZH) is True  # one "word" by whitespace, 78 characters
    assert verdict(rule, "这段话太短了。") == "too_short"
    assert verdict(rule, ZH * 4) == "too_long"
    assert verdict(F.LengthFilter(10, None, 1, max_line_chars=40), ZH) == "line_too_long"


def test_punctuation_grammar_chinese_and_english():
    rule = F.PunctuationFilter(min_terminal_line_ratio=0.3, min_sentences=2, max_sentence_chars=300)
    assert verdict(rule, ZH) is True and verdict(rule, EN) is True
    assert verdict(rule, "首页 新闻 体育 娱乐\n财经 科技 汽车 房产\n联系我们 关于我们") == "few_terminal_lines"
    assert verdict(rule, "只有一句话。") == "few_sentences"
    assert verdict(F.PunctuationFilter(0.0, 1, 10), ZH) == "long_sentences"


def test_symbol_digit_and_url_ratios():
    rule = F.RatiosFilter(max_symbol_ratio=0.2, max_digit_ratio=0.3, max_url_ratio=0.3)
    assert verdict(rule, ZH) is True and verdict(rule, EN) is True
    assert verdict(rule, "★★★★★超值优惠★★★★★$$$###") == "symbol_ratio"
    assert verdict(rule, "订单号20231105123456789，金额98765元。") == "digit_ratio"
    assert verdict(rule, "详情见 https://example.com/a/very/long/path/index.html?id=12345 网址") == "url_ratio"


def test_blacklist_whole_latin_words_and_chinese_anywhere(tmp_path):
    path = tmp_path / "words.txt"
    path.write_text("# comment\nass\n赌博\n\nbad phrase\n", encoding="utf-8")
    rule = F.BlacklistFilter(F.read_blacklist(str(path)), max_hits=0)
    assert verdict(rule, "The class passed the test.") is True  # 'ass' inside 'class' is not the word
    assert verdict(rule, "What an ASS.") == "blacklist"
    assert verdict(rule, "网上赌博害人。") == "blacklist"
    assert verdict(rule, "这是bad phrase的例子。") == "blacklist"  # Latin phrase between Han characters
    assert verdict(F.BlacklistFilter(["赌博"], max_hits=1), "网上赌博害人。") is True
    with pytest.raises(ValueError, match="blacklist.path="):
        F.read_blacklist(str(tmp_path / "missing.txt"))


def test_pii_masking_emails_phones_and_checksummed_id_numbers(tmp_path):
    masker = F.PIIMasker(str(tmp_path), {"id_number": "<ID>", "email": "<EMAIL>", "phone": "<PHONE>"})
    text = ("电话13812345678或+86 139-1234-5678，邮箱是service@example.com。身份证11010519491231002X，"
            "编号110105194912310021不是身份证（校验位不对）。Call (010) 555-1234 or +1 415 555 0100.")
    masked = masker.format(text)
    assert masked == ("电话<PHONE>或<PHONE>，邮箱是<EMAIL>。身份证<ID>，编号110105194912310021不是身份证（校验位不对）。"
                      "Call <PHONE> or <PHONE>.")
    assert masker.counts == {"id_number": 1, "email": 1, "phone": 4}
    assert F.valid_cn_id("11010519491231002X") and not F.valid_cn_id("110105194912310021")


def test_chinese_repetition_measures_characters():
    top = ((2, 0.2), (3, 0.18), (4, 0.16))
    rule = F.CharRepetitionFilter(top_n_grams=top, language=ScriptWordTokenizer())
    assert verdict(rule, ZH) is True
    # datatrove's own filter joins the n-gram's words with spaces: "有 的 人 在" counts 7 characters, not 4
    assert verdict(GopherRepetitionFilter(top_n_grams=top, language=ScriptWordTokenizer()), ZH) == "top_4_gram"
    assert verdict(rule, "我今天很开心。\n" * 5 + "明天见。") == "dup_line_frac"
    assert verdict(rule, "".join(f"哈哈{c}" for c in "一二三四五六七八九") + "。") == "top_2_gram"


def test_sft_answers():
    rule = F.SFTAnswerFilter(drop_empty_answers=True, max_answer_chars=10, max_prompt_chars=20)
    assert verdict(rule, "翻译：你好", answer="Hello") is True
    assert verdict(rule, "翻译：你好", answer="  ") == "empty_answer"
    assert verdict(rule, "翻译：你好", answer="Hello " * 5) == "answer_too_long"
    assert verdict(rule, "翻译" * 20, answer="Hello") == "prompt_too_long"


def read_jsonl_zst(pattern: str) -> list:
    out = []
    for path in sorted(glob.glob(pattern)):
        with open(path, "rb") as f:
            text = io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(f), encoding="utf-8").read()
        out += [json.loads(line) for line in text.splitlines() if line.strip()]
    return out


def fixture_expectations(lang: str) -> dict:
    expect = {}
    for path in sorted((FIXTURES / lang).glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
                expect[record["id"]] = record["expect"]
            except json.JSONDecodeError:
                expect["<invalid json>"] = "record"
    return expect


def run_fixture(lang: str, out: Path, *overrides: str) -> dict:
    cfg = clean_tool.compose_config([f"preset={lang}_web", f"input={FIXTURES / lang}", f"output={out}", "workers=1",
                                     "blacklist.enabled=true", f"blacklist.path={FIXTURES / 'blacklist.txt'}",
                                     *overrides])
    from hpcllm.clean import run_clean

    return run_clean(cfg)


@pytest.mark.parametrize("lang", ["zh", "en"])
def test_every_rule_removes_its_fixture_records(lang, tmp_path):
    out = tmp_path / "out dir"  # a space in the path, as users have
    report = run_fixture(lang, out, "pii.enabled=true")
    expect = fixture_expectations(lang)

    kept = {r["id"] for r in read_jsonl_zst(str(out / "data" / "*.jsonl.zst"))}
    assert kept == {i for i, rule in expect.items() if rule == "keep"}
    for rule in set(expect.values()) - {"keep"}:
        removed = read_jsonl_zst(str(out / "excluded" / rule / "*.jsonl.zst"))
        ids = {r.get("id", "<invalid json>") for r in removed}
        assert ids == {i for i, r in expect.items() if r == rule}, rule
        assert all(r["clean"]["reason"] and r["clean"]["source"] for r in removed)

    counts = {r["rule"]: r["documents"] for r in report["rules"]}
    wanted = {}
    for rule in expect.values():
        if rule != "keep":
            wanted[rule] = wanted.get(rule, 0) + 1
    assert counts == wanted
    assert report["input"]["documents"] == len(expect)
    assert report["output"]["documents"] == len(kept)
    assert report["removed"]["documents"] == len(expect) - len(kept)
    for r in report["rules"]:
        assert r["characters"] > 0 or r["rule"] == "record"
        assert all(entry["examples"] for entry in r["reasons"].values())
    md = (out / "clean_report.md").read_text(encoding="utf-8")
    assert all(f"| {rule} |" in md for rule in wanted)
    assert (out / "length_histogram.png").stat().st_size > 1000
    assert sum(report["length_histogram"]["before"]) == len(expect)
    assert sum(report["length_histogram"]["after"]) == len(kept)


def test_pii_masked_in_the_cleaned_chinese_output(tmp_path):
    report = run_fixture("zh", tmp_path / "out", "pii.enabled=true")
    assert report["pii_masked"] == {"id_number": 1, "email": 1, "phone": 1}
    pii = next(r for r in read_jsonl_zst(str(tmp_path / "out" / "data" / "*.zst")) if r["id"] == "zh-pii")
    assert "13812345678" not in pii["text"] and "<PHONE>" in pii["text"] and "<ID_NUMBER>" in pii["text"]
    assert "<EMAIL>" in pii["text"]
