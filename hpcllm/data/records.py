"""Record formats of the input files: one JSON object a line (or the elements of a JSON array),
normalized to four shapes. Formats are accepted as their projects ship them:

* ``Text``: ``{"text"}``, ``{"title", "content"}`` (WuDao), ``{"text", "meta"}`` (Pile);
* ``Chat`` (a conversation ending with an answer):

  - instructions: ``{"instruction"|"instruct", "input"?, "output", "history"?: [[q, a], ...], "system"?}``
    (Alpaca, LLaMA-Factory), ``{"prompt", "answer"|"response"|"output"}``;
  - ``{"rounds": [[role, content], ...], "reference"?, "api_desc"?}`` (the seeds' conversation,
    conver_has_api and ref_qa records), ``{"id", "data": [q, a, q, a, ...]}``;
  - ShareGPT ``{"conversations": [{"from", "value"}], "system"?, "tools"?}`` (FastChat, LLaMA-Factory);
  - OpenAI chat ``{"messages": [{"role", "content", "tool_calls"?}], "tools"?}``;
* ``Preference``: ``{"prompt", "chosen", "rejected"}``; a multi-turn prompt in ``conversations`` /
  ``messages`` / ``rounds`` with ``chosen`` / ``rejected`` a message or a text; chosen and rejected
  whole conversations sharing their prompt; Anthropic HH transcripts (``"\\n\\nHuman: … \\n\\nAssistant: …"``);
* ``Prompt`` (a conversation ending with a question): ``{"prompt"}``, or any conversation with ``type: prompt``.

Tool use is written ReAct-style inside the answer: the model learns its thought, the call and its
arguments and the final answer, never what the tool returned. Several user messages in a row are
one user turn. A ``type`` field (the names above, or the seeds' pretrain | instruct | conversation |
conver_has_api | ref_qa) forces the shape.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, List, Optional, Tuple, Union

from hpcllm.data.prompts import Chat, Turn


class RecordError(ValueError):
    """A record that cannot be used; ``reason`` is the short key counted in meta.json."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass
class Text:
    text: str


@dataclass
class Preference:
    prompt: Chat  # ends with a user turn
    chosen: str
    rejected: str


@dataclass
class Prompt:
    prompt: Chat  # ends with a user turn


Record = Union[Text, Chat, Preference, Prompt]
TYPES = ("text", "instruction", "conversation", "preference", "prompt")
SEED_TYPES = {"pretrain": "text", "instruct": "instruction", "conver_has_api": "conversation", "ref_qa": "conversation"}
KNOWN_FORMATS = ("text, title/content, instruction/input/output(/history/system), prompt/response, "
                 "rounds (ask/ans/ans-api), id/data, ShareGPT conversations (from/value), OpenAI messages "
                 "(role/content), prompt/chosen/rejected, conversations|messages|rounds + chosen/rejected, "
                 "Anthropic HH chosen/rejected transcripts")
# Message roles of every format -> system | user | assistant | tool_call | tool_result
ROLES = {"system": "system", "ask": "user", "user": "user", "human": "user", "question": "user",
         "ans": "assistant", "assistant": "assistant", "gpt": "assistant", "answer": "assistant", "bot": "assistant",
         "model": "assistant", "chatgpt": "assistant", "function_call": "tool_call", "tool_call": "tool_call",
         "observation": "tool_result", "tool": "tool_result", "function": "tool_result", "ipython": "tool_result"}
Message = Tuple[str, Any]  # (role, content); content is text, or for tool_call a (thought, name, arguments)


def parse_line(line: Union[str, bytes]) -> Record:
    if isinstance(line, bytes):
        raise RecordError("invalid_utf8", "not UTF-8 text")
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise RecordError("invalid_json", f"not valid JSON ({e.msg} at column {e.colno})") from None
    return parse_record(obj)


def parse_record(obj: Any) -> Record:
    if not isinstance(obj, dict):
        raise RecordError("unknown_format", f"expected a JSON object, got {type(obj).__name__}")
    kind = obj.get("type") or _guess_type(obj)
    kind = SEED_TYPES.get(kind, kind)
    if kind not in TYPES:
        raise RecordError("unknown_format", f"unknown type {kind!r}; valid: {', '.join(TYPES + tuple(SEED_TYPES))}")
    return _PARSERS[kind](obj)


def _guess_type(obj: dict) -> str:
    keys = set(obj)
    if {"chosen", "rejected"} <= keys:
        return "preference"
    if keys & {"rounds", "conversations", "messages"} or {"data"} <= keys and isinstance(obj["data"], list):
        return "conversation"
    if keys & {"instruction", "instruct"} or ("prompt" in keys and keys & {"answer", "response", "output"}):
        return "instruction"
    if "prompt" in keys:
        return "prompt"
    if "text" in keys or "content" in keys:
        return "text"
    raise RecordError("unknown_format", f"a record with keys {sorted(keys)} matches no known format; known: {KNOWN_FORMATS}")


