"""The output layer on target positions only: the trainer's per-token loss (`loss_mask` given)
equals megatron's full-vocabulary path times the mask, and so do the gradients of every weight;
the same through the chunked log-prob kernel (`train.logprob_kernel`), which needs TP = 1."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

from megatron_selfreward.config import ConfigError, load_config
from tests.conftest import CONFIGS


@pytest.fixture(scope="module")
def world():
    from megatron_selfreward.megatron.parallel import single_process_world

    warnings.filterwarnings("ignore")
    with single_process_world(seed=5):
        yield load_config(CONFIGS / "tiny.yaml")


def _batch(cfg, b=3, s=24):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.model.vocab_size, (b, s), generator=g)
    labels = torch.randint(0, cfg.model.vocab_size, (b, s), generator=g)
    mask = torch.zeros(b, s)
    mask[0, 5:20] = 1  # a response in the middle, padding after it
    mask[1, 10:] = 1
    mask[2, 0:3] = 1
    positions = torch.arange(s).unsqueeze(0).expand(b, s)
    return {"tokens": tokens, "labels": labels, "loss_mask": mask, "position_ids": positions}


def _loss_and_grads(model, batch, selected: bool):
    model.zero_grad(set_to_none=True)
    kwargs = {"loss_mask": batch["loss_mask"]} if selected else {}
    per_token = model(input_ids=batch["tokens"], position_ids=batch["position_ids"],
                      attention_mask=None, labels=batch["labels"], **kwargs)
    if not selected:
        per_token = per_token * batch["loss_mask"]
    per_token.float().sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return per_token.detach().float(), grads


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("kernel", ["off", "torch"])
def test_selected_positions_give_the_full_path_loss_and_grads(world, kernel, tied):
    from megatron_selfreward.megatron.model import build_model

    cfg = dataclasses.replace(world, train=dataclasses.replace(world.train, logprob_kernel=kernel),
                              model=dataclasses.replace(world.model, tie_embeddings=tied))
    torch.manual_seed(0)
    model = build_model(cfg)
    batch = _batch(cfg)
    full, full_grads = _loss_and_grads(model, batch, selected=False)
    got, got_grads = _loss_and_grads(model, batch, selected=True)
    assert got.shape == full.shape
    assert (got[batch["loss_mask"] == 0] == 0).all()
    torch.testing.assert_close(got, full, rtol=1e-5, atol=1e-5)
    assert got_grads.keys() == full_grads.keys()
    for name in full_grads:
        torch.testing.assert_close(got_grads[name], full_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_an_all_zero_mask_still_backpropagates(world):
    from megatron_selfreward.megatron.model import build_model

    model = build_model(world)
    batch = _batch(world)
    batch["loss_mask"].zero_()
    out = model(input_ids=batch["tokens"], position_ids=batch["position_ids"], attention_mask=None,
                labels=batch["labels"], loss_mask=batch["loss_mask"])
    assert (out == 0).all()
    out.sum().backward()  # megatron backpropagates every micro-batch's loss, even an empty one


def test_logprob_kernel_is_refused_under_tensor_parallelism():
    with pytest.raises(ConfigError, match="train.logprob_kernel"):
        load_config(CONFIGS / "tiny.yaml", ["train.logprob_kernel=torch",
                                            "parallel.tensor_model_parallel_size=2"])
    with pytest.raises(ConfigError, match="train.logprob_kernel"):
        load_config(CONFIGS / "tiny.yaml", ["train.logprob_kernel=fast"])
