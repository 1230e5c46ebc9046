"""MegatronEngine: KV-cache decoding equals full recompute; sampling, reuse and stopping semantics.

The tiny random model (configs/tiny.yaml, dropout 0, eval mode) is the reference for exactness:
every greedy continuation is checked against an argmax loop that reruns the model's own forward
on the whole sequence at each step. The SmolLM2 test checks the real model against transformers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from pathlib import Path
from typing import Iterator

import pytest
import torch

import megatron_selfreward.generation.megatron_engine as engine_mod
import megatron_selfreward.generation.runner as runner_mod
import megatron_selfreward.generation.sampling as sampling_mod
from megatron_selfreward.config import load_config
from megatron_selfreward.generation.engine import GenerationRequest, SamplingParams, sample_seed
from megatron_selfreward.generation.megatron_engine import MegatronEngine, MegatronRunner
from megatron_selfreward.generation.packed_linear import packing_supported
from megatron_selfreward.generation.sampling import sample_tokens
from megatron_selfreward.kernels import decode_cpu
from megatron_selfreward.megatron.model import build_model
from megatron_selfreward.megatron.parallel import single_process_world
from tests.conftest import CONFIGS

VOCAB = 512


@pytest.fixture(scope="module")
def tiny() -> Iterator[tuple]:
    # A larger init spreads the logits, so greedy choices are not near-ties between recompute
    # and cached paths (differences are ~1e-7).
    cfg = load_config(CONFIGS / "tiny.yaml", ["model.init_std=0.1"])
    with single_process_world():
        torch.manual_seed(0)
        model = build_model(cfg).eval()
        yield cfg, model


def prompts_with_shared_head(lengths: list[int], head: int = 12, seed: int = 1) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    shared = torch.randint(0, VOCAB, (head,), generator=gen).tolist()
    return [shared + torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in lengths]


def recompute_greedy(model, prompt: list[int], steps: int) -> tuple[list[int], list[float]]:
    """Argmax loop without a cache: the model's own forward over the whole sequence each step."""
    tokens, logprobs = list(prompt), []
    with torch.inference_mode():
        for _ in range(steps):
            ids = torch.tensor([tokens])
            logits = model(ids, torch.arange(len(tokens))[None], attention_mask=None)[0, -1, :VOCAB]
            token = int(logits.argmax())
            logprobs.append(float(torch.log_softmax(logits.float(), -1)[token]))
            tokens.append(token)
    return tokens[len(prompt):], logprobs


def greedy(max_new: int = 10, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_new_tokens=max_new, **kw)


def requests_for(prompts: list[list[int]], params: SamplingParams) -> list[GenerationRequest]:
    return [GenerationRequest(f"r{i}", p, params) for i, p in enumerate(prompts)]


@pytest.mark.parametrize("path", ["direct", "direct_torch", "direct_unpacked", "modules"])
def test_greedy_equals_full_recompute(tiny, path: str) -> None:
    cfg, model = tiny
    prompts = prompts_with_shared_head([3, 9, 1, 14]) + [torch.arange(5, 12).tolist()]
    engine = MegatronEngine(model, cfg, cpu_kernels="off" if path == "direct_torch" else "on")
    assert engine.runner.direct is not None, "the tiny model is plain Llama: direct path"
    assert engine.runner.pack == packing_supported(torch.float32, torch.device("cpu"))
    assert engine.runner.kernels == (path != "direct_torch"), "decode steps on the C++ kernels"
    if path == "direct_unpacked":
        engine.runner = MegatronRunner(model, cfg.model.vocab_size, pack=False)  # F.linear GEMMs
    if path == "modules":
        engine.runner.direct = None  # run every layer through its Megatron modules
    results = engine.generate(requests_for(prompts, greedy(10)))
    for prompt, result in zip(prompts, results):
        expected, expected_lp = recompute_greedy(model, prompt, 10)
        (sample,) = result.samples
        assert sample.token_ids == expected
        assert sample.finish_reason == "length"
        assert max(abs(a - b) for a, b in zip(sample.logprobs, expected_lp)) < 1e-4


def test_results_in_input_order_across_micro_batches(tiny) -> None:
    cfg, model = tiny
    prompts = prompts_with_shared_head([7, 2, 5, 4, 6, 3, 1], seed=3)
    for continuous in (False, True):
        engine = MegatronEngine(model, cfg, max_batch_size=3, continuous=continuous)
        results = engine.generate(requests_for(prompts, greedy(4)))
        assert [r.request_id for r in results] == [f"r{i}" for i in range(len(prompts))]
        assert engine.stats["micro_batches"] == (1 if continuous else 3)
        for prompt, result in zip(prompts, results):
            assert result.samples[0].token_ids == recompute_greedy(model, prompt, 4)[0]