def _str(obj: dict, *names: str, required: bool = True, reason: str = "missing_field") -> Optional[str]:
    for name in names:
        if obj.get(name) is not None:
            value = obj[name]
            if not isinstance(value, str):
                raise RecordError("bad_field", f"field {name!r} must be a string, got {type(value).__name__}")
            if required and not value.strip():
                raise RecordError("empty_answer" if reason == "empty_answer" else "empty_field", f"field {name!r} is empty")
            return value
    if required:
        raise RecordError(reason, f"missing field {' or '.join(map(repr, names))}")
    return None


def _text(obj):
    text = _str(obj, "text", required=False)
    if text is None:
        title, content = _str(obj, "title", required=False), _str(obj, "content")
        text = f"{title}\n{content}" if title else content
    if not text.strip():
        raise RecordError("empty_text", "the text is empty")
    return Text(text)


def _instruction(obj):
    question = _str(obj, "instruction", "instruct", "prompt")
    answer = _str(obj, "output", "answer", "response", reason="empty_answer")
    history = obj.get("history") or []
    if not isinstance(history, list) or not all(isinstance(h, list) and len(h) == 2 for h in history):
        raise RecordError("bad_field", "'history' must be a list of [question, answer] pairs")
    messages = [m for n, (q, a) in enumerate(history) for m in (("user", _message_text(q, f"history[{n}]", "question")),
                                                                ("assistant", _message_text(a, f"history[{n}]", "answer")))]
    chat = _chat(messages + [("user", question), ("assistant", answer)], _system_parts(obj))
    chat.turns[-2].input = _str(obj, "input", required=False) or None
    return chat


def _preference(obj):
    chosen, rejected = obj["chosen"], obj["rejected"]
    if "prompt" in obj:
        prompt = obj["prompt"]
        messages = _message_list(prompt, "prompt") if isinstance(prompt, list) else [("user", _str(obj, "prompt"))]
    elif set(obj) & {"conversations", "messages", "rounds"}:
        messages = _messages(obj)
    elif isinstance(chosen, str) and isinstance(rejected, str):
        return _hh_transcripts(chosen, rejected)
    else:
        messages = []
    if isinstance(chosen, list) and isinstance(rejected, list):  # whole conversations (UltraFeedback)
        shared, chosen, rejected = _split_shared(chosen, rejected)
        messages = _message_list(shared, "chosen") if shared else messages
    prompt = _chat(messages, _system_parts(obj), allow_open=True)
    if prompt.turns[-1].role != "user":
        raise RecordError("no_final_question", "the prompt of a preference pair must end with a user message")
    return Preference(prompt, _answer_text(chosen, "chosen"), _answer_text(rejected, "rejected"))


def _split_shared(chosen: list, rejected: list) -> Tuple[list, Any, Any]:
    """Two conversations that agree up to one last answer each: (shared messages, chosen, rejected)."""
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    if len(chosen) != shared + 1 or len(rejected) != shared + 1:
        raise RecordError("unknown_format", "chosen and rejected must be the same conversation up to one last answer each")
    return chosen[:shared], chosen[-1], rejected[-1]


def _answer_text(value, name: str) -> str:
    if isinstance(value, dict):
        role, content = _message_fields(value, name)
        if ROLES.get(role) != "assistant":
            raise RecordError("bad_field", f"{name!r} must be an assistant message, got role {role!r}")
        value = content
    text = _message_text(value, name, "answer")
    if not text.strip():
        raise RecordError("empty_answer", f"field {name!r} is empty")
    return text


HH_TURN = re.compile(r"\n\n(Human|Assistant): ?")


def _hh_transcripts(chosen: str, rejected: str) -> Preference:
    """Anthropic HH: two transcripts that agree up to the last ``Assistant:``; that part is the prompt."""
    cue = chosen.rfind("\n\nAssistant:")
    if cue < 0 or "Human:" not in chosen[:cue]:
        raise RecordError("unknown_format", "chosen/rejected without a prompt must be \\n\\nHuman: … \\n\\nAssistant: … transcripts")
    prompt_text = chosen[:cue + len("\n\nAssistant:")]
    if not rejected.startswith(prompt_text):
        raise RecordError("unknown_format", "chosen and rejected transcripts differ before the last 'Assistant:'")
    parts = HH_TURN.split("\n\n" + prompt_text.lstrip("\n"))
    messages = [("user" if role == "Human" else "assistant", text.strip()) for role, text in zip(parts[1::2], parts[2::2])]
    prompt = _chat([m for m in messages if m[1]], [], allow_open=True)
    return Preference(prompt, _answer_text(chosen[len(prompt_text):].strip(), "chosen"),
                      _answer_text(rejected[len(prompt_text):].strip(), "rejected"))


