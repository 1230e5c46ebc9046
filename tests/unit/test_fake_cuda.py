"""Device placement of the training path on a (fake) GPU: what the trainer runs for a micro-batch,
on a model whose parameters are on `cuda`, with batches as the data code builds them (host
memory). A tensor left on the CPU anywhere between the batch and the loss, or in the loss
reports' reduction, raises FakeTensorDeviceMismatchError. See tests/fake_cuda.py."""

from __future__ import annotations

import warnings

import pytest
import torch

from megatron_selfreward.config import load_config
from megatron_selfreward.data.dpo_batches import prepare_dpo
from megatron_selfreward.data.sft_batches import prepare_sft
from megatron_selfreward.records import SFTExample
from megatron_selfreward.tokenizer import ByteTokenizer
from tests.conftest import CONFIGS
from tests.fake_cuda import FakeCuda, devices, fake_cuda, host_reads
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


@pytest.mark.parametrize("prompts, temperature, followup", [
    pytest.param([[5, 6, 7, 8], [5, 6, 9]], 0.7, False, id="distinct-sampled"),
    # A long shared prefix: prefilled once into a one-row cache, then copied to every row.
    pytest.param([[3] * 140 + [4], [3] * 140 + [6, 7]], 0.0, False, id="shared-prefix-greedy"),
    # judge.force_score's path: cue tokens fed after the sample's own end, then one drawn token.
    pytest.param([[5, 6, 7, 8], [5, 6, 9]], 0.7, True, id="followup"),
])
def test_engine_prefill_and_decode_steps_run_on_the_model_device(monkeypatch, cfg, cuda_model,
                                                                 prompts, temperature, followup):
    from megatron_selfreward.generation.engine import Followup, GenerationRequest, SamplingParams
    from megatron_selfreward.generation.megatron_engine import MegatronEngine
    from megatron_selfreward.generation.runner import KVCache

    caches: list[KVCache] = []
    real_write = KVCache.write

    def write(self, layer, key, value, start):
        caches.append(self)
        return real_write(self, layer, key, value, start)

    monkeypatch.setattr(KVCache, "write", write)
    host_reads(monkeypatch, token=65, answer=temperature > 0)
    engine = MegatronEngine(cuda_model, cfg, tokenizer=TOK, eos_token_ids=[TOK.eos_token_id])
    assert engine.runner.device == FakeCuda.device and not engine.runner.kernels
    cue = Followup(token_ids=(83, 58), max_new_tokens=1, allowed_token_ids=tuple(range(48, 54)))
    params = SamplingParams(temperature=temperature, top_p=0.9, max_new_tokens=3, n=2,
                            allowed_token_ids=list(range(60, 70)), followup=cue if followup else None)
    results = engine.generate([GenerationRequest(f"r{i}", p, params) for i, p in enumerate(prompts)])
    written = [65] * 3 + ([83, 58, 65] if followup else [])
    assert [s.token_ids for r in results for s in r.samples] == [written] * 4
    stats = engine.stats
    assert stats["decode_steps"] == len(written) - 1 and stats["prefill_tokens_computed"] > 0
    assert caches and devices([c.valid for c in caches] + [k for c in caches for k in c.keys]) == CUDA


@pytest.fixture(scope="module")
def saved_checkpoint(cfg, tmp_path_factory):
    """A real distributed checkpoint of the tiny model, written from host memory."""
    from megatron_selfreward.megatron.checkpoint import save_model
    from megatron_selfreward.megatron.model import build_model
    from megatron_selfreward.megatron.parallel import single_process_world

    warnings.filterwarnings("ignore")
    directory = tmp_path_factory.mktemp("ckpt") / "model"
    with single_process_world(seed=7):
        save_model(build_model(cfg), directory)
    return directory


def test_checkpoint_loads_into_a_cuda_model(cuda_model, saved_checkpoint):
    from megatron_selfreward.megatron.checkpoint import load_model

    before = {name: p._version for name, p in cuda_model.named_parameters()}
    load_model(cuda_model, saved_checkpoint)
    assert devices(list(cuda_model.parameters())) == CUDA
    assert all(p._version > before[name] for name, p in cuda_model.named_parameters())


@pytest.fixture(scope="module")
def saved_train_state(cfg, tmp_path_factory):
    """A real training checkpoint (weights, distributed-optimizer state after one step) of the
    tiny model, written from host memory."""
    from megatron_selfreward.megatron.checkpoint import save_train_state
    from megatron_selfreward.megatron.parallel import single_process_world
    from megatron_selfreward.megatron.training import build_train_state

    warnings.filterwarnings("ignore")
    directory = tmp_path_factory.mktemp("train") / "step_1"
    with single_process_world(seed=7):
        state = build_train_state(cfg, cfg.sft, total_steps=2)
        for param in state.model[0].parameters():
            param.main_grad.fill_(0.01)
        state.optimizer.step()
        save_train_state(state.model, state.optimizer, directory, {"step": 1})
    return directory


def _optimizer_tensors(optimizer) -> list[torch.Tensor]:
    """The tensors torch's Adam updates: its parameters (megatron's fp32 main copies under the
    distributed optimizer), their grads and the Adam state."""
    from megatron_selfreward.megatron.checkpoint import _inner_optimizers

    out: list[torch.Tensor] = []
    for inner in _inner_optimizers(optimizer):
        for group in inner.param_groups:
            for param in group["params"]:
                out.append(param)
                out += [param.grad] if param.grad is not None else []
                out += [t for t in inner.state.get(param, {}).values() if torch.is_tensor(t)]
    return out


def test_gradients_and_optimizer_state_live_on_the_model_device(monkeypatch, cfg, cuda_model,
                                                                saved_train_state):
    """backward() and the optimizer step cannot run on fake tensors: what they write to is
    checked instead. megatron DDP's gradient buffers (what backward accumulates into and the
    DP all-reduce reads), the distributed optimizer's fp32 main parameters and grads, the Adam
    state a resumed run loads, and the `step` counts torch's fused Adam reads."""
    from megatron_selfreward.megatron.checkpoint import load_train_state
    from megatron_selfreward.megatron.training import build_train_state

    state = build_train_state(cfg, cfg.sft, total_steps=2, model=cuda_model)
    ddp = state.model[0]
    buffers = [b.grad_data for b in ddp.buffers] + [b.param_data for b in ddp.buffers
                                                    if b.param_data is not None]
    assert buffers and devices(buffers) == CUDA
    assert devices([p.main_grad for p in ddp.parameters()]) == CUDA
    from megatron_selfreward.megatron import checkpoint

    host_reads(monkeypatch)  # megatron reads Adam's `step` counts with .item()
    # RNG states are host byte tensors (torch.set_rng_state needs their values): recorded only.
    restored: list[dict] = []
    monkeypatch.setattr(checkpoint, "set_rng_state", restored.append)
    trainer_state = load_train_state(state.model, state.optimizer, saved_train_state)
    assert [sorted(r) for r in restored] == [["cpu", "tracker"]]
    assert trainer_state["step"] == 1
    tensors = _optimizer_tensors(state.optimizer)
    assert len(tensors) > 3 * len(list(cuda_model.parameters())) and devices(tensors) == CUDA