def test_prefix_reuse_changes_nothing_but_work(tiny) -> None:
    cfg, model = tiny
    prompts = prompts_with_shared_head([4, 8, 2, 6], head=40, seed=4)  # a judge-style batch
    params = dataclasses.replace(greedy(8), n=2)
    outputs, stats = {}, {}
    for reuse in (True, False):
        engine = MegatronEngine(model, cfg, prefix_reuse=reuse)
        outputs[reuse] = engine.generate(requests_for(prompts, params))
        stats[reuse] = engine.stats
    for with_reuse, without in zip(outputs[True], outputs[False]):
        for a, b in zip(with_reuse.samples, without.samples):
            assert a.token_ids == b.token_ids
            assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) < 1e-5
    requested = sum(len(p) for p in prompts) * 2
    assert stats[True]["prefill_tokens_requested"] == stats[False]["prefill_tokens_requested"] == requested
    # n samples share one prefill either way; the shared 40-token head is computed once with reuse.
    assert stats[False]["prefill_tokens_computed"] == sum(len(p) for p in prompts)
    assert stats[True]["prefill_tokens_computed"] == 40 + sum(len(p) - 40 for p in prompts)
    assert stats[True]["prefill_saved_fraction"] > 0.8


def test_cpu_kernels_auto_and_when_they_cannot_build(tiny, monkeypatch) -> None:
    """auto: the kernels when they build, else the plain torch path (same tokens); on: a clear
    error saying what to install."""
    cfg, model = tiny
    prompts = prompts_with_shared_head([3, 6])
    built = MegatronEngine(model, cfg)  # generation.cpu_kernels defaults to auto
    assert built.cpu_kernels == "auto" and built.runner.kernels, "auto uses the kernels that build"
    reference = built.generate(requests_for(prompts, greedy(6)))
    monkeypatch.setattr(decode_cpu, "_state", {"loaded": False, "error": "c++: not found"})
    engine = MegatronEngine(model, cfg)
    assert not engine.runner.kernels
    results = engine.generate(requests_for(prompts, greedy(6)))
    assert [r.samples[0].token_ids for r in results] == [r.samples[0].token_ids for r in reference]
    with pytest.raises(RuntimeError, match="c\\+\\+: not found.*apt-get install -y g\\+\\+"):
        MegatronEngine(model, cfg, cpu_kernels="on")
    with pytest.raises(ValueError, match="cpu_kernels: on needs plain Llama"):
        MegatronEngine(model, cfg, dtype="float16", cpu_kernels="on")


@pytest.mark.parametrize("path", ["direct", "direct_torch", "modules"])
def test_shared_prefix_attention_equals_copied_prefix(tiny, monkeypatch, path: str) -> None:
    """A long shared prefix stays in one cache row (attention split at the prefix and merged by
    log-sum-exp in torch, one pass over prefix and own columns in the C++ kernel): same greedy
    tokens as the full recompute, same as copying it into every row, through prefill chunks,
    n > 1 row copies and compaction of finished rows."""
    cfg, model = tiny
    prompts = prompts_with_shared_head([4, 8, 2, 6], head=40, seed=13)
    params = dataclasses.replace(greedy(8), n=2)
    outputs, calls, kernel_calls = {}, [], []
    split_attention = MegatronRunner._attend_with_prefix
    monkeypatch.setattr(MegatronRunner, "_attend_with_prefix",
                        lambda self, *a: calls.append(1) or split_attention(self, *a))
    kernel = decode_cpu.decode_attention
    monkeypatch.setattr(decode_cpu, "decode_attention",
                        lambda *a: kernel_calls.append(a[8]) or kernel(*a))  # a[8]: prefix_len
    for min_tokens in (10**9, 1):  # copied into rows / kept in one row
        monkeypatch.setattr(engine_mod, "SHARED_PREFIX_ATTENTION_MIN_TOKENS", min_tokens)
        monkeypatch.setattr(runner_mod, "PREFILL_CHUNK_TOKENS", 3)  # suffix prefill in chunks
        kernel_calls.clear()
        engine = MegatronEngine(model, cfg, eos_token_ids=[7],  # some rows finish early
                                cpu_kernels="on" if path == "direct" else "off")
        if path == "modules":
            engine.runner.direct = None
        outputs[min_tokens] = engine.generate(requests_for(prompts, params))
    steps = engine.stats["decode_steps"]
    if path == "direct":
        # One-token steps (decode, and a prefill chunk of one column) run in the kernel,
        # longer prefill chunks in torch's split attention.
        assert len(calls) <= cfg.model.num_layers * 3
        assert len(kernel_calls) >= cfg.model.num_layers * steps
        # Micro-batches of several prompts attend the 40-token prefix; one of a single prompt
        # (its n samples) has no prefix to share.
        assert 40 in kernel_calls and set(kernel_calls) <= {0, 40}
    else:
        assert len(calls) == cfg.model.num_layers * (3 + steps), "3 suffix chunks + decode"
        assert not kernel_calls
    for prompt, split, copied in zip(prompts, outputs[1], outputs[10**9]):
        expected = recompute_greedy(model, prompt, 8)[0]
        cut = expected.index(7) + 1 if 7 in expected else len(expected)
        for a, b in zip(split.samples, copied.samples):
            assert a.token_ids == b.token_ids == expected[:cut]
            assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) < 1e-4


