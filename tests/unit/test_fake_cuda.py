"""Device placement of the training path on a (fake) GPU: what the trainer runs for a micro-batch,
on a model whose parameters are on `cuda`, with batches as the data code builds them (host
memory). A tensor left on the CPU anywhere between the batch and the loss, or in the loss
reports' reduction, raises FakeTensorDeviceMismatchError. See tests/fake_cuda.py."""

from __future__ import annotations

import warnings

import pytest
import torch

from megatron_selfreward.config import load_config
from megatron_selfreward.data.dpo_data import prepare_dpo
from megatron_selfreward.data.sft_data import prepare_sft
from megatron_selfreward.records import SFTExample
from megatron_selfreward.tokenizer import ByteTokenizer
from tests.conftest import CONFIGS
from tests.fake_cuda import FakeCuda, devices, fake_cuda
from tests.unit.test_dpo_loss import make_pairs

pytestmark = pytest.mark.fake_cuda

TOK = ByteTokenizer(512)
CUDA = {FakeCuda.device}


@pytest.fixture(scope="module")
def cfg():
    return load_config(CONFIGS / "tiny.yaml")


@pytest.fixture
def cuda_model(cfg):
    """The tiny model with its parameters on fake `cuda`, inside a 1-rank gloo world."""
    from megatron_selfreward.megatron.model import build_model
    from megatron_selfreward.megatron.parallel import single_process_world

    warnings.filterwarnings("ignore")
    with single_process_world(seed=5), fake_cuda() as fc:
        model = fc.build(lambda: build_model(cfg))
        assert devices(list(model.parameters())) == CUDA
        yield model


def _chat(i: int) -> SFTExample:
    return SFTExample([{"role": "user", "content": f"question {i}?"},
                       {"role": "assistant", "content": "answer " * (i + 1)}])


def test_sft_micro_batches_reach_the_loss_on_the_model_device(cfg, cuda_model):
    from megatron_selfreward.train.sft import sft_task

    samples, _ = prepare_sft([_chat(i) for i in range(4)], TOK, "chatml", cfg.sft.seq_len)
    task = sft_task(cfg, samples, TOK.eos_token_id)
    micro_batches = task.micro_batches([0, 1, 2, 3])
    assert devices(micro_batches) == {torch.device("cpu")}  # as the data code builds them
    for batch in micro_batches:
        per_token_loss, loss_func = task.forward_step(iter([batch]), cuda_model)
        loss_sum, num_tokens, report = loss_func(per_token_loss)
        assert devices([per_token_loss, loss_sum, num_tokens, report]) == CUDA


def test_dpo_micro_batches_and_reference_logps_on_the_model_device(cfg, cuda_model):
    from megatron_selfreward.megatron.training import forward_only
    from megatron_selfreward.train.dpo import _logps_forward_step, dpo_task, reference_batches

    pairs, _ = prepare_dpo(make_pairs(4), TOK, "chatml", cfg.dpo.seq_len)
    # The reference pass: megatron's forward-only schedule over the reference micro-batches.
    batches = reference_batches(cfg, pairs, [0, 1, 2, 3], TOK.eos_token_id)
    assert devices(batches) == {torch.device("cpu")}
    reports = forward_only([cuda_model], batches, _logps_forward_step)
    assert len(reports) == len(batches) and devices(reports) == CUDA
    # The policy step, with the reference table in host memory as reference_logps returns it.
    ref = torch.zeros(len(pairs), 2)
    task = dpo_task(cfg, pairs, ref, TOK.eos_token_id)
    for batch in task.micro_batches([0, 1, 2, 3]):
        per_token_nll, loss_func = task.forward_step(iter([batch]), cuda_model)
        loss_sum, num_pairs, report = loss_func(per_token_nll)
        assert devices([per_token_nll, loss_sum, report]) == CUDA


def test_report_sums_live_where_the_process_group_needs_them(monkeypatch, cuda_model):
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_selfreward.megatron.training import reduce_report_sums

    reports = [{"lm_loss": torch.ones(2, device="cuda")} for _ in range(3)]
    # gloo (this world): host memory.
    assert reduce_report_sums(reports, "lm_loss", 2).device == torch.device("cpu")
    # NCCL with DP = 2: the all-reduce gets a tensor on this rank's CUDA device.
    reduced: list[torch.Tensor] = []
    monkeypatch.setattr(dist, "get_backend", lambda group=None: dist.Backend.NCCL)
    monkeypatch.setattr(parallel_state, "get_data_parallel_world_size", lambda *a, **k: 2)
    monkeypatch.setattr(dist, "all_reduce", lambda tensor, *a, **k: reduced.append(tensor))
    total = reduce_report_sums(reports, "lm_loss", 2)
    assert [t.device for t in reduced] == [FakeCuda.device] and total.device == FakeCuda.device
