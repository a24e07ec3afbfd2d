"""Record formats of the input jsonl, and the reasons bad records are refused."""
import pytest

from hpcllm.data.prompts import Chat
from hpcllm.data.records import Preference, Prompt, RecordError, Text, parse_line, parse_record


@pytest.mark.parametrize("record, text", [
    ({"text": "plain"}, "plain"),
    ({"title": "T", "content": "body"}, "T\nbody"),
    ({"text": "pile", "meta": {"pile_set_name": "Wikipedia"}}, "pile"),
    ({"type": "text", "content": "typed"}, "typed"),
])
def test_text_records(record, text):
    assert parse_record(record) == Text(text)


@pytest.mark.parametrize("record", [
    {"instruction": "Q", "input": "I", "output": "A"},
    {"instruct": "Q", "input": "I", "output": "A"},
    {"prompt": "Q", "answer": "A", "input": "I"},
    {"prompt": "Q", "response": "A", "input": "I"},
])
def test_instruction_records(record):
    chat = parse_record(record)
    assert isinstance(chat, Chat)
    assert [t.role for t in chat.turns] == ["user", "assistant"]
    assert chat.turns[0].content == "Q" and chat.turns[0].input == "I"
    assert chat.turns[1].content == [("A", True)]


def test_input_is_optional():
    assert parse_record({"instruction": "Q", "output": "A"}).turns[0].input is None


def test_conversation_with_several_asks_in_a_row():
    chat = parse_record({"type": "conversation", "rounds": [["ask", "a"], ["ask", "b"], ["ans", "c"], ["ask", "d"], ["ans", "e"]]})
    assert [(t.role, t.content) for t in chat.turns] == [
        ("user", "a\nb"), ("assistant", [("c", True)]), ("user", "d"), ("assistant", [("e", True)])]


def test_conversation_with_reference_and_tools():
    chat = parse_record({"type": "conversation", "reference": "REF", "api_desc": [{"name": "f"}], "rounds": [
        ["ask", "q"], ["ans-api", {"actions": [{"thought": "t", "api_name": "f", "params": {"a": 1}, "result": "r"}],
                                   "answer": "done"}]]})
    assert chat.system == 'Reference:\nREF\n\nYou can call these tools:\n[{"name": "f"}]'
    assert chat.turns[1].content == [("Thought: t\nAction: f\nAction Input: {\"a\": 1}\n", True),
                                     ("Observation: r\n", False), ("done", True)]


def test_reference_as_a_round():
    chat = parse_record({"type": "conversation", "rounds": [["reference", "R"], ["ask", "q"], ["ans", "a"]]})
    assert chat.system == "Reference:\nR"


def test_preference_and_prompt():
    pref = parse_record({"prompt": "Q", "chosen": "good", "rejected": "bad"})
    assert isinstance(pref, Preference) and pref.chosen == "good" and pref.rejected == "bad"
    assert isinstance(parse_record({"prompt": "Q"}), Prompt)
    assert isinstance(parse_record({"type": "prompt", "rounds": [["ask", "a"], ["ans", "b"], ["ask", "c"]]}), Prompt)


@pytest.mark.parametrize("line, reason", [
    ('{"text": "unterminated', "invalid_json"),
    ('[1, 2]', "unknown_format"),
    ('{"foo": 1}', "unknown_format"),
    ('{"type": "nonsense", "text": "x"}', "unknown_format"),
    ('{"instruction": "Q", "output": "  "}', "empty_answer"),
    ('{"prompt": "Q", "chosen": "", "rejected": "x"}', "empty_answer"),
    ('{"type": "conversation", "rounds": [["ask", "q"], ["ans", "a"], ["ask", "q2"]]}', "no_final_answer"),
    ('{"type": "conversation", "rounds": [["ask", "q"], ["ans", ""]]}', "empty_answer"),
    ('{"type": "conversation", "rounds": [["ask", "q"], ["shout", "a"]]}', "unknown_format"),
    ('{"text": ""}', "empty_text"),
    ('{"text": 5}', "bad_field"),
])
def test_bad_records_name_a_reason(line, reason):
    with pytest.raises(RecordError) as e:
        parse_line(line)
    assert e.value.reason == reason