def _single_prompt(obj) -> Prompt:
    return Prompt(Chat([Turn("user", _str(obj, "prompt", "instruction", "instruct"))], system=_str(obj, "system", required=False)))


def _prompt(obj):
    if set(obj) & {"rounds", "conversations", "messages", "data"}:
        chat = _conversation(obj, allow_open=True)
        if chat.turns[-1].role != "user":
            raise RecordError("no_final_question", "a prompt conversation must end with a user message")
        return Prompt(chat)
    return _single_prompt(obj)


def _conversation(obj, allow_open: bool = False) -> Chat:
    return _chat(_messages(obj), _system_parts(obj), allow_open)


# -- every conversation format -> messages ---------------------------------------------------
def _messages(obj) -> List[Message]:
    if "rounds" in obj:
        return _rounds(obj["rounds"])
    if "conversations" in obj:
        return _message_list(obj["conversations"], "conversations")
    if "messages" in obj:
        return _message_list(obj["messages"], "messages")
    data = obj.get("data")
    if not isinstance(data, list) or not data:
        raise RecordError("unknown_format", "'data' must be a non-empty list [question, answer, question, answer, ...]")
    return [("user" if n % 2 == 0 else "assistant", _message_text(text, f"data[{n}]", "data")) for n, text in enumerate(data)]


def _rounds(rounds) -> List[Message]:
    if not isinstance(rounds, list) or not rounds:
        raise RecordError("unknown_format", "'rounds' must be a non-empty list of [role, content]")
    out: List[Message] = []
    for n, entry in enumerate(rounds):
        if not isinstance(entry, list) or len(entry) < 2 or not isinstance(entry[0], str):
            raise RecordError("unknown_format", f"round {n} must be [role, content], got {json.dumps(entry, ensure_ascii=False)[:80]}")
        role, payload = entry[0], entry[1] if len(entry) == 2 else entry[1:]
        if role == "reference":
            out.append(("reference", "Reference:\n" + _as_text(payload)))
        elif role == "ans-api":
            out += _api_answer(payload, n)
        elif role in ROLES:
            out.append((ROLES[role], _message_text(payload, f"round {n}", role)))
        else:
            raise RecordError("unknown_format", f"round {n}: unknown role {role!r} (ask, ans, ans-api, reference, system)")
    return out


def _api_answer(payload, n) -> List[Message]:
    """The seeds' ``["ans-api", {"actions": [{"inner_thought", "api_name", "api_param", "api_res"}], "ans"}]``."""
    if isinstance(payload, list) and payload and isinstance(payload[-1], str):
        payload = {"actions": payload[:-1], "ans": payload[-1]}
    if not isinstance(payload, dict) or not isinstance(payload.get("actions", []), list):
        raise RecordError("unknown_format", f"round {n}: ans-api needs {{'actions': [...], 'ans': ...}}")
    out: List[Message] = []
    for a in payload.get("actions", []):
        if not isinstance(a, dict):
            raise RecordError("unknown_format", f"round {n}: an api action must be an object")
        name = _first(a, "api_name", "name")
        if not name:
            raise RecordError("unknown_format", f"round {n}: an api action has no api_name")
        thought = _first(a, "inner_thought", "thought")
        out.append(("tool_call", (thought, name, _first(a, "api_param", "params", "api_params", "arguments") or {})))
        out.append(("tool_result", _as_text(_first(a, "api_res", "result", "api_result", "observation") or "")))
    answer = _first(payload, "ans", "answer")
    out.append(("assistant", _message_text(answer if answer is not None else "", f"round {n}", "ans")))
    return out


def _message_list(messages, field: str) -> List[Message]:
    """ShareGPT ``{"from", "value"}`` and OpenAI ``{"role", "content", "tool_calls"}`` messages."""
    if not isinstance(messages, list) or not messages:
        raise RecordError("unknown_format", f"{field!r} must be a non-empty list of messages")
    out: List[Message] = []
    for n, message in enumerate(messages):
        where = f"{field}[{n}]"
        if not isinstance(message, dict):
            raise RecordError("unknown_format", f"{where} must be a message object, got {type(message).__name__}")
        role, content = _message_fields(message, where)
        kind = ROLES.get(role)
        if kind is None:
            raise RecordError("unknown_format", f"{where}: unknown role {role!r} (valid: {', '.join(sorted(ROLES))})")
        calls = message.get("tool_calls") or []
        if kind == "tool_call":  # ShareGPT function_call: the value is the call as JSON
            out.append(("tool_call", _call_of(content, where)))
            continue
        if calls and content in (None, ""):
            content = None
        elif kind == "tool_result":
            content = _as_text(content)
        else:
            content = _message_text(_content_text(content, where), where, role)
        if content is not None:
            out.append((kind, content))
        for call in calls:
            out.append(("tool_call", _call_of(call.get("function", call) if isinstance(call, dict) else call, where)))
    return out


