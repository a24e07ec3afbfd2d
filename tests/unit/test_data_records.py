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


# -- the seeds' formats verbatim (issue 16 §1) ---------------------------------------------------
API_ROUND = ["ans-api", {"actions": [
    {"inner_thought": "I need to search.", "api_name": "search", "api_param": "{\"query\": \"neighbor\"}",
     "api_res": "Status Code: 200. Response: {\"book\": \"Mark\"}"},
    {"inner_thought": "Search again", "api_name": "search", "api_param": "{\"query\": \"love\"}", "api_res": "nothing"}],
    "ans": "It is in Mark 12:31."}]


def test_seed_types_pretrain_and_instruct():
    assert parse_record({"type": "pretrain", "text": "Cai Xukun is a singer."}) == Text("Cai Xukun is a singer.")
    chat = parse_record({"type": "instruct", "instruct": "Fill the blank", "input": "loves ____", "output": "basketball"})
    assert chat.turns[0].content == "Fill the blank" and chat.turns[0].input == "loves ____"
    assert chat.turns[1].content == [("basketball", True)]


def test_seed_conver_has_api_learns_thought_call_and_answer_not_the_tool_result():
    chat = parse_record({"type": "conver_has_api", "api_desc": "search: find verses", "rounds": [
        ["ask", "Hello"], ["ans", "Hi"], ["ask", "find 'love your neighbor'"], API_ROUND, ["ask", "wrong"], ["ans", "ask others"]]})
    assert chat.system == "You can call these tools:\nsearch: find verses"
    assert chat.turns[3].content == [
        ("Thought: I need to search.\nAction: search\nAction Input: {\"query\": \"neighbor\"}\n", True),
        ("Observation: Status Code: 200. Response: {\"book\": \"Mark\"}\n", False),
        ("Thought: Search again\nAction: search\nAction Input: {\"query\": \"love\"}\n", True),
        ("Observation: nothing\n", False),
        ("It is in Mark 12:31.", True)]
    assert [t.role for t in chat.turns] == ["user", "assistant"] * 3


def test_seed_ref_qa_and_several_asks_in_a_row():
    chat = parse_record({"type": "ref_qa", "reference": "Kun was named ambassador in 2019.", "rounds": [
        ["ask", "Who is Kun?"], ["ask", "When was he named?"], ["ans", "In 2019."]]})
    assert chat.system == "Reference:\nKun was named ambassador in 2019."
    assert [(t.role, t.content) for t in chat.turns] == [("user", "Who is Kun?\nWhen was he named?"),
                                                         ("assistant", [("In 2019.", True)])]


def test_id_data_records():
    chat = parse_record({"id": 7, "data": ["q1", "a1", "q2", "a2"]})
    assert [(t.role, t.content) for t in chat.turns] == [("user", "q1"), ("assistant", [("a1", True)]),
                                                         ("user", "q2"), ("assistant", [("a2", True)])]
    with pytest.raises(RecordError, match="data\\[1\\]"):
        parse_record({"id": 1, "data": ["q", None]})


# -- the ecosystem's formats (issue 16 §2) ------------------------------------------------------
def test_sharegpt_with_system_tools_function_calls_and_observations():
    chat = parse_record({"system": "Be brief.", "tools": '[{"name": "weather"}]', "conversations": [
        {"from": "human", "value": "Weather in Paris?"},
        {"from": "function_call", "value": '{"name": "weather", "arguments": {"city": "Paris"}}'},
        {"from": "observation", "value": "18C"},
        {"from": "gpt", "value": "18 degrees."},
        {"from": "human", "value": "Thanks"}, {"from": "gpt", "value": "You're welcome."}]})
    assert chat.system == 'Be brief.\n\nYou can call these tools:\n[{"name": "weather"}]'
    assert chat.turns[1].content == [("Action: weather\nAction Input: {\"city\": \"Paris\"}\n", True),
                                     ("Observation: 18C\n", False), ("18 degrees.", True)]
    assert len(chat.turns) == 4


def test_openai_messages_with_tool_calls_and_content_parts():
    chat = parse_record({"messages": [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": [{"type": "text", "text": "What is 3*4?"}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "calc", "arguments": "{\"x\": \"3*4\"}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "12"},
        {"role": "assistant", "content": "It is 12."}], "tools": [{"type": "function", "function": {"name": "calc"}}]})
    assert chat.system.startswith("You are helpful.\n\nYou can call these tools:\n")
    assert chat.turns[0].content == "What is 3*4?"
    assert chat.turns[1].content == [("Action: calc\nAction Input: {\"x\": \"3*4\"}\n", True),
                                     ("Observation: 12\n", False), ("It is 12.", True)]


def test_alpaca_with_history_and_system():
    chat = parse_record({"instruction": "And 3+3?", "input": "", "output": "6", "system": "Math tutor",
                         "history": [["1+1?", "2"], ["2+2?", "4"]]})
    assert chat.system == "Math tutor"
    assert [(t.role, t.content) for t in chat.turns] == [
        ("user", "1+1?"), ("assistant", [("2", True)]), ("user", "2+2?"), ("assistant", [("4", True)]),
        ("user", "And 3+3?"), ("assistant", [("6", True)])]


@pytest.mark.parametrize("record", [
    {"rounds": [["ask", "hi"], ["ans", "hello"], ["ask", "joke?"]], "chosen": "A pun.", "rejected": "No."},
    {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}, {"from": "human", "value": "joke?"}],
     "chosen": {"from": "gpt", "value": "A pun."}, "rejected": {"from": "gpt", "value": "No."}},
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}, {"role": "user", "content": "joke?"}],
     "chosen": {"role": "assistant", "content": "A pun."}, "rejected": "No."},
    {"prompt": "ignored when the conversations repeat it",
     "chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}, {"role": "user", "content": "joke?"},
                {"role": "assistant", "content": "A pun."}],
     "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}, {"role": "user", "content": "joke?"},
                  {"role": "assistant", "content": "No."}]},
    {"chosen": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: joke?\n\nAssistant: A pun.",
     "rejected": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: joke?\n\nAssistant: No."},
])
def test_multi_turn_preference_pairs(record):
    pref = parse_record(record)
    assert isinstance(pref, Preference) and (pref.chosen, pref.rejected) == ("A pun.", "No.")
    assert [(t.role, t.content) for t in pref.prompt.turns] == [("user", "hi"), ("assistant", [("hello", True)]), ("user", "joke?")]


def test_hh_transcripts_that_differ_before_the_last_answer_are_refused():
    with pytest.raises(RecordError, match="differ before the last 'Assistant:'"):
        parse_record({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: c\n\nAssistant: d"})


def test_no_format_matches_names_the_keys_and_the_known_formats():
    with pytest.raises(RecordError) as e:
        parse_record({"question": "q", "reply": "a"})
    assert "keys ['question', 'reply']" in str(e.value) and "ShareGPT" in str(e.value) and "OpenAI" in str(e.value)
    with pytest.raises(RecordError, match="unknown role 'robot'"):
        parse_record({"messages": [{"role": "user", "content": "q"}, {"role": "robot", "content": "a"}]})