def sampled(n: int = 3, seed: int | None = 7, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.9, top_p=0.9, top_k=40, max_new_tokens=8, n=n, seed=seed, **kw)


def test_seeded_samples_reproduce_across_calls_and_batches(tiny) -> None:
    cfg, model = tiny
    target, *others = prompts_with_shared_head([5, 3, 9, 2], seed=5)
    engine = MegatronEngine(model, cfg)
    alone = engine.generate([GenerationRequest("t", target, sampled())])[0]
    again = engine.generate([GenerationRequest("t", target, sampled())])[0]
    mixed_requests = requests_for(others, sampled(n=2, seed=99))
    mixed_requests.insert(1, GenerationRequest("t", target, sampled()))
    small_batches = MegatronEngine(model, cfg, max_batch_size=2)
    mixed = small_batches.generate(mixed_requests)[1]
    tokens = [s.token_ids for s in alone.samples]
    assert tokens == [s.token_ids for s in again.samples] == [s.token_ids for s in mixed.samples]
    assert len({tuple(t) for t in tokens}) > 1, "the n samples of a request must differ"
    other_seed = engine.generate([GenerationRequest("t", target, sampled(seed=8))])[0]
    assert [s.token_ids for s in other_seed.samples] != tokens
    # Unseeded: derived from the engine seed and request id, hence stable too.
    unseeded = [engine.generate([GenerationRequest("u", target, sampled(seed=None))])[0] for _ in range(2)]
    assert unseeded[0].samples == unseeded[1].samples


def test_top_k_one_equals_greedy(tiny) -> None:
    cfg, model = tiny
    prompts = prompts_with_shared_head([2, 6, 4], seed=6)
    engine = MegatronEngine(model, cfg)
    top1 = engine.generate(requests_for(prompts, SamplingParams(temperature=1.3, top_k=1, max_new_tokens=6, n=2, seed=1)))
    argmax = engine.generate(requests_for(prompts, greedy(6)))
    for a, b in zip(top1, argmax):
        assert all(s.token_ids == b.samples[0].token_ids for s in a.samples)


def test_logprobs_are_under_the_unmodified_distribution(tiny) -> None:
    cfg, model = tiny
    (prompt,) = prompts_with_shared_head([5], seed=7)
    engine = MegatronEngine(model, cfg)
    (sample,) = engine.generate([GenerationRequest("a", prompt, sampled(n=1, seed=3))])[0].samples
    tokens = list(prompt)
    with torch.inference_mode():
        for token, logprob in zip(sample.token_ids, sample.logprobs):
            logits = model(torch.tensor([tokens]), torch.arange(len(tokens))[None], attention_mask=None)
            assert abs(float(torch.log_softmax(logits[0, -1].float(), -1)[token]) - logprob) < 1e-4
            tokens.append(token)


def test_allowed_token_ids_limit_draws_not_logprobs(tiny) -> None:
    cfg, model = tiny
    prompts = prompts_with_shared_head([5, 3, 7], seed=9)
    allowed = [11, 57, 300, 301]
    engine = MegatronEngine(model, cfg)
    limited = SamplingParams(temperature=1.5, max_new_tokens=6, n=4, seed=2, allowed_token_ids=allowed)
    free = GenerationRequest("free", prompts[2], sampled(n=2, seed=2))
    results = engine.generate(requests_for(prompts[:2], limited) + [free])
    drawn = [t for r in results[:2] for s in r.samples for t in s.token_ids]
    assert set(drawn) <= set(allowed) and len(set(drawn)) > 1
    # The unlimited row of the same micro-batch draws from the whole vocabulary.
    assert not set(t for s in results[2].samples for t in s.token_ids) <= set(allowed)
    greedy_limited = engine.generate([GenerationRequest("g", prompts[0], SamplingParams(
        temperature=0.0, max_new_tokens=1, allowed_token_ids=allowed))])[0].samples[0]
    with torch.inference_mode():
        logits = model(torch.tensor([prompts[0]]), torch.arange(len(prompts[0]))[None], attention_mask=None)
    raw = torch.log_softmax(logits[0, -1].float(), -1)
    best = max(allowed, key=lambda t: float(raw[t]))
    assert greedy_limited.token_ids == [best]
    assert abs(greedy_limited.logprobs[0] - float(raw[best])) < 1e-4  # the unmodified distribution
    with pytest.raises(ValueError, match="allowed_token_ids outside the vocabulary"):
        engine.generate([GenerationRequest("x", prompts[0], SamplingParams(allowed_token_ids=[VOCAB]))])


