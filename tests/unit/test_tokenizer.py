"""Chat formats and the byte tokenizer of the random-init presets."""

from __future__ import annotations

import pytest

from megatron_selfreward.tokenizer import ByteTokenizer, render_chat

CONV = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}]


def test_chatml_matches_the_smollm2_format():
    text = render_chat(CONV[:1], "chatml", add_generation_prompt=True)
    assert text == "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    full = render_chat(CONV, "chatml", add_generation_prompt=False)
    assert full.endswith("<|im_start|>assistant\nHello!<|im_end|>\n")


def test_llama2_format_with_system_prompt():
    conv = [{"role": "system", "content": "Be brief."}, *CONV, {"role": "user", "content": "Bye"}]
    text = render_chat(conv, "llama2", add_generation_prompt=True)
    assert text == ("<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi there [/INST] Hello! </s>"
                    "<s>[INST] Bye [/INST]")


def test_unknown_template_is_an_error():
    with pytest.raises(ValueError, match="model.chat_template"):
        render_chat(CONV, "vicuna", True)


@pytest.mark.parametrize("text", ["plain ascii", "naïve café — 東京", "<|im_start|>user\nx<|im_end|>\n", ""])
def test_byte_tokenizer_round_trips(text):
    tok = ByteTokenizer(512)
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert all(0 <= i < 259 for i in ids)


def test_byte_tokenizer_specials_are_single_tokens():
    tok = ByteTokenizer(512)
    ids = tok.encode("a<|im_end|>")
    assert ids[-1] == tok.eos_token_id and len(ids) == 2
    with pytest.raises(ValueError, match="vocab_size"):
        ByteTokenizer(100)
