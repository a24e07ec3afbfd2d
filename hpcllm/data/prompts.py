"""Prompt formats per model family: a conversation -> pieces of text, each learned or not.

A format is a handful of templates taken from the family's published chat template (its
``chat()`` / ``build_prompt`` code or ``chat_template``).  Rendering yields ``Piece``s:

* plain text, tokenized as the family's own code would tokenize it;
* special tokens (``special=True``), which are looked up by name in the vocabulary and
  never run through the tokenizer, so ``<sep>`` can never become ``<``, ``sep``, ``>``.

Every answer turn is learned together with the token that closes it (the family's
end-of-turn / end-of-sequence token), so that a model learns where to stop after every turn,
not only after the last one (as LLaMA-Factory and the families' own fine-tuning code do).
Tokens are referred to by a name (``eos``, ``sep``, ...); a model preset's
``special_tokens`` may map a name to another token string, and ``None`` means the tokenizer's
own ``bos_token`` / ``eos_token``.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple, Union


class Piece(NamedTuple):  # a tuple: millions are made, a frozen dataclass costs 3x as much
    text: str  # the text, or for special pieces the token string
    learned: bool
    special: bool = False


@dataclass
class Turn:
    role: str  # "user" | "assistant"
    # user: the text; assistant: (text, learned) parts (a tool result inside an answer is not learned)
    content: Union[str, List[Tuple[str, bool]]]
    input: Optional[str] = None  # the optional "input" of an instruction record


@dataclass
class Chat:
    turns: List[Turn]
    system: Optional[str] = None


# Template elements: ("text", template, learned) | ("tok", name, learned) | ("content",)
def T(text: str, learned: bool = False):
    return ("text", text, learned)


def S(name: str, learned: bool = False):
    return ("tok", name, learned)


C = ("content",)
_FIELD = re.compile(r"\{(content|round|input)\}")


@dataclass(frozen=True)
class PromptFormat:
    id: str
    user: Tuple  # one user turn including the cue that hands over to the assistant
    assistant: Tuple  # one assistant turn; C marks where the answer goes
    prefix: Tuple = ()  # once at the start of a sequence
    system: Optional[Tuple] = None  # None: the system text is put before the first user message
    user_with_input: Optional[Tuple] = None  # instruction records with an "input" (alpaca)
    default_system: Optional[str] = None
    default_system_with_input: Optional[str] = None
    system_in_first_user: str = "{system}\n\n{content}"  # when system is None
    round_base: int = 0
    tokens: Dict[str, Optional[str]] = field(default_factory=dict)  # name -> token; None = tokenizer's own

    def token_names(self) -> List[str]:
        """Names of the special tokens this format emits."""
        names = []
        for template in (self.prefix, self.system or (), self.user, self.user_with_input or (), self.assistant):
            names += [e[1] for e in template if e[0] == "tok" and e[1] not in names]
        return names

    def resolve_tokens(self, overrides: Optional[Dict[str, str]] = None, tokenizer=None) -> Dict[str, str]:
        """Token strings by name: the preset's ``special_tokens`` over this format's defaults."""
        out = {}
        for name in self.token_names():
            value = (overrides or {}).get(name, self.tokens.get(name))
            if value is None and name in ("bos", "eos") and tokenizer is not None:
                value = getattr(tokenizer, f"{name}_token")
            if value is None:
                raise ValueError(f"prompt format {self.id!r} needs a {name!r} token: the tokenizer has none; "
                                 f"set model.special_tokens.{name}")
            out[name] = value
        return out

    def render(self, chat: Chat, tokens: Dict[str, str], generation_prompt: bool = False,
               marks: Optional[List[Tuple[str, int]]] = None) -> List[Piece]:
        """Pieces of the whole conversation; ``generation_prompt``: it ends with a user turn to answer.
        ``marks`` receives (role, character offset) where each turn starts (truncation cuts there)."""
        pieces: List[Piece] = []
        length = [0]  # characters in pieces

        def mark(role):
            if marks is not None:
                marks.append((role, length[0]))

        def emit(template, **values):
            length[0] += self._emit(pieces, template, tokens, _Values(values))

        emit(self.prefix)
        system = chat.system
        first_with_input = bool(chat.turns and chat.turns[0].input)
        if system is None:
            system = self.default_system_with_input if first_with_input and self.default_system_with_input else self.default_system
        if system and self.system is not None:
            emit(self.system, content=system)
        round_no = self.round_base
        for i, turn in enumerate(chat.turns):
            mark(turn.role)
            if turn.role == "user":
                text = turn.content
                if i == 0 and system and self.system is None:
                    text = self.system_in_first_user.replace("{system}", system).replace("{content}", text)
                if turn.input and self.user_with_input is not None:
                    emit(self.user_with_input, content=text, input=turn.input, round=str(round_no))
                else:
                    emit(self.user, content=text + (f"\n{turn.input}" if turn.input else ""), round=str(round_no))
            else:
                emit(self.assistant, answer=turn.content)
                round_no += 1
        if generation_prompt and (not chat.turns or chat.turns[-1].role != "user"):
            raise ValueError("a generation prompt must end with a user turn")
        return _merge(pieces)

    @staticmethod
    def _emit(pieces, template, tokens, values) -> int:
        """Append a template's pieces; returns the characters appended."""
        added = 0
        for element in template:
            if element[0] == "content":
                for text, learned in values["answer"]:
                    if text:
                        pieces.append(Piece(text, learned))
                        added += len(text)
            else:
                special = element[0] == "tok"
                text = tokens[element[1]] if special else _formatter(element[1]).format_map(values)
                if text:
                    pieces.append(Piece(text, element[2], special))
                    added += len(text)
        return added


