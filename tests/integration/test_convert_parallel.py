"""A converted checkpoint loads at TP=2 and at PP=2 and gives transformers' logits.

One torchrun launch with 2 processes (tests/convert_worker.py) covers both layouts, tied and
untied embeddings, and both ways of filling a model: `load_model` of the Megatron checkpoint
written by `convert_hf_to_megatron` (TP=1 layout, resharded by dist_checkpointing) and
`load_hf_into_model` straight from the HF safetensors. The way back is checked from checkpoints
saved by those TP=2 and PP=2 models: `convert_megatron_to_hf` must return the original tensors
bit for bit.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from megatron_selfreward.convert.hf_checkpoint import HFWeights  # noqa: E402
from megatron_selfreward.convert.hf_megatron import (  # noqa: E402
    convert_hf_to_megatron,
    convert_megatron_to_hf,
    read_model_config,
)
from tests.conftest import run_python  # noqa: E402
from tests.unit.test_convert_llama import SEQ, TINY, hf_logits, make_hf_dir  # noqa: E402

MODELS = {"untied": False, "tied": True}


@pytest.mark.slow
@pytest.mark.usefixtures("process_world")  # the converters' world
def test_converted_checkpoint_at_tp2_and_pp2_matches_transformers(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    tokens = torch.randint(0, TINY["vocab_size"], (2, SEQ), generator=torch.Generator().manual_seed(5))
    for name, tied in MODELS.items():
        hf = make_hf_dir(tmp_path / name / "hf", tied=tied, seed=11)
        convert_hf_to_megatron(hf, tmp_path / name / "megatron")
        save_file({"tokens": tokens, "logits": hf_logits(hf, tokens).contiguous()},
                  tmp_path / name / "reference.safetensors")
    out = tmp_path / "results"
    out.mkdir()
    # --standalone: torchrun's own rendezvous on a free port (with --master-port=0 alone,
    # torchrun 2.13 hands the workers MASTER_PORT=0 and they wait forever).
    run_python(["--standalone", "tests/convert_worker.py", "--root", str(tmp_path), "--out", str(out)],
               nproc=2, timeout=300)
    results = {p.stem: json.loads(p.read_text()) for p in out.glob("*.json")}
    expected = {f"{n}_{layout}_{path}" for n in MODELS for layout in ("tp2", "pp2")
                for path in ("megatron_ckpt", "hf_in_memory")}
    assert set(results) == expected
    for key, result in results.items():
        assert result["shape"][-1] == TINY["vocab_size"], key
        assert result["max_abs_diff"] < 1e-4, (key, result)
    # PP=2: the logits come from the second stage.
    assert all(results[k]["rank"] == 1 for k in results if "_pp2_" in k)
    for name in MODELS:
        original = HFWeights(tmp_path / name / "hf")
        for layout in ("tp2", "pp2"):
            back = convert_megatron_to_hf(tmp_path / name / f"saved_{layout}", tmp_path / name / f"back_{layout}",
                                          model_cfg=read_model_config(tmp_path / name / "megatron"))
            returned = HFWeights(back)
            assert returned.specs.keys() == original.specs.keys()
            for tensor in original.specs:
                assert torch.equal(returned.get(tensor), original.get(tensor)), (name, layout, tensor)