def test_followup_continues_in_place_and_equals_a_second_prefill(tiny) -> None:
    """A followup after the sample's own end gives what a new request over prompt + own tokens
    + cue would give (greedy), without prefilling them again; skip_if and room are honoured."""
    from megatron_selfreward.generation.engine import Followup
    from megatron_selfreward.tokenizer import ByteTokenizer

    cfg, model = tiny
    tok = ByteTokenizer(VOCAB)
    cue = tuple(tok.encode("\nScore: "))
    digits = tuple(tok.encode("012345"))
    prompts = prompts_with_shared_head([5, 8], seed=11)
    engine = MegatronEngine(model, cfg, tokenizer=tok)
    follow = Followup(cue, 2, digits)
    results = engine.generate(requests_for(prompts, SamplingParams(temperature=0.0, max_new_tokens=6,
                                                                   followup=follow)))
    for prompt, result in zip(prompts, results):
        (sample,) = result.samples
        own = sample.token_ids[: sample.followup_at]
        assert sample.followup_at == len(own) == 6 and sample.finish_reason == "length"
        assert tuple(sample.token_ids[6:6 + len(cue)]) == cue
        score = sample.token_ids[6 + len(cue):]
        assert len(score) == 2 and set(score) <= set(digits)
        # The same continuation from scratch: prompt + own + cue prefilled, digits only.
        again = engine.generate([GenerationRequest("x", list(prompt) + own + list(cue), SamplingParams(
            temperature=0.0, max_new_tokens=2, allowed_token_ids=list(digits)))])[0].samples[0]
        assert again.token_ids == score
        assert max(abs(a - b) for a, b in zip(again.logprobs, sample.logprobs[6 + len(cue):])) < 1e-4
        assert sample.text == tok.decode(own) + "\nScore: " + tok.decode(score)
    assert engine.stats["followups"] == 2
    # skip_if: a sample whose own text already satisfies it gets no followup.
    skipped = engine.generate([GenerationRequest("s", prompts[0], SamplingParams(
        temperature=0.0, max_new_tokens=6, followup=Followup(cue, 2, digits, skip_if=lambda text: True)))])
    assert skipped[0].samples[0].followup_at is None and len(skipped[0].samples[0].token_ids) == 6
    # No room in the context: the sample stays as it is.
    tight = load_config(CONFIGS / "tiny.yaml", ["model.init_std=0.1", f"model.max_seq_len={len(prompts[0]) + 8}"])
    short = MegatronEngine(model, tight, tokenizer=tok).generate([GenerationRequest("t", prompts[0], SamplingParams(
        temperature=0.0, max_new_tokens=6, followup=follow))])[0].samples[0]
    assert short.followup_at is None and len(short.token_ids) == 6


def test_followup_after_eos_replaces_the_end_of_turn(tiny) -> None:
    from megatron_selfreward.generation.engine import Followup
    from megatron_selfreward.tokenizer import ByteTokenizer

    cfg, model = tiny
    (prompt,) = prompts_with_shared_head([6], seed=12)
    first = MegatronEngine(model, cfg).generate([GenerationRequest("a", prompt, greedy(1))])[0].samples[0]
    eos = first.token_ids[0]  # the greedy first token, declared the end of turn
    tok = ByteTokenizer(VOCAB)
    engine = MegatronEngine(model, cfg, tokenizer=tok, eos_token_ids=[eos])
    cue = (65, 66, 67)
    sample = engine.generate([GenerationRequest("b", prompt, SamplingParams(
        temperature=0.0, max_new_tokens=5, followup=Followup(cue, 1)))])[0].samples[0]
    assert sample.followup_at == 0 and tuple(sample.token_ids[:3]) == cue  # no EOS before the cue
    again = engine.generate([GenerationRequest("c", list(prompt) + list(cue), greedy(1))])[0].samples[0]
    assert sample.token_ids[3:] == again.token_ids
    assert len(sample.token_ids) == 4 and len(sample.logprobs) == 4


class CharTokenizer:
    """Renders token t as '<t>': stop strings then align with token boundaries by design."""

    eos_token_id = None

    def decode(self, ids: list[int]) -> str:
        return "".join(f"<{i}>" for i in ids)


