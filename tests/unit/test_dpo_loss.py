"""DPO/IPO losses: ln 2 at step 0, equality with TRL's sigmoid DPO (loss and gradients), IPO by hand.

The TRL comparison loads the same weights into transformers' LlamaForCausalLM (policy and a
separate reference with other weights) and feeds TRL's DPOTrainer.compute_loss the batch our
data code built (TRL's own collator pads it), so both sides see identical token ids.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from megatron_selfreward.config import load_config
from megatron_selfreward.losses.dpo import get_loss, ipo, sigmoid_dpo, summarize
from megatron_selfreward.records import PreferencePair
from tests.conftest import CONFIGS

BETA = 0.1


def make_pairs(n: int) -> list[PreferencePair]:
    words = ["alpha", "beta", "gamma", "delta", "kappa", "omega"]
    return [
        PreferencePair(
            prompt_id=f"p{i}", prompt=" ".join(words[(i + k) % 6] for k in range(3 + i % 3)),
            chosen=" ".join(words[(2 * i + k) % 6] for k in range(2 + i % 4)),
            rejected=" ".join(words[(3 * i + k) % 6] for k in range(1 + (i + 1) % 5)),
            chosen_score=4.0, rejected_score=1.0)
        for i in range(n)
    ]


def test_sigmoid_dpo_is_ln2_when_policy_equals_reference():
    logps = torch.tensor([-12.5, -3.0, -40.0])
    loss = sigmoid_dpo(logps, logps - 1.0, logps, logps - 1.0, BETA)
    assert torch.allclose(loss, torch.full_like(loss, math.log(2)), atol=1e-7)


def test_ipo_matches_hand_formula():
    pc, pr = torch.tensor([-10.0, -4.0]), torch.tensor([-12.0, -3.0])
    rc, rr = torch.tensor([-11.0, -4.5]), torch.tensor([-11.5, -2.0])
    got = ipo(pc, pr, rc, rr, BETA)
    for i in range(2):
        h = (pc[i] - rc[i]) - (pr[i] - rr[i])
        assert got[i].item() == pytest.approx(((h - 1 / (2 * BETA)) ** 2).item(), rel=1e-6)
    assert get_loss("ipo") is ipo and get_loss("sigmoid") is sigmoid_dpo
    with pytest.raises(ValueError, match="dpo.loss_type"):
        get_loss("hinge")


def test_summarize_divides_sums_by_pairs():
    stats = torch.tensor([2.0, 4.0, 3.0, 1.0, -8.0, -12.0, 0.4, -0.4])
    out = summarize(stats)
    assert out["loss"] == 0.5 and out["reward_accuracy"] == 0.75 and out["pairs"] == 4.0


def test_step0_loss_is_ln2_through_the_trainer(tmp_path):
    from megatron_selfreward.train import run_dpo

    cfg = load_config(CONFIGS / "tiny.yaml", ["dpo.max_steps=1", "dpo.global_batch_size=4"])
    summary = run_dpo(cfg, make_pairs(6), None, tmp_path / "dpo")
    assert summary["losses"][0] == pytest.approx(math.log(2), abs=1e-6)
    assert abs(summary["final"]["reward_margin"]) < 1e-5
    assert (tmp_path / "dpo" / "megatron" / "metadata.json").is_file()
    assert (tmp_path / "dpo" / "metrics.jsonl").is_file()


# ---------------------------------------------------------------------------------------------
# Against TRL


def _hf_byte_tokenizer():
    """A transformers tokenizer over the byte vocabulary (TRL's constructor wants one)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from megatron_selfreward.tokenizer import ByteTokenizer

    vocab = {s: i for i, s in enumerate(ByteTokenizer.SPECIALS)}
    vocab.update({chr(b): b + ByteTokenizer.OFFSET for b in range(32, 127)})
    vocab["\n"] = ord("\n") + ByteTokenizer.OFFSET
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", unk_token="<|endoftext|>")


def _to_hf(cfg, model):
    from transformers import LlamaConfig, LlamaForCausalLM

    from megatron_selfreward.convert.llama_map import canonical_names, hf_config_from_model, megatron_to_hf

    hf_cfg = {k: v for k, v in hf_config_from_model(cfg).items() if k not in ("architectures", "model_type")}
    hf = LlamaForCausalLM(LlamaConfig(**hf_cfg, attn_implementation="eager")).float()
    names = canonical_names(model)
    weights = {names.get(k, k): v.detach() for k, v in model.state_dict().items() if torch.is_tensor(v)}
    hf.load_state_dict(dict(megatron_to_hf(weights.__getitem__, cfg)), strict=True)
    return hf


@pytest.fixture(scope="module")
def trl_comparison(tmp_path_factory):
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    from megatron_selfreward.convert.llama_map import canonical_names, megatron_to_hf
    from megatron_selfreward.data.dpo_batches import pair_batch, prepare_dpo
    from megatron_selfreward.megatron.model import build_model
    from megatron_selfreward.megatron.parallel import single_process_world
    from megatron_selfreward.tokenizer import ByteTokenizer
    from megatron_selfreward.train.dpo import compute_reference_logps, dpo_loss_func

    warnings.filterwarnings("ignore")
    cfg = load_config(CONFIGS / "tiny.yaml", ["dpo.global_batch_size=4", "dpo.micro_batch_size=4"])
    tok = ByteTokenizer(cfg.model.vocab_size)
    pairs, _ = prepare_dpo(make_pairs(4), tok, cfg.model.chat_template, cfg.dpo.seq_len)
    with single_process_world(seed=11):
        reference = build_model(cfg)
        policy = build_model(cfg)
        with torch.no_grad():  # policy != reference, so the loss is not trivially ln 2
            gen = torch.Generator().manual_seed(3)
            for p_ref, p_pol in zip(reference.parameters(), policy.parameters()):
                p_pol.copy_(p_ref + 0.05 * torch.randn(p_ref.shape, generator=gen))
        ref_table = compute_reference_logps(cfg, [reference], pairs, tok.eos_token_id)
        length = max(p.max_len for p in pairs)
        batch = pair_batch(pairs, range(4), length, tok.eos_token_id, ref_table)
        nll = policy(input_ids=batch["tokens"], position_ids=batch["position_ids"],
                     attention_mask=None, labels=batch["labels"])
        loss_sum, count, _ = dpo_loss_func(batch, sigmoid_dpo, BETA, nll)
        ours = loss_sum / count
        ours.backward()
        names = canonical_names(policy)
        grads = {names.get(n, n): p.grad.detach().clone() for n, p in policy.named_parameters()}
        ours_grads = dict(megatron_to_hf(grads.__getitem__, cfg))
        hf_policy, hf_ref = _to_hf(cfg, policy), _to_hf(cfg, reference)

    args = DPOConfig(output_dir=str(tmp_path_factory.mktemp("trl")), beta=BETA, loss_type=["sigmoid"],
                     bf16=False, fp16=False, gradient_checkpointing=False, use_cpu=True,
                     report_to=[], disable_dropout=True, max_length=None, save_strategy="no")
    texts = Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}] * 2)
    trainer = DPOTrainer(model=hf_policy, ref_model=hf_ref, args=args, train_dataset=texts,
                         processing_class=_hf_byte_tokenizer())
    examples = [{"prompt_ids": p.prompt, "chosen_ids": p.chosen, "rejected_ids": p.rejected} for p in pairs]
    inputs = DataCollatorForPreference(pad_token_id=tok.eos_token_id)(examples)
    theirs = trainer.compute_loss(trainer.model, inputs)
    theirs.backward()
    trl_grads = {n: p.grad for n, p in trainer.model.named_parameters() if p.grad is not None}
    return ours.item(), theirs.item(), ours_grads, trl_grads


def test_dpo_loss_matches_trl(trl_comparison):
    ours, theirs, _, _ = trl_comparison
    assert abs(ours - math.log(2)) > 1e-3  # a non-trivial point
    assert ours == pytest.approx(theirs, abs=1e-5)


def test_dpo_gradients_match_trl(trl_comparison):
    _, _, ours, theirs = trl_comparison
    assert set(ours) == set(theirs)
    for name, grad in ours.items():
        scale = max(grad.abs().max().item(), 1e-6)
        diff = (grad - theirs[name]).abs().max().item()
        assert diff <= 1e-5 * max(1.0, scale), (name, diff, scale)
