"""Record formats of the input jsonl: one JSON object a line, normalized to four shapes.

* ``Text``: ``{"text"}``, ``{"title", "content"}`` (WuDao), ``{"text", "meta"}`` (Pile);
* ``Chat`` (a conversation ending with an answer): ``{"instruction"|"instruct", "input"?, "output"}``,
  ``{"prompt", "answer"|"response"|"output"}``, ``{"type": "conversation", "rounds": [[role, ...], ...]}``;
* ``Preference``: ``{"prompt", "chosen", "rejected"}``;
* ``Prompt`` (a conversation ending with a question): ``{"prompt"}``.

Conversation rounds: ``["ask", text]`` (several in a row are joined by newlines), ``["ans", text]``,
``["ans-api", {"actions": [{"thought", "api_name", "params", "result"}, ...], "answer": text}]``
(a tool-calling answer: thought, call and final answer are learned, the tool's result is not),
``["reference", text]`` or a top-level ``"reference"`` (a text the conversation is about) and a
top-level ``"api_desc"`` (the tools' documentation); both go into the system message.
A ``type`` field (text | instruction | conversation | preference | prompt) forces the shape.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, List, Optional, Union

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
USER_ROLES = {"ask", "user", "human", "question"}
ANSWER_ROLES = {"ans", "assistant", "gpt", "answer"}


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
    if kind not in TYPES:
        raise RecordError("unknown_format", f"unknown type {kind!r}; valid: {', '.join(TYPES)}")
    return _PARSERS[kind](obj)


def _guess_type(obj: dict) -> str:
    keys = set(obj)
    if {"chosen", "rejected"} <= keys:
        return "preference"
    if "rounds" in keys:
        return "conversation"
    if keys & {"instruction", "instruct"} or ("prompt" in keys and keys & {"answer", "response", "output"}):
        return "instruction"
    if "prompt" in keys:
        return "prompt"
    if "text" in keys or "content" in keys:
        return "text"
    raise RecordError("unknown_format", f"record with keys {sorted(keys)} matches no known format "
                                        "(text, title/content, instruction/output, prompt/response, "
                                        "rounds, prompt/chosen/rejected, prompt)")


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
    user = Turn("user", question, input=_str(obj, "input", required=False) or None)
    return Chat([user, Turn("assistant", [(answer, True)])], system=_str(obj, "system", required=False))


def _single_prompt(obj) -> Chat:
    return Chat([Turn("user", _str(obj, "prompt", "instruction", "instruct"))], system=_str(obj, "system", required=False))


def _preference(obj):
    return Preference(_single_prompt(obj), _str(obj, "chosen", reason="empty_answer"),
                      _str(obj, "rejected", reason="empty_answer"))


def _prompt(obj):
    if "rounds" in obj:
        chat = _conversation(obj, allow_open=True)
        if chat.turns[-1].role != "user":
            raise RecordError("no_final_question", "a prompt conversation must end with an ask")
        return Prompt(chat)
    return Prompt(_single_prompt(obj))


def _conversation(obj, allow_open: bool = False) -> Chat:
    rounds = obj.get("rounds")
    if not isinstance(rounds, list) or not rounds:
        raise RecordError("unknown_format", "'rounds' must be a non-empty list of [role, content]")
    system_parts = [s for s in (_str(obj, "system", required=False),) if s]
    if obj.get("reference"):
        system_parts.append("Reference:\n" + _as_text(obj["reference"]))
    if obj.get("api_desc"):
        system_parts.append("You can call these tools:\n" + _as_text(obj["api_desc"]))
    turns: List[Turn] = []
    for n, entry in enumerate(rounds):
        if not isinstance(entry, list) or len(entry) < 2 or not isinstance(entry[0], str):
            raise RecordError("unknown_format", f"round {n} must be [role, content], got {json.dumps(entry, ensure_ascii=False)[:80]}")
        role, payload = entry[0], entry[1] if len(entry) == 2 else entry[1:]
        if role == "reference":
            system_parts.append("Reference:\n" + _as_text(payload))
        elif role == "system":
            system_parts.insert(0, _as_text(payload))
        elif role in USER_ROLES:
            text = _message_text(payload, n, role)
            if turns and turns[-1].role == "user":
                turns[-1].content += "\n" + text
            else:
                turns.append(Turn("user", text))
        elif role in ANSWER_ROLES or role == "ans-api":
            parts = _api_answer(payload, n) if role == "ans-api" else [(_message_text(payload, n, role), True)]
            if not parts[-1][0].strip():
                raise RecordError("empty_answer", f"round {n}: the answer is empty")
            if not turns or turns[-1].role != "user":
                if not turns:
                    raise RecordError("unknown_format", f"round {n}: the conversation starts with an answer")
                turns[-1].content += [("\n", True)] + parts
            else:
                turns.append(Turn("assistant", parts))
        else:
            raise RecordError("unknown_format", f"round {n}: unknown role {role!r} (ask, ans, ans-api, reference, system)")
    if not turns:
        raise RecordError("unknown_format", "the conversation has no ask")
    if turns[-1].role != "assistant" and not allow_open:
        raise RecordError("no_final_answer", "the conversation ends without an answer")
    return Chat(turns, system="\n\n".join(system_parts) or None)


def _api_answer(payload, n):
    """ReAct-style text: the model learns its thought, the call and the answer, never the tool's result."""
    if isinstance(payload, list) and payload and isinstance(payload[-1], str):
        payload = {"actions": payload[:-1], "answer": payload[-1]}
    if not isinstance(payload, dict) or not isinstance(payload.get("actions", []), list):
        raise RecordError("unknown_format", f"round {n}: ans-api needs {{'actions': [...], 'answer': ...}}")
    parts = []
    for a in payload.get("actions", []):
        if not isinstance(a, dict):
            raise RecordError("unknown_format", f"round {n}: an api action must be an object")
        name = a.get("api_name") or a.get("name")
        if not name:
            raise RecordError("unknown_format", f"round {n}: an api action has no api_name")
        params = a.get("params", a.get("api_params", {}))
        result = a.get("result", a.get("api_result", a.get("observation", "")))
        thought = f"Thought: {a['thought']}\n" if a.get("thought") else ""
        parts.append((f"{thought}Action: {name}\nAction Input: {_as_text(params)}\n", True))
        parts.append((f"Observation: {_as_text(result)}\n", False))
    answer = payload.get("answer", "")
    if not isinstance(answer, str):
        raise RecordError("bad_field", f"round {n}: the api answer must be a string")
    parts.append((answer, True))
    return parts


def _message_text(value, n: int, role: str) -> str:
    """What a person or the model said is text: null, a number or an object would be learned literally."""
    if not isinstance(value, str):
        shown = json.dumps(value, ensure_ascii=False)[:60]
        raise RecordError("bad_field", f"round {n}: the {role!r} content must be a string, got "
                                       f"{'null' if value is None else type(value).__name__} {shown}")
    return value


def _as_text(value) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)


_PARSERS = {"text": _text, "instruction": _instruction, "conversation": _conversation,
            "preference": _preference, "prompt": _prompt}