@functools.lru_cache(maxsize=None)
def _formatter(template: str) -> str:
    """A template as a ``str.format_map`` string: its {content}/{round}/{input} fields kept, any other
    brace escaped (a missing field renders empty, see ``_Values``)."""
    parts = _FIELD.split(template)  # literal, name, literal, name, ...
    return "".join(p.replace("{", "{{").replace("}", "}}") if i % 2 == 0 else "{" + p + "}" for i, p in enumerate(parts))


class _Values(dict):
    def __missing__(self, key):
        return ""


def _merge(pieces: Sequence[Piece]) -> List[Piece]:
    """Join neighbouring text pieces of the same kind: the family's code tokenizes them as one string."""
    out: List[Piece] = []
    for p in pieces:
        if out and not p.special and not out[-1].special and out[-1].learned == p.learned:
            out[-1] = Piece(out[-1].text + p.text, p.learned)
        else:
            out.append(p)
    return out


ALPACA = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
ALPACA_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further context. "
                "Write a response that appropriately completes the request.")

FORMATS: Dict[str, PromptFormat] = {f.id: f for f in [
    # PanGu-alpha SFT: prompt<sep>answer<eot>
    PromptFormat("pangu", user=(T("{content}"), S("sep")), assistant=(C, S("eot", True)),
                 tokens={"sep": "<sep>", "eot": "<eot>"}),
    # GLM blank infilling: [CLS] prompt [gMASK] <|endoftext|> <|startofpiece|> answer <|endofpiece|>
    PromptFormat("glm", prefix=(S("cls"),), user=(T("{content}"), S("gmask"), S("eos"), S("sop")),
                 assistant=(C, S("eop", True)),
                 tokens={"cls": "[CLS]", "gmask": "[gMASK]", "eos": "<|endoftext|>", "sop": "<|startofpiece|>",
                         "eop": "<|endofpiece|>"}),
    # ChatGLM-6B: [Round i]\n问：q\n答：[gMASK]<sop> answer <eop>
    PromptFormat("chatglm", user=(T("[Round {round}]\n问：{content}\n答："), S("gmask"), S("sop")),
                 assistant=(C, S("eop", True), T("\n")),
                 tokens={"gmask": "[gMASK]", "sop": "<sop>", "eop": "<eop>"}),
    # ChatGLM2-6B: [gMASK]sop [Round 1]\n\n问：q\n\n答：answer</s>\n\n
    PromptFormat("chatglm2", prefix=(S("gmask"), S("sop")), user=(T("[Round {round}]\n\n问：{content}\n\n答："),),
                 assistant=(C, S("eos", True), T("\n\n")), round_base=1,
                 tokens={"gmask": "[gMASK]", "sop": "sop", "eos": None}),
    # ChatGLM3-6B: [gMASK]sop<|system|>\n sys<|user|>\n q<|assistant|>\n answer</s>
    PromptFormat("chatglm3", prefix=(S("gmask"), S("sop")), system=(S("system"), T("\n{content}")),
                 user=(S("user"), T("\n{content}"), S("assistant")), assistant=(T("\n"), C, S("eos", True)),
                 tokens={"gmask": "[gMASK]", "sop": "sop", "system": "<|system|>", "user": "<|user|>",
                         "assistant": "<|assistant|>", "eos": None}),
    # Stanford Alpaca
    PromptFormat("alpaca", prefix=(S("bos"),), system=(T("{content}\n\n"),),
                 user=(T("### Instruction:\n{content}\n\n### Response:\n"),),
                 user_with_input=(T("### Instruction:\n{content}\n\n### Input:\n{input}\n\n### Response:\n"),),
                 assistant=(C, S("eos", True), T("\n\n")), default_system=ALPACA,
                 default_system_with_input=ALPACA_INPUT, tokens={"bos": None, "eos": None}),
    # Llama-2-chat: <s>[INST] <<SYS>>\nsys\n<</SYS>>\n\nq [/INST] answer </s>
    # (the prompt ends at "[/INST]": the model writes the space before its answer too)
    PromptFormat("llama2_chat", user=(S("bos"), T("[INST] {content} [/INST]")),
                 assistant=(T(" ", True), C, T(" ", True), S("eos", True)),
                 system_in_first_user="<<SYS>>\n{system}\n<</SYS>>\n\n{content}", tokens={"bos": None, "eos": None}),
    # Llama-3-instruct
    PromptFormat("llama3_chat", prefix=(S("bos"),),
                 system=(S("header_start"), T("system"), S("header_end"), T("\n\n{content}"), S("eot")),
                 user=(S("header_start"), T("user"), S("header_end"), T("\n\n{content}"), S("eot"),
                       S("header_start"), T("assistant"), S("header_end"), T("\n\n")),
                 assistant=(C, S("eot", True)),
                 tokens={"bos": "<|begin_of_text|>", "header_start": "<|start_header_id|>",
                         "header_end": "<|end_header_id|>", "eot": "<|eot_id|>"}),
    # BLOOM fine-tunes (BELLE): Human: q\n\nAssistant: answer</s>
    PromptFormat("bloom", user=(T("Human: {content}\n\nAssistant: "),), assistant=(C, S("eos", True), T("\n\n")),
                 tokens={"eos": None}),
    # Baichuan2-chat: <reserved_106>q<reserved_107>answer</s>
    PromptFormat("baichuan2", system=(T("{content}"),), user=(S("user"), T("{content}"), S("assistant")),
                 assistant=(C, S("eos", True)),
                 tokens={"user": "<reserved_106>", "assistant": "<reserved_107>", "eos": None}),
    # ChatML (Qwen): <|im_start|>role\ncontent<|im_end|>\n
    PromptFormat("chatml", system=(S("im_start"), T("system\n{content}"), S("im_end"), T("\n")),
                 user=(S("im_start"), T("user\n{content}"), S("im_end"), T("\n"), S("im_start"), T("assistant\n")),
                 assistant=(C, S("im_end", True), T("\n")), default_system="You are a helpful assistant.",
                 tokens={"im_start": "<|im_start|>", "im_end": "<|im_end|>"}),
    # Mistral-instruct v0.1: <s>[INST] q [/INST]answer</s>
    PromptFormat("mistral_inst", prefix=(S("bos"),), user=(T("[INST] {content} [/INST]"),),
                 assistant=(C, S("eos", True)), tokens={"bos": None, "eos": None}),
]}