def test_finish_reasons_eos_stop_and_length(tiny) -> None:
    cfg, model = tiny
    (prompt,) = prompts_with_shared_head([6], seed=8)
    ref = recompute_greedy(model, prompt, 6)[0]
    plain = MegatronEngine(model, cfg, tokenizer=CharTokenizer())
    (length,) = plain.generate([GenerationRequest("a", prompt, greedy(5))])[0].samples
    assert (length.finish_reason, length.token_ids) == ("length", ref[:5])
    assert length.text == "".join(f"<{t}>" for t in ref[:5])

    eos_engine = MegatronEngine(model, cfg, tokenizer=CharTokenizer(), eos_token_ids=[ref[2]])
    (eos,) = eos_engine.generate([GenerationRequest("a", prompt, greedy(6))])[0].samples
    cut = ref.index(ref[2]) + 1
    assert (eos.finish_reason, eos.token_ids) == ("eos", ref[:cut])
    assert eos.text == "".join(f"<{t}>" for t in ref[: cut - 1]) and len(eos.logprobs) == cut

    (stop_id,) = plain.generate([GenerationRequest("a", prompt, greedy(6, stop_token_ids=[ref[3]]))])[0].samples
    cut = ref.index(ref[3]) + 1
    assert (stop_id.finish_reason, stop_id.token_ids) == ("stop", ref[:cut])

    # A stop string spanning two tokens: generation ends on the token that completes it and
    # the text is cut before its first character.
    stop = f"{ref[1]}><{ref[2]}"
    (stop_str,) = plain.generate([GenerationRequest("a", prompt, greedy(6, stop_strings=[stop]))])[0].samples
    full = "".join(f"<{t}>" for t in ref)
    assert stop_str.finish_reason == "stop" and stop_str.token_ids == ref[:3]
    assert stop_str.text == full[: full.index(stop)]


def test_stop_strings_need_a_tokenizer_and_long_prompts_fail_clearly(tiny) -> None:
    cfg, model = tiny
    engine = MegatronEngine(model, cfg)
    with pytest.raises(ValueError, match="stop_strings need a tokenizer"):
        engine.generate([GenerationRequest("a", [1, 2], greedy(2, stop_strings=["x"]))])
    with pytest.raises(ValueError, match="max_seq_len"):
        engine.generate([GenerationRequest("a", [1] * cfg.model.max_seq_len, greedy(2))])
    # Generation stops at the context length instead of failing.
    (sample,) = engine.generate([GenerationRequest("a", [1] * (cfg.model.max_seq_len - 3), greedy(10))])[0].samples
    assert (len(sample.token_ids), sample.finish_reason) == (3, "length")


def test_padded_vocab_rows_are_never_sampled(tiny) -> None:
    cfg, model = tiny
    real = 500  # pretend rows 500..511 are TP padding
    engine = MegatronEngine(model, dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=real)))
    weight = model.output_layer.weight
    saved = weight.detach().clone()
    with torch.no_grad():
        weight[real:] = 50.0 * weight.detach().abs().max()  # padding rows would win every argmax
    try:
        prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
        for params in (greedy(6), sampled(n=4, seed=2), SamplingParams(temperature=1.0, max_new_tokens=6, n=4, seed=1)):
            for result in engine.generate(requests_for(prompts, params)):
                assert all(t < real for s in result.samples for t in s.token_ids)
    finally:
        with torch.no_grad():
            weight.copy_(saved)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_decode_step_equals_unpacked(tiny, dtype: torch.dtype) -> None:
    """The packed path (oneDNN GEMMs, fused residual/SwiGLU epilogues) against plain F.linear:
    same logits up to rounding at every step of a cached decode, same greedy tokens."""
    cfg, model = tiny
    if not packing_supported(dtype, torch.device("cpu")):
        pytest.skip(f"no oneDNN packed GEMM for {dtype} on this CPU")
    prompts = prompts_with_shared_head([3, 9, 1, 14], seed=11)
    runs = {}
    for pack in (True, False):
        engine = MegatronEngine(model, cfg, dtype=dtype)
        engine.runner = MegatronRunner(model, cfg.model.vocab_size, dtype, pack=pack)
        assert (engine.runner.direct[0].qkv.packed is not None) == pack
        runs[pack] = engine.generate(requests_for(prompts, greedy(8)))
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    for packed, plain in zip(runs[True], runs[False]):
        assert packed.samples[0].token_ids == plain.samples[0].token_ids
        assert max(abs(a - b) for a, b in zip(packed.samples[0].logprobs, plain.samples[0].logprobs)) < tol
    # The raw logits of one decode step, rows of different lengths.
    with torch.inference_mode():
        logits = {}
        for pack in (True, False):
            runner = MegatronRunner(model, cfg.model.vocab_size, dtype, pack=pack)
            engine = MegatronEngine(model, cfg, dtype=dtype)
            engine.runner = runner
            rows = engine._rows(requests_for(prompts, greedy(4)))
            cache, first = engine._prefill(rows)
            step = runner.forward(first.argmax(-1)[:, None], torch.tensor([[len(p)] for p in prompts]),
                                  torch.ones(len(prompts), 1, dtype=torch.bool), cache)
            logits[pack] = (first, step)
        for a, b in zip(logits[True], logits[False]):
            torch.testing.assert_close(a, b, atol=tol * 10, rtol=tol)


