"""Worker for tests/integration/test_engine_tp.py (run plainly or by torchrun).

ref:  1 process, TP=1: build the tiny model, save it as a distributed checkpoint, generate a
      fixed set of requests (greedy and seeded sampling, shared prefix, n > 1), write tp1.json.
tp2:  2 processes, TP=2: load that checkpoint (resharded on load), generate the same requests on
      the direct path and on the Megatron-module path; then the same with a model built for
      training with sequence parallelism, handed to the engine as it is (its sequence
      parallelism must be back on afterwards); every rank writes its own results.
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path
from typing import Any

import torch

from megatron_selfreward.config import load_config
from megatron_selfreward.generation.engine import GenerationRequest, SamplingParams
from megatron_selfreward.generation.megatron_engine import MegatronEngine
from megatron_selfreward.megatron.checkpoint import load_model, save_model
from megatron_selfreward.megatron.model import build_model
from megatron_selfreward.megatron.parallel import destroy_distributed, init_distributed

BASE = ["model.init_std=0.1"]


def requests() -> list[GenerationRequest]:
    gen = torch.Generator().manual_seed(3)
    head = torch.randint(0, 512, (20,), generator=gen).tolist()
    prompts = [head + torch.randint(0, 512, (n,), generator=gen).tolist() for n in (2, 9, 5)]
    prompts.append(torch.randint(0, 512, (7,), generator=gen).tolist())
    greedy = SamplingParams(temperature=0.0, max_new_tokens=12)
    sampled = SamplingParams(temperature=0.8, top_p=0.9, top_k=50, max_new_tokens=10, n=3, seed=11)
    return ([GenerationRequest(f"g{i}", p, greedy) for i, p in enumerate(prompts)]
            + [GenerationRequest(f"s{i}", p, sampled) for i, p in enumerate(prompts)])


def run(engine: MegatronEngine) -> dict[str, Any]:
    results = engine.generate(requests())
    return {
        r.request_id: [{"tokens": s.token_ids, "logprobs": s.logprobs, "finish": s.finish_reason}
                       for s in r.samples]
        for r in results
    }


def main() -> None:
    warnings.filterwarnings("ignore")
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["ref", "tp2"])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    tp = 1 if args.mode == "ref" else 2
    cfg = load_config(None, BASE + [f"parallel.tensor_model_parallel_size={tp}"])
    env = init_distributed(cfg)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    if args.mode == "ref":
        save_model(model, args.out / "init")
        (args.out / "tp1.json").write_text(json.dumps(run(MegatronEngine(model, cfg))))
    else:
        load_model(model, args.out / "init")
        engine = MegatronEngine(model, cfg)
        out = {"direct_path": engine.runner.direct is not None, "direct": run(engine)}
        out["rows_joined"] = engine.stats["rows_joined"]  # continuous batching (the default)
        out["static"] = run(MegatronEngine(model, cfg, continuous=False))
        out["auto"] = run(MegatronEngine(model, cfg, max_batch_size=0))  # sizes agreed over TP
        engine.runner.direct = None  # the Megatron-module path, with its own TP communication
        out["modules"] = run(engine)
        sp_cfg = load_config(None, BASE + ["parallel.tensor_model_parallel_size=2",
                                           "parallel.sequence_parallel=true"])
        sp_model = build_model(sp_cfg)
        load_model(sp_model, args.out / "init")
        engine = MegatronEngine(sp_model, sp_cfg)
        out["sp_direct"] = run(engine)
        engine.runner.direct = None
        out["sp_modules"] = run(engine)
        out["sp_restored"] = sorted({m.sequence_parallel for m in sp_model.modules()
                                     if hasattr(m, "sequence_parallel")}) + [sp_model.config.sequence_parallel]
        (args.out / f"tp2_rank{env.rank}.json").write_text(json.dumps(out))
    destroy_distributed()


if __name__ == "__main__":
    main()
