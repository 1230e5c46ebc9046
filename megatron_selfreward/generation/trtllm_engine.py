"""The TensorRT-LLM generation engine (GPU clusters): the engine protocol over TensorRT-LLM's LLM API.

UNVERIFIED ON HARDWARE: TensorRT-LLM cannot be installed on the machines this project is
developed and tested on, so this module has never generated a token on a GPU. What is tested
(tests/unit/test_trtllm_engine.py, against a stand-in `tensorrt_llm` that enforces the argument
checks of the real API, or against the real module where it imports and CUDA is present) is the
mapping in both directions: our `SamplingParams` -> TensorRT-LLM's, and its `RequestOutput` /
`CompletionOutput` -> our `Sample`s, plus how the LLM is created for each backend.

Supported: TensorRT-LLM >= 1.0 (`trtllm_api.SUPPORTED_TRTLLM`), checked when the engine is created.

How it maps the protocol (engine.py) onto the LLM API:
- Backend (generation.trtllm_backend): "pytorch" (default) creates `tensorrt_llm.LLM`, the
  PyTorch backend, straight from the model's bf16 `hf/` export (exported from `megatron/` when
  that is where the weights are): a new model per iteration costs an export, never an engine
  build. "tensorrt" is upstream's legacy TensorRT-engine path (`tensorrt_llm._tensorrt_engine`):
  an engine built once per model directory into `trtllm/` and reused while its stamp (build
  spec + source identity) matches (`generation/trtllm_build.py`). Both get the config's TP/PP sizes
  and length limits.
- Prompts go in as token-id lists; one TensorRT-LLM request per *sample*, with n=1 and the
  sample's own seed `sample_seed(seed, j)`, so a sample depends on (seed, sample index) only, as
  the protocol asks (TensorRT-LLM's own n>1 draws every sample of a request from one seed).
- Greedy (temperature 0) is `top_k=1` (the LLM API's greedy form). Otherwise temperature,
  `top_k` (None when ours is 0 = off) and `top_p` (always passed: the LLM API reads top_p=None
  as greedy).
- EOS and stop tokens: `end_id=-1` (never end on TensorRT-LLM's end id, which it would drop from
  the output along with its log-prob) and every EOS id plus the request's stop tokens as
  `stop_token_ids`, with `include_stop_str_in_output=True`: the ending token stays in
  `token_ids` with its log-prob, as the protocol wants. A stop on an EOS id is "eos", on another
  stop token or a stop string "stop", at `max_tokens` "length".
- Stop strings are ours, applied to the returned tokens: a sample ends at the first token whose
  text completes a stop string and its text is cut before it (MegatronEngine's rule). They are
  not passed as `stop`: the LLM API tokenises `stop` only when it fills in `end_id` itself
  (never, with `end_id=-1`), and it matches them as token sequences, which misses a stop string
  tokenised differently inside a longer generation. The cost: a sample that hits one decodes on
  to its max_new_tokens (only prompt generation uses stop strings).
- TensorRT-LLM gets token ids only (`skip_tokenizer_init=True`): text is decoded with our
  tokenizer, by the same rule as MegatronEngine.
- Log-probs only where a request asks (`SamplingParams.logprobs`; no stage does today, DPO
  recomputes them): `logprobs=1` and, in releases that have the field, `logprobs_mode="raw"`
  (upstream's `LogprobMode.RAW`: the unmodified distribution, as the protocol defines). The
  TensorRT backend applies the temperature before its log-probs whatever the mode (upstream PR
  #12514 documents this), and what PyTorch-backend releases without the field return was not
  established: `logprobs_mode` in `stats` says "raw", "sampling" or "trtllm_default". Samples
  of other requests carry NaN. The TensorRT backend refuses `logprobs` unless the LLM was created
  with `gather_generation_logits` (`BaseLLM._check_arguments`), which needs an engine built to
  keep generation logits: `TRTLLMEngine(..., logprobs=True)` creates both. The PyTorch backend
  computes them in its sampler and needs nothing at creation.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import time
from pathlib import Path
from typing import Any, Sequence

from megatron_selfreward.config import Config
from megatron_selfreward.generation.engine import (
    FinishReason,
    GenerationEngine,
    GenerationRequest,
    GenerationResult,
    Sample,
    SamplingParams,
    engine_rates,
    sample_seed,
)

# Decoding a short window of tail tokens is enough to see a stop string appear.
STOP_WINDOW_EXTRA_TOKENS = 8
_STAT_KEYS = ("requests", "samples", "prefill_tokens", "decode_tokens", "logprobs_missing",
              "decode_time_s")


def _field_names(cls: Any) -> set[str]:
    """The keyword arguments a TensorRT-LLM class takes (a dataclass in current releases)."""
    if dataclasses.is_dataclass(cls):
        return {f.name for f in dataclasses.fields(cls) if f.init}
    return set(inspect.signature(cls).parameters)


class TRTLLMEngine(GenerationEngine):
    """Generation through TensorRT-LLM from `model_dir` (see the module docs).

    cfg: the run config (generation.trtllm_backend, TP/PP sizes, max_seq_len, generation.batch_size
    as the LLM's max_batch_size, pipeline.seed); tokenizer: ours (`decode`, `eos_token_id`), for
    text and stop strings; eos_token_ids: default = the tokenizer's `eos_token_id`; logprobs: create
    the LLM so that requests may ask for log-probs (matters on the TensorRT backend). Every call to
    `generate` sends all its requests at once; TensorRT-LLM batches them in flight.
    """

    def __init__(self, cfg: Config, model_dir: str | Path, tokenizer: Any = None,
                 eos_token_ids: Sequence[int] | None = None, *, seed: int | None = None,
                 logprobs: bool = False) -> None:
        from megatron_selfreward.generation.trtllm_api import check_trtllm_version

        self.trtllm_version = check_trtllm_version()  # fail here, before any export or build
        self.backend = cfg.generation.trtllm_backend
        self.logprobs = logprobs
        self.cfg = cfg
        self.tokenizer = tokenizer
        if eos_token_ids is None:
            eos = getattr(tokenizer, "eos_token_id", None)
            eos_token_ids = [] if eos is None else [eos]
        self.eos_token_ids = [int(t) for t in eos_token_ids]
        self.seed = cfg.pipeline.seed if seed is None else seed
        self.max_seq_len = cfg.model.max_seq_len
        self.llm: Any = None
        self.model_dir: Path | None = None
        self.spec: Any = None
        self.engine_built = False
        self.engine_build_time_s = 0.0
        self._sp_fields: set[str] = set()
        self._stats: dict[str, float] = {}
        self.reset_stats()
        self.load_weights(model_dir)

    # -- protocol --------------------------------------------------------------------------

    @property
    def logprobs_mode(self) -> str:
        """What the returned log-probs are a distribution of (see the module docs)."""
        if self.backend == "tensorrt":
            return "sampling"
        return "raw" if "logprobs_mode" in self._sp_fields else "trtllm_default"

    @property
    def stats(self) -> dict[str, Any]:
        """Counters since `reset_stats`, plus the engine build of this model (TensorRT backend:
        built or reused; the PyTorch backend builds none).

        prefill_tokens: prompt tokens sent (one prompt per sample); decode_tokens: tokens
        generated; decode_time_s: wall time of `generate` calls, prefill included (TensorRT-LLM
        interleaves prefill and decode in flight, so there is no separate prefill time);
        logprobs_missing: generated tokens TensorRT-LLM returned no log-prob for (NaN).
        """
        out: dict[str, Any] = {**self._stats, **engine_rates(self._stats)}  # no prefill_time_s here
        out["engine_built"] = int(self.engine_built)
        out["engine_build_time_s"] = self.engine_build_time_s
        out["logprobs_mode"] = self.logprobs_mode
        out["trtllm_backend"] = self.backend
        out["trtllm_version"] = self.trtllm_version
        return out

    def reset_stats(self) -> None:
        self._stats = {key: 0.0 if key.endswith("_s") else 0 for key in _STAT_KEYS}

    def load_weights(self, source: Any) -> None:
        """A model directory (`models/M<t>`): export `hf/` if needed, then create the LLM from it
        (PyTorch backend) or from the engine built or reused in `trtllm/` (TensorRT backend).
        Called once per iteration (a new model), never per request."""
        from megatron_selfreward.generation.trtllm_api import pytorch_llm_class, tensorrt_llm_class
        from megatron_selfreward.generation.trtllm_build import build_engine_for, prepare_model_dir

        if not isinstance(source, (str, Path)):
            raise TypeError(f"TRTLLMEngine.load_weights takes a model directory, not {type(source)}")
        import tensorrt_llm

        self.close()
        self._sampling_params_cls = tensorrt_llm.SamplingParams
        self._sp_fields = _field_names(tensorrt_llm.SamplingParams)
        model_dir = Path(source)
        llm_kwargs: dict[str, Any] = {"skip_tokenizer_init": True}  # token ids in and out; text is ours
        if self.backend == "pytorch":
            spec, _ = prepare_model_dir(self.cfg, model_dir)
            # No build_config here: the PyTorch LLM refuses TensorRT-only arguments.
            llm = pytorch_llm_class()(model=spec.hf_dir, tensor_parallel_size=spec.tp_size,
                                      pipeline_parallel_size=spec.pp_size, dtype=spec.dtype,
                                      max_batch_size=spec.max_batch_size, max_seq_len=spec.max_seq_len,
                                      **llm_kwargs)
            self.engine_built, self.engine_build_time_s = False, 0.0
        else:
            started = time.perf_counter()
            spec, llm = build_engine_for(self.cfg, model_dir, gather_generation_logits=self.logprobs, **llm_kwargs)
            self.engine_built = llm is not None
            self.engine_build_time_s = time.perf_counter() - started if self.engine_built else 0.0
            if llm is None:
                if self.logprobs:  # BaseLLM._check_arguments reads the LLM's flag, not the engine's
                    llm_kwargs["gather_generation_logits"] = True
                llm = tensorrt_llm_class()(model=spec.engine_dir, tensor_parallel_size=spec.tp_size,
                                           pipeline_parallel_size=spec.pp_size, **llm_kwargs)
        self.llm, self.model_dir, self.spec = llm, model_dir, spec

    def close(self) -> None:
        """Release the engine (GPU memory, TensorRT-LLM's worker processes)."""
        if self.llm is not None and hasattr(self.llm, "shutdown"):
            self.llm.shutdown()
        self.llm = None

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        if self.llm is None:
            raise RuntimeError("TRTLLMEngine is closed; load_weights(model_dir) first")
        prompts, params, where = [], [], []
        for index, request in enumerate(requests):
            prompt = [int(t) for t in request.prompt_token_ids]
            self._check_prompt(request, prompt)
            # Generation stops at the model's context length ("length") rather than failing.
            max_new = min(request.params.max_new_tokens, self.max_seq_len - len(prompt))
            for j in range(request.params.n):
                seed = sample_seed(request.params.seed, j, engine_seed=self.seed,
                                   request_id=request.request_id)
                prompts.append(prompt)
                params.append(self.sampling_params(request.params, max_new, seed))
                where.append((index, max_new))
        started = time.perf_counter()
        outputs = self.llm.generate(prompts, sampling_params=params, use_tqdm=False) if prompts else []
        self._stats["decode_time_s"] += time.perf_counter() - started
        by_request: list[list[Sample]] = [[] for _ in requests]
        for (index, max_new), output in zip(where, outputs):
            sample = self._to_sample(output.outputs[0], requests[index].params, max_new)
            by_request[index].append(sample)
            self._stats["decode_tokens"] += len(sample.token_ids)
        self._stats["requests"] += len(requests)
        self._stats["samples"] += len(prompts)
        self._stats["prefill_tokens"] += sum(len(p) for p in prompts)
        return [GenerationResult(r.request_id, s) for r, s in zip(requests, by_request)]

    # -- request side ----------------------------------------------------------------------

    def _check_prompt(self, request: GenerationRequest, prompt: list[int]) -> None:
        if request.params.stop_strings and self.tokenizer is None:
            raise ValueError(f"request {request.request_id!r}: stop_strings need a tokenizer; "
                             "pass tokenizer= to TRTLLMEngine")
        if len(prompt) >= self.max_seq_len:
            raise ValueError(f"request {request.request_id!r}: prompt has {len(prompt)} tokens, "
                             f"model.max_seq_len is {self.max_seq_len}")
        vocab = self.cfg.model.vocab_size
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise ValueError(f"request {request.request_id!r}: token id outside the vocabulary [0, {vocab})")
        if request.params.followup is not None:
            raise ValueError(f"request {request.request_id!r}: a Followup (continuing a sample in "
                             "place) is not mapped to TensorRT-LLM; send follow-up requests instead")
        if request.params.logprobs and self.backend == "tensorrt" and not self.logprobs:
            raise ValueError(f"request {request.request_id!r} asks for log-probs: on the TensorRT backend they "
                             "need an engine built to keep generation logits; create TRTLLMEngine(..., "
                             "logprobs=True)")
        if request.params.allowed_token_ids:
            # Its one user is judge.force_score, a deviation for judges too small to follow the
            # format; the judges TensorRT-LLM serves write their own "Score: x".
            raise ValueError(f"request {request.request_id!r}: allowed_token_ids is not mapped to "
                             "TensorRT-LLM; set judge.force_score: false or generation.engine: megatron")

    def sampling_params(self, params: SamplingParams, max_new_tokens: int, seed: int) -> Any:
        """TensorRT-LLM's SamplingParams for one sample of a request (see the module docs)."""
        stop_ids = list(dict.fromkeys(self.eos_token_ids + [int(t) for t in params.stop_token_ids]))
        kwargs: dict[str, Any] = {
            "max_tokens": max_new_tokens, "n": 1, "end_id": -1, "pad_id": -1, "seed": seed,
            "stop_token_ids": stop_ids, "include_stop_str_in_output": True,
        }
        if params.greedy:
            kwargs.update(top_k=1, top_p=None)
        else:
            kwargs.update(temperature=params.temperature, top_p=params.top_p,
                          top_k=params.top_k if params.top_k > 0 else None)
        if params.logprobs:
            # 1, not 0: releases without LogprobMode read logprobs=0 as "none" (SamplingParams.
            # _get_output_config: return_log_probs=bool(self.logprobs)); later ones return the
            # top-1 plus the sampled token for 1. A sampled token missing from what comes back
            # is NaN, counted in logprobs_missing.
            kwargs["logprobs"] = 1
            if "logprobs_mode" in self._sp_fields:
                kwargs["logprobs_mode"] = "raw"  # LogprobMode.RAW in tensorrt_llm/sampling_params.py
        return self._sampling_params_cls(**kwargs)

    # -- result side -----------------------------------------------------------------------

    def _to_sample(self, out: Any, params: SamplingParams, max_new_tokens: int) -> Sample:
        ids = [int(t) for t in (out.token_ids or [])]
        logprobs = self._logprobs(out, ids) if params.logprobs else [math.nan] * len(ids)
        finish = self._finish_reason(out, ids)
        if params.stop_strings and self.tokenizer is not None:
            end = self._stop_string_end(ids, params.stop_strings)
            if end is not None:
                ids, logprobs, finish = ids[:end], logprobs[:end], "stop"
        if finish is None:
            finish = "length" if len(ids) >= max_new_tokens else "stop"
        sample = Sample(ids, logprobs, finish)
        if self.tokenizer is not None:
            sample.text = self.decode_text(ids, finish, params)
        return sample

    def _finish_reason(self, out: Any, ids: list[int]) -> FinishReason | None:
        """TensorRT-LLM's finish_reason / stop_reason in our terms (None: decide by length)."""
        reason, stop = out.finish_reason, getattr(out, "stop_reason", None)
        if reason == "length":
            return "length"
        if reason != "stop":
            # 'timeout' / 'cancelled' are failures of the serving layer, not a way a sample ends
            raise RuntimeError(f"TensorRT-LLM ended a request with finish_reason={reason!r}")
        if isinstance(stop, int):
            return "eos" if stop in self.eos_token_ids else "stop"
        if isinstance(stop, str):
            return "stop"
        # No stop reason: its end id (never set here) or an older release that reports none;
        # the last token tells.
        if ids and ids[-1] in self.eos_token_ids:
            return "eos"
        return "stop" if ids else None

    def _logprobs(self, out: Any, ids: list[int]) -> list[float]:
        """One log-prob per token: floats (engine backend) or {token id: Logprob} per position
        (PyTorch backend, the sampled token among the top ones); NaN where none came back."""
        raw = list(out.logprobs or [])
        values = []
        for i, token in enumerate(ids):
            entry = raw[i] if i < len(raw) else None
            if isinstance(entry, dict):
                entry = entry.get(token)
            value = getattr(entry, "logprob", entry)
            if value is None:
                self._stats["logprobs_missing"] += 1
                values.append(math.nan)
            else:
                values.append(float(value))
        return values

    def _stop_string_end(self, ids: list[int], stop_strings: Sequence[str]) -> int | None:
        """Length of the shortest prefix of `ids` whose text contains a stop string, or None."""
        if not any(s in self.tokenizer.decode(ids) for s in stop_strings):
            return None
        window = max(len(s) for s in stop_strings) + STOP_WINDOW_EXTRA_TOKENS
        for end in range(1, len(ids) + 1):
            tail = self.tokenizer.decode(ids[max(0, end - window): end])
            if any(s in tail for s in stop_strings):
                return end
        return len(ids)