@contextlib.contextmanager
def fc2_weight_changed_in_place(model) -> Iterator[None]:
    """Layer 0's fc2 weight times -3 in place (as an optimizer step changes it), restored after."""
    weight = model.decoder.layers[0].mlp.linear_fc2.weight
    saved = weight.detach().clone()
    with torch.no_grad():
        weight.mul_(-3.0)
    try:
        yield
    finally:
        with torch.no_grad():
            weight.copy_(saved)


def test_packed_weights_follow_in_place_updates(tiny) -> None:
    """Same-dtype direct path: packed copies are re-packed when a parameter changes in place
    (the trainer's optimizer step), so the engine decodes the current weights."""
    cfg, model = tiny
    prompts = prompts_with_shared_head([4, 7], seed=12)
    engine = MegatronEngine(model, cfg)
    before = engine.generate(requests_for(prompts, greedy(6)))
    with fc2_weight_changed_in_place(model):
        changed = engine.generate(requests_for(prompts, greedy(6)))
        expected = [recompute_greedy(model, p, 6)[0] for p in prompts]
        assert [r.samples[0].token_ids for r in changed] == expected
        assert [r.samples for r in changed] != [r.samples for r in before]
    again = engine.generate(requests_for(prompts, greedy(6)))
    assert [r.samples for r in again] == [r.samples for r in before]


def test_bfloat16_copy_and_load_weights_refresh(tiny) -> None:
    cfg, model = tiny
    prompts = prompts_with_shared_head([4, 7], seed=10)
    engine = MegatronEngine(model, cfg, dtype="bfloat16")
    first = engine.generate(requests_for(prompts, greedy(6)))
    assert all(len(r.samples[0].token_ids) == 6 for r in first)
    with fc2_weight_changed_in_place(model):
        stale = engine.generate(requests_for(prompts, greedy(6)))
        assert [r.samples for r in stale] == [r.samples for r in first], "bf16 copy is a snapshot"
        engine.load_weights(model)
        fresh = engine.generate(requests_for(prompts, greedy(6)))
        assert [r.samples for r in fresh] != [r.samples for r in first]


# ---------------------------------------------------------------------------------------------
# The sampler on its own


def test_top_p_keeps_the_smallest_head_reaching_p() -> None:
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()[None].expand(200, -1).contiguous()
    uniform = torch.linspace(0, 0.999, 200, dtype=torch.float64)
    ones = torch.ones(200)
    for top_p, allowed in ((0.7, {0, 1}), (0.45, {0}), (0.83, {0, 1, 2}), (1.0, {0, 1, 2, 3})):
        tokens, logprobs = sample_tokens(logits, ones, torch.zeros(200, dtype=torch.long),
                                         torch.full((200,), top_p), uniform)
        assert set(tokens.tolist()) == allowed
        torch.testing.assert_close(logprobs, probs.log()[tokens])  # unmodified distribution
    # top-k=3 renormalises to 0.526/0.316/0.158 before top-p: token 2 now starts past 0.83.
    tokens, _ = sample_tokens(logits, ones, torch.full((200,), 3), torch.full((200,), 0.83), uniform)
    assert set(tokens.tolist()) == {0, 1}


