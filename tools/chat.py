"""Talk to a trained model, or generate answers for a file of prompts.

    python tools/chat.py RUN/final                                  # interactive, streaming
    python tools/chat.py RUN/final prompts=questions.jsonl output=answers.jsonl temperature=0
    python tools/chat.py MODEL_DIR prompt_format=tokenizer system="You are a helpful assistant."

RUN/final may hold full weights or a LoRA / P-tuning adapter (loaded on its base). The prompt is the one
the model was trained with (its hpcllm_config.yaml's prompt format), else the tokenizer's chat template.
Interactive commands: /reset forgets the conversation, /exit (or Ctrl-D) quits.
Prompt files (jsonl): {"prompt"} | {"instruction", "input"?} | {"messages": [{"role", "content"}, ...]},
each with an optional "system"; the output repeats each record with its "response".
"""
import json
import os
import sys
from dataclasses import dataclass
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from omegaconf import OmegaConf  # noqa: E402

from hpcllm.models.generate import ChatModel, Conversation, Sampling  # noqa: E402


@dataclass
class ChatConfig:
    model: str = "???"  # a run's final/ or any Hugging Face model directory (also the first argument)
    prompts: Optional[str] = None  # jsonl of prompts: batch generation instead of a chat
    output: Optional[str] = None  # batch: where the answers go (default: standard output)
    prompt_format: str = "auto"  # auto | tokenizer | plain | a format id of hpcllm.data.prompts
    system: Optional[str] = None
    max_new_tokens: int = 256
    temperature: float = 0.7  # 0 = greedy
    top_p: float = 0.9
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int = 1234
    dtype: str = "auto"  # auto | fp32 | fp16 | bf16
    device: str = "auto"  # auto (GPUs when there are any) | cpu
    trust_remote_code: Optional[bool] = None  # None = what the run's config says (False for other directories)


def conversation(record: dict, where: str, system: Optional[str]) -> Conversation:
    system = record.get("system", system)
    if isinstance(record.get("messages"), list):
        messages = [m for m in record["messages"] if m.get("role") in ("user", "assistant")]
        system = next((m["content"] for m in record["messages"] if m.get("role") == "system"), system)
        return Conversation(system, messages)
    text = record.get("prompt", record.get("instruction"))
    if not isinstance(text, str):
        raise ValueError(f"{where}: a prompt record needs a string 'prompt', 'instruction' or a 'messages' list; "
                         f"it has {sorted(record)}")
    return Conversation(system, [{"role": "user", "content": text, "input": record.get("input") or None}])


def batch(chat: ChatModel, cfg: ChatConfig, sampling: Sampling) -> None:
    out = open(cfg.output, "w", encoding="utf-8") if cfg.output else sys.stdout
    with open(cfg.prompts, encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            record = json.loads(line)
            record["response"] = chat.reply(conversation(record, f"{cfg.prompts}:{number}", cfg.system), sampling)
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
            out.flush()
    if cfg.output:
        out.close()
        print(f"answers written to {cfg.output}", file=sys.stderr)


def interactive(chat: ChatModel, cfg: ChatConfig, sampling: Sampling) -> None:
    from transformers import TextStreamer

    streamer = TextStreamer(chat.tokenizer, skip_prompt=True, skip_special_tokens=True)
    conv = Conversation(cfg.system)
    print(f"chatting with {cfg.model} (prompt format: {chat.format_id}); /reset, /exit")
    while True:
        try:
            text = input("user> ").strip()
        except EOFError:
            return
        if text == "/exit":
            return
        if text == "/reset":
            conv = Conversation(cfg.system)
            continue
        conv.messages.append({"role": "user", "content": text})
        print("assistant> ", end="", flush=True)
        conv.messages.append({"role": "assistant", "content": chat.reply(conv, sampling, streamer=streamer)})


def main(argv) -> int:
    if argv and "=" not in argv[0]:
        argv = [f"model={argv[0]}", *argv[1:]]
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ChatConfig), OmegaConf.from_cli(argv)))
    import torch

    torch.manual_seed(cfg.seed)
    try:
        chat = ChatModel(cfg.model, prompt_format=cfg.prompt_format, dtype=cfg.dtype,
                         trust_remote_code=cfg.trust_remote_code, device=cfg.device)
    except (FileNotFoundError, ValueError) as err:
        sys.exit(f"chat: {err}")
    sampling = Sampling(cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.top_k, cfg.repetition_penalty)
    if cfg.prompts:
        batch(chat, cfg, sampling)
    else:
        interactive(chat, cfg, sampling)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
