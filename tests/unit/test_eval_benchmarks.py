"""Reading C-Eval and MMLU files in their published layouts, and the subject -> category maps."""
import pytest

from hpcllm.eval.benchmarks import default_data_dir, get_benchmark, load_benchmark, read_questions
from hpcllm.eval.subjects import CEVAL_HARD, CEVAL_SUBJECTS, MMLU_SUBCATEGORIES


def test_category_maps_cover_the_official_subject_lists():
    ceval, mmlu = get_benchmark("ceval"), get_benchmark("mmlu")
    assert len(CEVAL_SUBJECTS) == 52 and len(MMLU_SUBCATEGORIES) == 57
    counts = {c: sum(ceval.category(s) == c for s in CEVAL_SUBJECTS) for c in ceval.categories}
    assert counts == {"STEM": 20, "Social Science": 10, "Humanities": 11, "Other": 11}
    assert len(CEVAL_HARD) == 8 and all(ceval.category(s) == "STEM" for s in CEVAL_HARD)
    counts = {c: sum(mmlu.category(s) == c for s in MMLU_SUBCATEGORIES) for c in mmlu.categories}
    assert counts == {"STEM": 18, "Social Sciences": 12, "Humanities": 13, "Other": 14}
    assert ceval.prompt_names["computer_network"] == "计算机网络"
    assert mmlu.prompt_names["high_school_us_history"] == "high school us history"


@pytest.mark.parametrize("name,split", [("ceval", "val"), ("ceval", "test"), ("mmlu", "val"), ("mmlu", "test")])
def test_bundled_samples_read(name, split):
    bench = get_benchmark(name)
    subjects = load_benchmark(bench, default_data_dir(name), split)
    assert len(subjects) >= 4 and len({bench.category(s.subject) for s in subjects}) >= 3
    for sd in subjects:
        assert len(sd.dev) >= 5 and all(q.answer in "ABCD" for q in sd.dev)
        assert len(sd.questions) >= 3
        has_answers = not (name == "ceval" and split == "test")
        assert all((q.answer is not None) == has_answers for q in sd.questions)


def test_ceval_header_columns_and_flat_layout(tmp_path):
    (tmp_path / "logic_val.csv").write_text(
        "id,question,A,B,C,D,answer,explanation\n7,\"多行\n题目\",甲,乙,丙,丁,D,\n", encoding="utf-8")
    [sd] = load_benchmark(get_benchmark("ceval"), tmp_path, "val")
    q = sd.questions[0]
    assert (sd.subject, sd.dev, q.id, q.question, q.choices, q.answer) == ("logic", [], "7", "多行\n题目", ("甲", "乙", "丙", "丁"), "D")


def test_mmlu_rows_have_no_header(tmp_path):
    (tmp_path / "test").mkdir()
    path = tmp_path / "test" / "anatomy_test.csv"
    path.write_text('What is X?,a,"b, c",d,e,C\nWhy?,1,2,3,4,A\n')
    qs = read_questions(get_benchmark("mmlu"), path, "anatomy")
    assert [(q.id, q.choices[1], q.answer) for q in qs] == [("0", "b, c", "C"), ("1", "2", "A")]


def test_errors_name_what_to_fix(tmp_path):
    ceval = get_benchmark("ceval")
    with pytest.raises(ValueError, match="eval.subjects: astrology not C-Eval subjects"):
        load_benchmark(ceval, default_data_dir("ceval"), "val", ["astrology"])
    with pytest.raises(ValueError, match="no C-Eval files"):
        load_benchmark(ceval, tmp_path, "val")
    with pytest.raises(ValueError, match="dev holds the few-shot examples"):
        load_benchmark(ceval, default_data_dir("ceval"), "dev")
    (tmp_path / "law_val.csv").write_text("id,question,A,B,C,D,answer\n0,q,a,b,c,d,E\n")
    with pytest.raises(ValueError, match="law_val.csv:2: answer 'E'"):
        load_benchmark(ceval, tmp_path, "val")


def test_only_the_question_is_stripped_as_lm_eval_does(tmp_path):
    (tmp_path / "law_val.csv").write_text("id,question,A,B,C,D,answer\n0,\" 问题 \n\", 甲,乙 ,丙,丁,A\n1,\"多\n行\",a,b,c,d,\n", encoding="utf-8")
    with pytest.raises(ValueError, match="law_val.csv:4: empty answer cell"):  # the row starts on line 4
        read_questions(get_benchmark("ceval"), tmp_path / "law_val.csv", "law")
    (tmp_path / "law_val.csv").write_text("id,question,A,B,C,D,answer\n0,\" 问题 \n\", 甲,乙 ,丙,丁,A\n", encoding="utf-8")
    [q] = read_questions(get_benchmark("ceval"), tmp_path / "law_val.csv", "law")
    assert q.question == "问题" and q.choices == (" 甲", "乙 ", "丙", "丁")


def test_mmlu_defaults_to_its_published_test_split_and_ceval_to_val(tmp_path):
    assert get_benchmark("mmlu").default_split == "test" and get_benchmark("ceval").default_split == "val"
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "anatomy_test.csv").write_text("Q?,a,b,c,d,A\n")
    with pytest.raises(ValueError, match=r"no MMLU files val/<subject>_val.csv \(eval.split=val\); it has test/ "
                                         r"files: set eval.split=test"):
        load_benchmark(get_benchmark("mmlu"), tmp_path, "val")


def test_an_empty_answer_among_answered_questions_is_refused_with_its_row(tmp_path):
    """Issue 13: an empty answer cell was counted among the questions without saying how it was scored."""
    mmlu = get_benchmark("mmlu")
    path = tmp_path / "anatomy_test.csv"
    path.write_text("Q1?,a,b,c,d,A\nQ2?,a,b,c,d,\nQ3?,a,b,c,d,B\n")
    with pytest.raises(ValueError, match=r"anatomy_test.csv:2: empty answer cell \(1 in the file; 2 other questions "
                                         r"of the file have answers\): fill in the letter or remove the row"):
        read_questions(mmlu, path, "anatomy")
    # a file without any answer (C-Eval's test split) is read for a submission; dev shots need every answer
    path.write_text("Q1?,a,b,c,d,\nQ2?,a,b,c,d\n")
    assert [q.answer for q in read_questions(mmlu, path, "anatomy")] == [None, None]
    with pytest.raises(ValueError, match="anatomy_test.csv:1: empty answer cell.*few-shot examples need"):
        read_questions(mmlu, path, "anatomy", need_answers=True)


@pytest.mark.parametrize("content", [b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe binary", b"Q?,a,b\x00,c,d,A\n"])
def test_a_binary_csv_names_the_file(tmp_path, content):
    """Issue 13: a binary CSV's error lacked the file name."""
    path = tmp_path / "anatomy_test.csv"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=r"anatomy_test.csv: not (UTF-8 text|a readable CSV)"):
        read_questions(get_benchmark("mmlu"), path, "anatomy")