def test_head_sampling_equals_full_sort(monkeypatch) -> None:
    gen = torch.Generator().manual_seed(0)
    rows = 64
    peaked = torch.randn(rows, 2000, generator=gen) * torch.linspace(0.5, 8, rows)[:, None]
    temperature = torch.rand(rows, generator=gen) + 0.3
    top_k = torch.tensor([0, 5, 300, 2000] * (rows // 4))
    top_p = torch.tensor([0.9, 1.0, 0.5, 0.95] * (rows // 4))
    uniform = torch.rand(rows, generator=gen, dtype=torch.float64)
    widths: list[int] = []
    head = sampling_mod._sample_head
    monkeypatch.setattr(sampling_mod, "_sample_head", lambda *a: widths.append(a[-1]) or head(*a))
    fast, _ = sample_tokens(peaked, temperature, top_k, top_p, uniform)
    assert widths == [64, 512, 2000], "rows resolved at each width: peaked, top-k 300, flat"
    monkeypatch.setattr(sampling_mod, "SAMPLING_HEAD_WIDTHS", ())  # full sort for every row
    full, _ = sample_tokens(peaked, temperature, top_k, top_p, uniform)
    assert torch.equal(fast, full)


def test_sample_seeds_are_stable_and_distinct() -> None:
    assert sample_seed(5, 0, engine_seed=1, request_id="a") == sample_seed(5, 0, engine_seed=2, request_id="b")
    assert sample_seed(5, 0, engine_seed=1, request_id="a") != sample_seed(5, 1, engine_seed=1, request_id="a")
    assert sample_seed(None, 0, engine_seed=1, request_id="a") != sample_seed(None, 0, engine_seed=1, request_id="b")
    assert 0 <= sample_seed(None, 3, engine_seed=1, request_id="x") < 2**63


# ---------------------------------------------------------------------------------------------
# The real model


@pytest.mark.slow
def test_smollm2_greedy_equals_transformers(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    from megatron_selfreward.assets import smollm2_gguf_path
    from megatron_selfreward.convert.gguf import import_gguf
    from megatron_selfreward.convert.llama_map import load_hf_into_model

    try:
        gguf = smollm2_gguf_path()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    hf_dir = import_gguf(gguf, tmp_path / "hf")
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    hf = transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    prompt = tokenizer("The capital of France is")["input_ids"]
    with torch.inference_mode():
        expected = hf.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False,
                               eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    # fp32, as the transformers reference (the preset trains in bf16).
    cfg = load_config(CONFIGS / "smollm2_135m_cpu.yaml", ["precision.params_dtype=float32"])
    with single_process_world():
        model = build_model(cfg)
        load_hf_into_model(model, hf_dir, cfg)
        engine = MegatronEngine(model, cfg, tokenizer=tokenizer, eos_token_ids=[])
        (sample,) = engine.generate([GenerationRequest("paris", prompt, greedy(16))])[0].samples
    assert sample.token_ids == expected
    assert "Paris" in sample.text
    assert all(math.isfinite(lp) and lp <= 0 for lp in sample.logprobs)


def test_softmax_scale_comes_from_the_config_not_the_attention_module(tiny, monkeypatch) -> None:
    cfg, model = tiny
    cores = [layer.self_attention.core_attention for layer in model.decoder.layers]
    megatron_scale = cores[0].softmax_scale
    for core in cores:  # as on Transformer Engine's DotProductAttention (2.3 and newer)
        monkeypatch.delattr(core, "softmax_scale")
    assert MegatronRunner(model, VOCAB).softmax_scale == pytest.approx(megatron_scale)
    assert megatron_scale == pytest.approx(1 / math.sqrt(model.config.kv_channels))
    monkeypatch.setattr(model.config, "softmax_scale", 0.3)
    assert MegatronRunner(model, VOCAB).softmax_scale == 0.3


# -- continuous batching ------------------------------------------------------------------------


def mixed_requests(prompts: list[list[int]]) -> list[GenerationRequest]:
    """Seeded sampling with n > 1, greedy, stop strings, allowed tokens and Followups, at mixed
    lengths: every kind of row a running batch may hold or take in."""
    from megatron_selfreward.generation.engine import Followup

    kinds = [
        lambda i: dataclasses.replace(sampled(n=3, seed=i), max_new_tokens=4 + 3 * i % 11),
        lambda i: dataclasses.replace(greedy(3 + i % 9), n=2),
        lambda i: dataclasses.replace(sampled(n=2, seed=i), max_new_tokens=12, stop_strings=["<3"]),
        lambda i: dataclasses.replace(sampled(n=1, seed=i), max_new_tokens=6,
                                      followup=Followup((65, 66), 2, tuple(range(48, 58)))),
        lambda i: dataclasses.replace(sampled(n=2, seed=i), max_new_tokens=9,
                                      allowed_token_ids=list(range(0, VOCAB, 3))),
    ]
    return [GenerationRequest(f"r{i}", p, kinds[i % len(kinds)](i)) for i, p in enumerate(prompts)]


def static_and_continuous(model, cfg, requests, **kw) -> dict[bool, tuple[list, dict]]:
    out = {}
    for continuous in (False, True):
        engine = MegatronEngine(model, cfg, tokenizer=CharTokenizer(), continuous=continuous, **kw)
        out[continuous] = (engine.generate(requests), engine.stats)
    return out


def assert_same_samples(static: list, continuous: list) -> None:
    for a, b in zip(static, continuous, strict=True):
        assert a.request_id == b.request_id
        for x, y in zip(a.samples, b.samples, strict=True):
            assert (x.token_ids, x.finish_reason, x.followup_at, x.text) == (
                y.token_ids, y.finish_reason, y.followup_at, y.text), a.request_id
            assert max((abs(p - q) for p, q in zip(x.logprobs, y.logprobs)), default=0.0) < 1e-4


@pytest.mark.parametrize("kernels", ["on", "off"])
def test_continuous_batching_changes_no_sample(tiny, kernels: str) -> None:
    """Rows that join a running batch (into freed rows, or a cache laid out anew) draw exactly
    what they draw in static micro-batches: seeded and greedy, n > 1, EOS early, stop strings,
    allowed tokens, Followups, prompts of mixed lengths."""
    if kernels == "on" and not decode_cpu.load(required=False):
        pytest.skip("the C++ decode kernels do not build here")
    cfg, model = tiny
    gen = torch.Generator().manual_seed(21)
    prompts = [torch.randint(0, VOCAB, (int(n),), generator=gen).tolist()
               for n in torch.randint(1, 24, (15,), generator=gen)]
    eos = list(range(0, VOCAB, 23))  # some rows end early
    out = static_and_continuous(model, cfg, mixed_requests(prompts), eos_token_ids=eos,
                                max_batch_size=5, cpu_kernels=kernels)
    assert_same_samples(out[False][0], out[True][0])
    static, continuous = out[False][1], out[True][1]
    assert static["rows_joined"] == 0
    assert continuous["rows_joined"] > 10 and continuous["micro_batches"] < static["micro_batches"]
    # Joins into freed rows in place, and into a cache laid out anew (more rows or columns).
    assert 0 < continuous["cache_relayouts"] < continuous["joins"]
    assert continuous["decode_tokens"] == static["decode_tokens"]
    assert continuous["decode_steps"] < static["decode_steps"]


def test_continuous_batching_with_an_attached_shared_prefix(tiny, monkeypatch) -> None:
    """A batch whose shared prefix stays in one cache row takes in only rows that start with
    it (the rest wait for a micro-batch of their own); samples are those of static batches."""
    cfg, model = tiny
    monkeypatch.setattr(engine_mod, "SHARED_PREFIX_ATTENTION_MIN_TOKENS", 1)
    judged = prompts_with_shared_head([3, 9, 1, 6, 4, 12, 2, 7, 5], head=20, seed=31)
    others = prompts_with_shared_head([4, 2, 8], head=5, seed=32)
    requests = mixed_requests(judged + others)
    out = static_and_continuous(model, cfg, requests, eos_token_ids=list(range(0, VOCAB, 29)),
                                max_batch_size=4)
    assert_same_samples(out[False][0], out[True][0])
    assert out[True][1]["rows_joined"] > 0


def test_auto_batch_size_from_memory_and_config_validation(tiny, monkeypatch) -> None:
    cfg, model = tiny
    requests = requests_for(prompts_with_shared_head([5, 3, 8], seed=41), dataclasses.replace(greedy(6), n=2))
    engine = MegatronEngine(model, cfg, max_batch_size=0)
    rows = engine._rows(requests)
    assert engine.auto_batch_size(rows) == engine_mod.DECODE_ROWS_CPU  # plenty of memory
    conf = model.config
    token_bytes = 2 * conf.num_layers * conf.num_query_groups * conf.kv_channels * 4
    row_tokens = max(len(r.prompt) + r.capacity for r in rows) + max(r.capacity for r in rows)
    monkeypatch.setattr(engine_mod, "_available_memory_bytes", lambda: 12 * row_tokens * token_bytes)
    assert engine.auto_batch_size(rows) == 3  # a quarter of the memory: 3 rows
    auto = engine.generate(requests)
    assert engine.stats["micro_batches"] >= 1
    fixed = MegatronEngine(model, cfg, max_batch_size=6, continuous=False).generate(requests)
    assert_same_samples(fixed, auto)
    assert load_config(CONFIGS / "tiny.yaml", ["generation.batch_size=0"]).generation.batch_size == 0
    with pytest.raises(Exception, match="generation.batch_size"):
        load_config(CONFIGS / "tiny.yaml", ["generation.batch_size=-1"])


def test_cpu_decode_drops_finished_rows_early_and_keeps_outputs(tiny) -> None:
    """On a CPU each row costs its share of the decode GEMMs: two rows done out of 32 are dropped
    from the running batch at once (the 1/4 rule kept them until 8 were done), and every row's
    tokens stay those of a batch of its own."""
    cfg, model = tiny
    prompts = prompts_with_shared_head([3 + i % 5 for i in range(32)], head=4, seed=21)
    requests = [GenerationRequest(f"r{i}", p, greedy(2 if i < 2 else 9)) for i, p in enumerate(prompts)]
    engine = MegatronEngine(model, cfg, max_batch_size=32, continuous=True)
    results = engine.generate(requests)
    # Rows 0-1 draw 2 tokens (1 decode step each), the 30 others 9 (8 decode steps): dropped
    # after step 1 the short rows cost 2 row-steps, kept they would cost 16.
    assert engine.stats["decode_row_steps"] == 2 * 1 + 30 * 8
    alone = MegatronEngine(model, cfg, max_batch_size=1)
    for request, result in zip(requests[:3], results[:3]):
        assert result.samples[0].token_ids == alone.generate([request])[0].samples[0].token_ids