class ChatTemplateFormat:
    """``prompt_format=tokenizer``: the tokenizer's own ``chat_template`` renders the conversation
    (``apply_chat_template``). An assistant turn is learned from where the template's generation
    prompt ends to where the template closes that turn (its end token included); a tool's result
    inside an answer is given to the template as a ``tool`` message and is not learned."""

    id = "tokenizer"

    def __init__(self, tokenizer=None):
        self.tokenizer = tokenizer

    def bind(self, tokenizer) -> "ChatTemplateFormat":
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("prompt_format=tokenizer needs a tokenizer with a chat_template; this one has none: "
                             "name a model preset (model=...) for the family's format")
        return ChatTemplateFormat(tokenizer)

    def token_names(self) -> List[str]:
        return []

    def resolve_tokens(self, overrides=None, tokenizer=None) -> Dict[str, str]:
        return {}

    def render(self, chat: Chat, tokens: Dict[str, str], generation_prompt: bool = False,
               marks: Optional[List[Tuple[str, int]]] = None) -> List[Piece]:
        messages = ([{"role": "system", "content": chat.system}] if chat.system else [])
        pieces: List[Piece] = []
        done = 0  # characters of the full text already in pieces
        for turn in chat.turns:
            if turn.role == "user":
                messages.append({"role": "user", "content": turn.content + (f"\n{turn.input}" if turn.input else "")})
                continue
            for i, message in enumerate(_template_messages(turn.content)):
                if message["role"] == "tool":  # not learned: it goes with the text before the next answer
                    messages.append(message)
                    continue
                cue = self._text(messages, generation_prompt=True)
                messages.append(message)
                through = self._text(messages)
                if not through.startswith(cue) or cue[:done] != "".join(p.text for p in pieces):
                    raise ValueError("the tokenizer's chat_template renders an earlier part of the conversation "
                                     "differently once it goes on, so the answers cannot be marked: use a model "
                                     "preset's prompt format")
                _mark(marks, "user" if i == 0 else "tool", pieces)
                pieces.append(Piece(cue[done:], False))
                if i == 0:
                    _mark(marks, "assistant", pieces)
                pieces.append(Piece(through[len(cue):], True))
                done = len(through)
        if generation_prompt:
            _mark(marks, "user", pieces)
            pieces.append(Piece(self._text(messages, generation_prompt=True)[done:], False))
        return [p for p in pieces if p.text]

    def _text(self, messages, generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _mark(marks, role: str, pieces: List[Piece]):
    if marks is not None:
        marks.append((role, sum(len(p.text) for p in pieces)))


def _template_messages(parts: List[Tuple[str, bool]]) -> List[dict]:
    """An answer's (text, learned) parts as chat messages: a not-learned part is a tool's result."""
    out: List[dict] = []
    for text, learned in parts:
        role = "assistant" if learned else "tool"
        if out and out[-1]["role"] == role:
            out[-1]["content"] += text
        else:
            out.append({"role": role, "content": text})
    return out


def get_format(format_id: str):
    if format_id == ChatTemplateFormat.id:
        return ChatTemplateFormat()
    if format_id not in FORMATS:
        raise ValueError(f"unknown prompt_format {format_id!r}; valid: {', '.join(sorted(FORMATS))}, tokenizer "
                         "(the tokenizer's own chat_template)")
    return FORMATS[format_id]


def all_special_tokens() -> List[str]:
    """Every non-bos/eos token string some format needs (the demo tokenizer holds them all)."""
    out = []
    for f in FORMATS.values():
        for name, value in f.tokens.items():
            if value is not None and value not in out:
                out.append(value)
    return out