def _message_fields(message: dict, where: str) -> Tuple[str, Any]:
    role = message.get("role", message.get("from"))
    if not isinstance(role, str):
        raise RecordError("unknown_format", f"{where}: a message needs a 'role' (OpenAI) or 'from' (ShareGPT)")
    return role, message.get("content", message.get("value"))


def _content_text(content, where: str):
    """OpenAI content may be a list of parts: their text parts, joined."""
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        if any(p.get("type") != "text" for p in content):
            raise RecordError("bad_field", f"{where}: only text content parts can be trained on")
        return "".join(_message_text(p.get("text"), where, "text part") for p in content)
    return content


def _call_of(call, where: str):
    if isinstance(call, str):
        try:
            call = json.loads(call)
        except json.JSONDecodeError:
            raise RecordError("bad_field", f"{where}: a function call must be JSON with a name and arguments") from None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        raise RecordError("bad_field", f"{where}: a function call needs a 'name'")
    return None, call["name"], call.get("arguments", call.get("parameters", {}))


def _system_parts(obj) -> List[str]:
    parts = [s for s in (_str(obj, "system", required=False),) if s]
    if obj.get("reference"):
        parts.append("Reference:\n" + _as_text(obj["reference"]))
    tools = obj.get("api_desc") or obj.get("tools")
    if tools:
        parts.append("You can call these tools:\n" + _as_text(tools))
    return parts


# -- messages -> Chat --------------------------------------------------------------------------
def _chat(messages: List[Message], system_parts: List[str], allow_open: bool = False) -> Chat:
    system_parts = list(system_parts)
    turns: List[Turn] = []
    for role, content in messages:
        if role == "system":
            system_parts.insert(0, content)
        elif role == "reference":
            system_parts.append(content)
        elif role == "user":
            if turns and turns[-1].role == "user":
                turns[-1].content += "\n" + content  # several asks in a row are one turn
            else:
                turns.append(Turn("user", content))
        else:
            if not turns:
                raise RecordError("unknown_format", "the conversation starts with an answer")
            if role == "assistant" and not content.strip():
                raise RecordError("empty_answer", "an answer is empty")
            if turns[-1].role != "assistant":
                turns.append(Turn("assistant", []))
            elif not turns[-1].content[-1][0].endswith("\n"):  # a second message of the same answer
                turns[-1].content.append(("\n", True))
            turns[-1].content.append(_part(role, content))
    if not turns or not any(t.role == "user" for t in turns):
        raise RecordError("unknown_format", "the conversation has no user message")
    last = turns[-1]
    if last.role == "assistant" and (not last.content[-1][1] or not last.content[-1][0].strip()):
        raise RecordError("empty_answer", "the conversation's last answer is empty (or ends with a tool result)")
    if last.role != "assistant" and not allow_open:
        raise RecordError("no_final_answer", "the conversation ends without an answer")
    return Chat(turns, system="\n\n".join(system_parts) or None)


def _part(role: str, content) -> Tuple[str, bool]:
    """ReAct-style text: the model learns its thought, the call and the answer, never the tool's result."""
    if role == "tool_call":
        thought, name, arguments = content
        return f"{f'Thought: {thought}' + chr(10) if thought else ''}Action: {name}\nAction Input: {_as_text(arguments)}\n", True
    if role == "tool_result":
        return f"Observation: {content}\n", False
    return content, True


def _first(obj: dict, *names: str):
    return next((obj[n] for n in names if obj.get(n) is not None), None)


def _message_text(value, where: str, role: str) -> str:
    """What a person or the model said is text: null, a number or an object would be learned literally."""
    if not isinstance(value, str):
        shown = json.dumps(value, ensure_ascii=False)[:60]
        raise RecordError("bad_field", f"{where}: the {role!r} content must be a string, got "
                                       f"{'null' if value is None else type(value).__name__} {shown}")
    return value


def _as_text(value) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)


_PARSERS = {"text": _text, "instruction": _instruction, "conversation": _conversation,
            "preference": _preference, "prompt": _prompt}
