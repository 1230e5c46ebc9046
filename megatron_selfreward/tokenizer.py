"""Tokenizers and chat formats behind one small interface.

`Tokenizer` is what stages and trainers use: encode/decode text, render a conversation in the
model's chat format (ChatML for SmolLM2, Llama 2's `[INST]` format), and know the end-of-turn
token. Two implementations: a Hugging Face tokenizer directory (real models), and a byte-level
tokenizer for the random-init `tiny` preset (no files needed; text round-trips exactly).
The chat format is rendered here, not by the tokenizer's Jinja template, so SFT data, judge
prompts and generation use one format whatever tokenizer files a checkpoint carries.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, Sequence

Message = dict[str, str]

LLAMA2_SYSTEM_OPEN, LLAMA2_SYSTEM_CLOSE = "<<SYS>>\n", "\n<</SYS>>\n\n"


def render_chat(messages: Sequence[Message], template: str, add_generation_prompt: bool) -> str:
    """A conversation as text in `template` ("chatml" or "llama2")."""
    if template == "chatml":
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")
    if template == "llama2":
        return _render_llama2(messages, add_generation_prompt)
    raise ValueError(f"unknown chat template {template!r} (model.chat_template: chatml | llama2)")


def _render_llama2(messages: Sequence[Message], add_generation_prompt: bool) -> str:
    system = ""
    turns = list(messages)
    if turns and turns[0]["role"] == "system":
        system = LLAMA2_SYSTEM_OPEN + turns.pop(0)["content"] + LLAMA2_SYSTEM_CLOSE
    text = ""
    for i, message in enumerate(turns):
        if message["role"] == "user":
            prefix = system if i == 0 else ""
            text += f"<s>[INST] {prefix}{message['content'].strip()} [/INST]"
        else:
            text += f" {message['content'].strip()} </s>"
    # Llama 2's assistant turn starts right after [/INST]: nothing to add for generation.
    del add_generation_prompt
    return text


def end_of_turn(template: str) -> str:
    return {"chatml": "<|im_end|>", "llama2": "</s>"}[template]


class Tokenizer(Protocol):
    eos_token_id: int
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens (ids 3..258) plus the chat specials; for random-init test models."""

    SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
    OFFSET = len(SPECIALS)

    def __init__(self, vocab_size: int = 512) -> None:
        if vocab_size < 256 + self.OFFSET:
            raise ValueError(f"a byte tokenizer needs model.vocab_size >= {256 + self.OFFSET}")
        self.vocab_size = vocab_size
        self.eos_token_id = self.SPECIALS.index("<|im_end|>")

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        rest = text
        while rest:
            special = next((s for s in self.SPECIALS if rest.startswith(s)), None)
            if special:
                ids.append(self.SPECIALS.index(special))
                rest = rest[len(special):]
                continue
            cut = min([i for s in self.SPECIALS if (i := rest.find(s)) > 0] + [len(rest)])
            ids.extend(b + self.OFFSET for b in rest[:cut].encode("utf-8"))
            rest = rest[cut:]
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        out, buf = [], bytearray()
        for i in ids:
            if i < self.OFFSET or i >= 256 + self.OFFSET:
                out.append(buf.decode("utf-8", errors="replace"))
                buf = bytearray()
                if i < self.OFFSET:
                    out.append(self.SPECIALS[i])
                continue
            buf.append(i - self.OFFSET)
        out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)


class HFTokenizer:
    """A Hugging Face tokenizer directory (tokenizer.json / tokenizer.model + configs)."""

    def __init__(self, directory: str | Path, template: str) -> None:
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(str(directory))
        self.vocab_size = len(self.tok)
        eot = self.tok.convert_tokens_to_ids(end_of_turn(template))
        self.eos_token_id = eot if isinstance(eot, int) and eot >= 0 else self.tok.eos_token_id

    def encode(self, text: str) -> list[int]:
        # Chat text carries its own BOS where the format wants one (Llama 2's "<s>").
        return self.tok.encode(text, add_special_tokens=False)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)
