"""SFT data and loss: targets are the assistant turns only, the loss is a hand cross-entropy over
them, over-long examples are truncated or dropped (counted), packing keeps examples apart, and the
sample stream is deterministic and resumable."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from megatron_selfreward.config import load_config
from megatron_selfreward.data.dpo_batches import prepare_dpo
from megatron_selfreward.data.sft_batches import (
    TokenizedSample,
    pack_rows,
    packed_batch,
    padded_batch,
    prepare_sft,
    sft_micro_batches,
    tokenize_conversation,
)
from megatron_selfreward.records import PreferencePair, SFTExample
from megatron_selfreward.tokenizer import ByteTokenizer
from megatron_selfreward.train.sampler import GlobalBatchSampler, epoch_order
from tests.conftest import CONFIGS

TOK = ByteTokenizer(512)


def chat(*turns: str) -> SFTExample:
    roles = ["system", "user", "assistant"] if len(turns) == 3 else ["user", "assistant"] * 2
    return SFTExample([{"role": r, "content": t} for r, t in zip(roles, turns)])


def target_text(sample: TokenizedSample) -> str:
    return TOK.decode([t for t, m in zip(sample.tokens, sample.targets) if m])


@pytest.mark.parametrize("template", ["chatml", "llama2"])
def test_targets_are_the_assistant_turns_only(template):
    example = SFTExample([
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
        {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Name?"},
        {"role": "assistant", "content": "Bob."},
    ])
    sample = tokenize_conversation(example.messages, TOK, template)
    if template == "chatml":
        assert target_text(sample) == "Hello.<|im_end|>\nBob.<|im_end|>\n"
    else:
        assert target_text(sample) == " Hello. </s> Bob. </s>"
    assert "Hi?" not in target_text(sample) and "assistant" not in target_text(sample)


def test_truncation_and_drop_counts():
    examples = [chat("q", "short answer"), chat("q", "a" * 100), chat("p" * 100, "answer")]
    samples, stats = prepare_sft(examples, TOK, "chatml", seq_len=40)
    assert stats.as_dict() == {"kept": 2, "truncated": 1, "dropped": 1}
    assert stats.dropped_indices == [2]
    assert all(len(s) <= 40 for s in samples) and len(samples[1]) == 40


def test_dpo_truncation_and_drop_counts():
    pairs = [PreferencePair(prompt_id=str(i), prompt=p, chosen=c, rejected="no", chosen_score=2.0,
                            rejected_score=1.0)
             for i, (p, c) in enumerate([("q", "yes"), ("q", "y" * 100), ("p" * 100, "yes")])]
    tpairs, stats = prepare_dpo(pairs, TOK, "chatml", seq_len=60)
    assert stats.as_dict() == {"kept": 2, "truncated": 1, "dropped": 1}
    assert all(p.max_len <= 60 for p in tpairs)
    assert tpairs[1].prompt == tpairs[0].prompt  # the prompt is kept whole, the response cut


@pytest.fixture(scope="module")
def tiny_model():
    from megatron_selfreward.megatron.model import build_model
    from megatron_selfreward.megatron.parallel import single_process_world

    warnings.filterwarnings("ignore")
    cfg = load_config(CONFIGS / "tiny.yaml")
    with single_process_world(seed=5):
        model = build_model(cfg)
        model.eval()
        yield model


def _loss_of(model, batch):
    """The trainer's SFT loss: megatron's per-token loss, summed over the mask, / target count."""
    from megatron_selfreward.train.sft import sft_forward_step

    with torch.no_grad():
        per_token, loss_func = sft_forward_step(iter([batch]), model)
        loss_sum, count, _ = loss_func(per_token)
    return (loss_sum / count).item(), per_token


def test_sft_loss_is_cross_entropy_over_assistant_tokens(tiny_model):
    examples = [chat("What is 2+2?", "4, of course."), chat("Say hi", "hi there")]
    samples, _ = prepare_sft(examples, TOK, "chatml", seq_len=128)
    batch = padded_batch(samples, 48, TOK.eos_token_id)
    ours, _ = _loss_of(tiny_model, batch)
    # By hand: logits without labels, cross entropy only where the answer text sits.
    total, count = 0.0, 0
    with torch.no_grad():
        logits = tiny_model(input_ids=batch["tokens"], position_ids=batch["position_ids"],
                            attention_mask=None)
    for row, example in enumerate(examples):
        answer = example.messages[-1]["content"] + "<|im_end|>\n"
        ids = samples[row].tokens
        start = len(ids) - len(TOK.encode(answer))
        targets = torch.tensor(ids[start:])
        total += F.cross_entropy(logits[row, start - 1 : len(ids) - 1].float(), targets,
                                 reduction="sum").item()
        count += len(targets)
    assert ours == pytest.approx(total / count, rel=1e-6)


def test_packing_keeps_examples_apart(tiny_model):
    examples = [chat("one", "first answer"), chat("two?", "second"), chat("three", "third one here")]
    samples, _ = prepare_sft(examples, TOK, "chatml", seq_len=128)
    rows = pack_rows([len(s) for s in samples], seq_len=128)
    assert rows == [[0, 1, 2]]
    packed = packed_batch([samples], 128, TOK.eos_token_id)
    packed_loss, packed_tokens = _loss_of(tiny_model, packed)
    alone_loss, alone_tokens = _loss_of(tiny_model, padded_batch(samples, 56, TOK.eos_token_id))
    assert packed_loss == pytest.approx(alone_loss, rel=1e-5)
    start = 0
    for row, sample in enumerate(samples):  # token by token, each example as if alone
        n = len(sample)
        got = packed_tokens[0, start : start + n - 1]
        want = alone_tokens[row, : n - 1]
        assert torch.allclose(got, want, atol=1e-5), (row, (got - want).abs().max())
        start += n


def test_micro_batches_cover_the_global_batch_once():
    samples = [TokenizedSample([1] * (3 + i), [0, 0] + [1] * (1 + i)) for i in range(8)]
    seen, shapes = [], []
    for dp_rank in range(2):
        mbs = sft_micro_batches(samples, list(range(8)), micro_batch_size=2, dp_rank=dp_rank,
                                dp_size=2, pad_id=0, seq_len=64, uniform_length=False)
        assert len(mbs) == 2
        shapes += [tuple(b["tokens"].shape) for b in mbs]
        seen += [int(b["loss_mask"][r].sum()) for b in mbs for r in range(2)]
    assert sorted(seen) == [1 + i for i in range(8)]
    assert sorted(shapes) == [(2, 8), (2, 8), (2, 8), (2, 16)]  # grouped by length
    uniform = sft_micro_batches(samples, list(range(8)), micro_batch_size=2, dp_rank=0, dp_size=2,
                                pad_id=0, seq_len=64, uniform_length=True)
    assert all(b["tokens"].shape == (2, 16) for b in uniform)  # what pipeline stages need


@pytest.mark.parametrize("uniform", [False, True])
def test_packed_micro_batches_cover_every_target_once(uniform):
    samples = [TokenizedSample([5] * (10 + 7 * i), [0] * 5 + [1] * (5 + 7 * i)) for i in range(6)]
    targets = 0
    for dp_rank in range(2):
        mbs = sft_micro_batches(samples, list(range(6)), micro_batch_size=2, dp_rank=dp_rank, dp_size=2,
                                pad_id=0, seq_len=64, packing=True, uniform_length=uniform)
        assert mbs and all(b["attention_mask"].shape[-1] == b["tokens"].shape[1] for b in mbs)
        targets += sum(int(b["loss_mask"].sum()) for b in mbs)
    assert targets == sum(sum(s.targets) for s in samples)  # the first token of a row is no label


def test_sampler_is_deterministic_and_resumable():
    assert epoch_order(10, 1, 0) == epoch_order(10, 1, 0) != epoch_order(10, 1, 1)
    a = GlobalBatchSampler(10, 4, seed=3)
    first = [a.next_batch() for _ in range(3)]  # crosses the epoch boundary at sample 10
    assert sorted(first[0] + first[1] + first[2][:2]) == list(range(10))
    b = GlobalBatchSampler(10, 4, seed=3)
    b.load_state_dict(GlobalBatchSampler(10, 4, seed=3, consumed_samples=8).state_dict())
    assert b.next_batch() == first[2]
    with pytest.raises(ValueError, match="num_samples"):
        b.load_state_dict(GlobalBatchSampler(11, 4, seed=3).state_dict())


def test_run_sft_inside_an_existing_world_writes_a_loadable_model(tmp_path):
    from megatron_selfreward.megatron.model import build_model
    from megatron_selfreward.megatron.parallel import single_process_world
    from megatron_selfreward.policy import load_weights_into
    from megatron_selfreward.train import run_sft
    from megatron_selfreward.train.loop import read_metrics

    cfg = load_config(CONFIGS / "tiny.yaml", ["sft.max_steps=2", "sft.global_batch_size=2",
                                              "sft.micro_batch_size=1", "sft.seq_len=64"])
    examples = [chat(f"question {i}", "answer " * (1 + i)) for i in range(5)]
    with single_process_world(seed=3):
        summary = run_sft(cfg, examples, None, tmp_path / "sft")
        model = build_model(cfg)
        load_weights_into(model, cfg, tmp_path / "sft")  # the trained weights, as the next stage reads them
    assert summary["steps"] == 2 and summary["finished"] and summary["data"]["kept"] == 5
    assert [m["step"] for m in read_metrics(tmp_path / "sft")] == [1, 2]
    assert (tmp_path / "sft" / "checkpoints" / "step_2" / "trainer_state.json").is_file()
    assert any((tmp_path / "sft" / "tensorboard").iterdir())


def test_cli_train_parses_options_and_overrides():
    from megatron_selfreward.cli import build_parser

    args = build_parser().parse_args(["train", "dpo", "--config", "tiny", "--data", "p.jsonl",
                                      "--out", "o", "dpo.beta=0.2"])
    assert (args.task, args.data, args.out, args.overrides) == ("dpo", "p.jsonl", "o", ["dpo.beta=0.2"])
