"""A stand-in for the `tensorrt_llm` package (a test double), shaped like the supported releases.

TensorRT-LLM cannot be installed where this project is developed, so tests/unit/test_trtllm_engine.py
injects this into `sys.modules` in its place (or uses the real module where it imports and CUDA
is present; see that file). It is not a simulation of a model: the tokens a "model" emits come
from a script the test sets. What it does mirror is the API surface our engine touches, as read
in TensorRT-LLM's sources, so that a call the real API would reject fails here too:

- import paths per release (`RELEASES`): `tensorrt_llm.LLM` (PyTorch backend), `tensorrt_llm.llmapi`,
  `tensorrt_llm.sampling_params`, `tensorrt_llm._tensorrt_engine.LLM` (TensorRT backend, absent
  once upstream removed it), `BuildConfig` at the top level only where releases still export it;
- the argument checks of `SamplingParams.__post_init__` / `_validate`, `BaseLLM.__init__`,
  `_TorchLLM._validate_args_for_torch_backend`, `BaseLLM._prepare_sampling_params` and
  `BaseLLM._check_arguments` that our calls could hit; each check below names the upstream
  function (file and function) it mirrors;
- the stopping rules our result mapping depends on: a stop token ends the sample with
  finish_reason "stop" and stop_reason = the token, kept in token_ids only with
  include_stop_str_in_output; the end id ends it without being returned.

It records what it receives (LLM constructions, builds, saves, generate calls).
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pytest


@dataclass(frozen=True)
class Release:
    version: str
    logprobs_mode: bool  # SamplingParams.logprobs_mode (LogprobMode) exists
    top_level_build_config: bool  # `from tensorrt_llm import BuildConfig` works
    tensorrt_backend: bool  # `tensorrt_llm._tensorrt_engine` exists
    # BaseLLM._check_arguments (TensorRT backend) tests `sampling_params.logprobs` for truth in
    # 1.0 and `is not None` on main (so logprobs=0 also needs gather_generation_logits there).
    logprobs_check_is_not_none: bool


RELEASES = {
    # Below the supported range: only its version matters here.
    "0.21": Release("0.21.0", False, True, False, False),
    # 1.0: SamplingParams without logprobs_mode (read: tensorrt_llm/sampling_params.py, 1.0.0rc4).
    "1.0": Release("1.0.0", False, True, True, False),
    # 1.3: logprobs_mode: LogprobMode = LogprobMode.RAW (API reference of 1.3.0rc7); BuildConfig
    # only in tensorrt_llm.llmapi.
    "1.3": Release("1.3.0rc7", True, False, True, True),
    # main after the TensorRT backend's removal (migration guide "TensorRT Backend Removed");
    # the version number stands for any such release.
    "main": Release("1.5.0.dev0", True, False, False, True),
}


class LogprobMode(str, enum.Enum):
    """tensorrt_llm/sampling_params.py `LogprobMode` (a StrEnum upstream): raw / processed."""

    RAW = "raw"
    PROCESSED = "processed"


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    cumulative_logprob: float | None = None
    logprobs: list[Any] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class RequestOutput:
    request_id: int
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = True


def _sampling_params_class(release: Release) -> type:
    fields_ = [
        ("end_id", int | None, None), ("pad_id", int | None, None), ("max_tokens", int, 32),
        ("stop", str | list | None, None), ("stop_token_ids", list | None, None),
        ("include_stop_str_in_output", bool, False), ("n", int, 1), ("best_of", int | None, None),
        ("use_beam_search", bool, False), ("top_k", int | None, None), ("top_p", float | None, None),
        ("seed", int | None, None), ("temperature", float | None, None), ("logprobs", int | None, None),
        ("prompt_logprobs", int | None, None), ("return_context_logits", bool, False),
        ("return_generation_logits", bool, False), ("detokenize", bool, True),
        ("truncate_prompt_tokens", int | None, None),
    ]
    if release.logprobs_mode:
        fields_.append(("logprobs_mode", LogprobMode, LogprobMode.RAW))

    def __post_init__(self: Any) -> None:
        # tensorrt_llm/sampling_params.py SamplingParams.__post_init__
        if self.pad_id is None:
            self.pad_id = self.end_id
        self.best_of = self.best_of or self.n
        self._validate()

    def _validate(self: Any) -> None:
        # tensorrt_llm/sampling_params.py SamplingParams._validate
        if self.top_p is not None and (self.top_p < 0 or self.top_p > 1):
            raise ValueError(f"require 0 <= top_p <= 1, got top_p={self.top_p}")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"require top_k >= 0, got top_k={self.top_k}")
        if self.temperature is not None and self.temperature < 0:
            raise ValueError(f"require temperature >= 0, got temperature={self.temperature}")
        if self.best_of is not None and self.best_of < self.n:
            raise ValueError(f"best_of ({self.best_of}) cannot be less than n ({self.n})")
        if (self.best_of is not None and self.best_of > 1 and self._greedy_decoding
                and not os.environ.get("TLLM_ALLOW_N_GREEDY_DECODING")):
            raise ValueError(f"Greedy decoding in the LLM API does not allow multiple returns, got best_of={self.best_of}")
        if self.truncate_prompt_tokens is not None and self.truncate_prompt_tokens < 1:
            raise ValueError(f"truncate_prompt_tokens must be >= 1, got {self.truncate_prompt_tokens}")
        self.logprobs = self.logprobs and int(self.logprobs)
        self.prompt_logprobs = self.prompt_logprobs and int(self.prompt_logprobs)
        if release.logprobs_mode:
            # Upstream types the field as LogprobMode (values "raw" / "processed"); a value that is
            # not one (vLLM's "raw_logprobs") is refused here. Where upstream itself notices was
            # not confirmed from its sources; the stand-in refuses at construction.
            self.logprobs_mode = LogprobMode(self.logprobs_mode)

    def _greedy_decoding(self: Any) -> bool:
        # tensorrt_llm/sampling_params.py SamplingParams.params_imply_greedy_decoding
        t, p, k = self.temperature, self.top_p, self.top_k
        return not self.use_beam_search and ((t is None and p is None and k is None)
                                             or k == 1 or p == 0.0 or t == 0)

    return dataclasses.make_dataclass(
        "SamplingParams", fields_, kw_only=True,
        namespace={"__post_init__": __post_init__, "_validate": _validate,
                   "_greedy_decoding": property(_greedy_decoding), "__module__": "tensorrt_llm.sampling_params"})


class BuildConfig:
    """tensorrt_llm/builder.py `BuildConfig`: the fields our build passes."""

    FIELDS = {"max_batch_size": 2048, "max_input_len": 1024, "max_seq_len": None, "max_beam_width": 1,
              "max_num_tokens": 8192, "gather_context_logits": False, "gather_generation_logits": False}

    def __init__(self, **kwargs: Any) -> None:
        unknown = set(kwargs) - set(self.FIELDS)
        if unknown:
            raise TypeError(f"BuildConfig got unexpected arguments {sorted(unknown)}")
        self.kwargs = kwargs
        for key, default in self.FIELDS.items():
            setattr(self, key, kwargs.get(key, default))

    def to_dict(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in self.FIELDS}


# The LLM arguments the stand-in knows (a subset of BaseLlmArgs / TorchLlmArgs / TrtLlmArgs in
# tensorrt_llm/llmapi/llm_args.py): what our engine passes, and the TensorRT-only ones the
# PyTorch LLM refuses.
_COMMON_ARGS = {"pipeline_parallel_size", "max_batch_size", "max_seq_len", "max_input_len", "max_num_tokens",
                "max_beam_width", "gather_generation_logits", "enable_chunked_prefill", "kv_cache_config"}
_TRT_ONLY_ARGS = {"build_config", "workspace", "enable_build_cache", "normalize_log_probs", "fast_build"}
_TORCH_ONLY_ARGS = {"cuda_graph_config", "disable_overlap_scheduler", "sampler_type", "attn_backend"}


class FakeTRTLLM:
    """One release's `tensorrt_llm` (and submodules), with a scripted "model" behind its LLMs."""

    def __init__(self, release: str = "1.3", *, float_logprobs: bool = False) -> None:
        self.release = RELEASES[release]
        self.llms: list[Any] = []
        self.builds: list[dict] = []
        self.loads: list[dict] = []  # every LLM construction: {"backend": ..., **arguments}
        self.generate_calls: list[tuple[list, list]] = []
        self.script: Callable[[list[int], Any], list[int]] = lambda prompt, sp: [97, 98, 0]
        self.float_logprobs = float_logprobs  # logprobs as plain floats instead of {token: Logprob}
        self.SamplingParams = _sampling_params_class(self.release)
        self.modules = self._modules()

    # -- the LLM classes ------------------------------------------------------------------

    def _llm_classes(self) -> tuple[type, type]:
        fake, release, SamplingParams = self, self.release, self.SamplingParams

        class BaseLLM:
            backend = ""
            valid_args: set[str] = set()

            def __init__(self, model: str | Path, tokenizer: Any = None, tokenizer_mode: str = "auto",
                         skip_tokenizer_init: bool = False, trust_remote_code: bool = False,
                         tensor_parallel_size: int = 1, dtype: str = "auto", revision: str | None = None,
                         tokenizer_revision: str | None = None, **kwargs: Any) -> None:
                # tensorrt_llm/llmapi/llm.py BaseLLM.__init__: unknown keyword arguments
                for key in kwargs:
                    if key not in self.valid_args | {"backend"}:
                        raise ValueError(f"{type(self).__name__} got invalid argument: {key}")
                self.model = Path(model)
                self.args = dict(model=str(model), tokenizer=tokenizer, skip_tokenizer_init=skip_tokenizer_init,
                                 tensor_parallel_size=tensor_parallel_size, dtype=dtype, **kwargs)
                self.tokenizer = None if skip_tokenizer_init else "hf-tokenizer"
                self.closed = False
                self._build_model()
                fake.loads.append({"backend": self.backend, **self.args})
                fake.llms.append(self)

            def _build_model(self) -> None:
                raise NotImplementedError

            @property
            def init(self) -> dict[str, Any]:
                return self.args

            def shutdown(self) -> None:
                self.closed = True

            def generate(self, inputs: list, sampling_params: Any = None, use_tqdm: bool = True) -> list:
                # tensorrt_llm/llmapi/llm.py BaseLLM.generate -> generate_async, per prompt
                if self.closed:
                    raise RuntimeError("LLM is shutting down")
                params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(inputs)
                prepared = []
                for prompt, sp in zip(inputs, params):
                    if not (isinstance(prompt, list) and all(isinstance(t, int) for t in prompt)):
                        raise TypeError(f"The inputs must be type str or list of int, but got {type(prompt)}")
                    sp = self._prepare_sampling_params(sp)
                    self._check_arguments(len(prompt), 0, sp)
                    prepared.append(sp)
                fake.generate_calls.append((inputs, prepared))
                return [RequestOutput(i, p, [fake.complete(p, sp)]) for i, (p, sp) in enumerate(zip(inputs, prepared))]

            def _prepare_sampling_params(self, sp: Any) -> Any:
                # tensorrt_llm/llmapi/llm.py BaseLLM._prepare_sampling_params
                if sp is None:
                    sp = SamplingParams()
                if not isinstance(sp, SamplingParams):
                    raise TypeError(f"The sampling_params must be type SamplingParams or None, but got {type(sp)}")
                if sp.end_id is None and self.tokenizer is None:
                    raise ValueError("tokenizer is required to reset end_id if it is None, or you can explicitly "
                                     "specify the end_id for sampling_params")
                if self.backend == "tensorrt":
                    # the TensorRT backend derives log-probs from the generation logits
                    requested = sp.logprobs is not None if release.logprobs_check_is_not_none else bool(sp.logprobs)
                    if requested and not sp.return_generation_logits:
                        sp.return_generation_logits = True
                return sp

            def _check_arguments(self, prompt_len: int, query_len: int, sp: Any) -> None:
                raise NotImplementedError

        class TorchLLM(BaseLLM):
            """tensorrt_llm/llmapi/llm.py `LLM(_TorchLLM)`: loads a Hugging Face directory."""

            backend = "pytorch"
            valid_args = _COMMON_ARGS | _TORCH_ONLY_ARGS

            def __init__(self, model: str | Path, *args: Any, **kwargs: Any) -> None:
                # tensorrt_llm/llmapi/llm.py _TorchLLM._validate_args_for_torch_backend
                trt_only = sorted(k for k in kwargs if k in _TRT_ONLY_ARGS)
                if trt_only:
                    raise ValueError(f"The following arguments are specific to TensorRT backend and cannot be used "
                                     f"with PyTorch backend: {trt_only}.\nPlease use 'from tensorrt_llm._tensorrt_engine "
                                     "import LLM' instead to use the TensorRT backend.")
                super().__init__(model, *args, **kwargs)

            def _build_model(self) -> None:
                config = self.model / "config.json"
                if not config.is_file() or "build_config" in json.loads(config.read_text()):
                    raise ValueError(f"{self.model}: not a Hugging Face model directory")

            def _check_arguments(self, prompt_len: int, query_len: int, sp: Any) -> None:
                # tensorrt_llm/llmapi/llm.py BaseLLM._check_arguments, PyTorch backend: only the
                # prompt against max_num_tokens (log-probs need nothing at LLM creation)
                max_num_tokens = self.args.get("max_num_tokens", 8192)
                if not self.args.get("enable_chunked_prefill") and max_num_tokens and \
                        prompt_len + query_len > max_num_tokens:
                    raise ValueError(f"The sum of prompt length ({prompt_len}), query length ({query_len}) "
                                     f"should not exceed max_num_tokens ({max_num_tokens})")

        class TrtLLM(BaseLLM):
            """tensorrt_llm/_tensorrt_engine `LLM` (`_TrtLLM`): builds an engine or loads a saved one."""

            backend = "tensorrt"
            valid_args = _COMMON_ARGS | _TRT_ONLY_ARGS

            def _build_model(self) -> None:
                config = self.model / "config.json"
                saved = json.loads(config.read_text()) if config.is_file() else None
                if saved is not None and "build_config" in saved:
                    self.engine_config = saved  # a saved engine
                elif saved is not None:  # a Hugging Face directory: build
                    build_config = self.args.get("build_config") or BuildConfig()
                    self.engine_config = {"build_config": build_config.to_dict(), "source": str(self.model)}
                    fake.builds.append(self.args)
                else:
                    raise ValueError(f"{self.model}: neither an HF model to build nor a saved engine")

            def save(self, engine_dir: str) -> None:
                Path(engine_dir).mkdir(parents=True, exist_ok=True)
                (Path(engine_dir) / "config.json").write_text(json.dumps(self.engine_config))

            def _check_arguments(self, prompt_len: int, query_len: int, sp: Any) -> None:
                # tensorrt_llm/llmapi/llm.py BaseLLM._check_arguments, TensorRT backend
                build = self.engine_config["build_config"]
                max_seq_len = build["max_seq_len"]
                if not self.args.get("enable_chunked_prefill") and max_seq_len is not None and \
                        prompt_len + query_len + (sp.max_tokens or 0) > max_seq_len:
                    raise ValueError(f"The sum of prompt length ({prompt_len}) and query length ({query_len}) "
                                     f"max_tokens ({sp.max_tokens}) should not exceed max_seq_len ({max_seq_len})")
                max_batch_size = self.args.get("max_batch_size") or build["max_batch_size"]
                if not sp.use_beam_search and sp.best_of > max_batch_size:
                    raise ValueError(f"sampling_params.n ({sp.n}) cannot exceed max_batch_size ({max_batch_size}) "
                                     "when use_beam_search is False")
                if sp.prompt_logprobs and not build["gather_context_logits"]:
                    raise ValueError(f"`sampling_params's prompt_logprobs={sp.prompt_logprobs}` requires "
                                     "`gather_context_logits=True` in the `BuildConfig` when constructing the LLM.")
                requested = sp.logprobs is not None if release.logprobs_check_is_not_none else bool(sp.logprobs)
                if requested and not self.args.get("gather_generation_logits"):
                    raise ValueError(f"`sampling_params.logprobs={sp.logprobs}` requires `gather_generation_logits=True` "
                                     "to be passed explicitly to the `LLM()` constructor.")

        return TorchLLM, TrtLLM

    def _modules(self) -> dict[str, types.ModuleType | None]:
        TorchLLM, TrtLLM = self._llm_classes()
        self.TorchLLM, self.TrtLLM = TorchLLM, TrtLLM
        root = types.ModuleType("tensorrt_llm")
        root.__version__ = self.release.version
        root.LLM, root.SamplingParams = TorchLLM, self.SamplingParams
        if self.release.top_level_build_config:
            root.BuildConfig = BuildConfig
        llmapi = types.ModuleType("tensorrt_llm.llmapi")
        llmapi.LLM, llmapi.SamplingParams, llmapi.BuildConfig = TorchLLM, self.SamplingParams, BuildConfig
        sampling = types.ModuleType("tensorrt_llm.sampling_params")
        sampling.SamplingParams = self.SamplingParams
        if self.release.logprobs_mode:
            sampling.LogprobMode = LogprobMode
        engine: types.ModuleType | None = None
        if self.release.tensorrt_backend:
            engine = types.ModuleType("tensorrt_llm._tensorrt_engine")
            engine.LLM = TrtLLM
            root._tensorrt_engine = engine
        root.llmapi, root.sampling_params = llmapi, sampling
        return {"tensorrt_llm": root, "tensorrt_llm.llmapi": llmapi, "tensorrt_llm.sampling_params": sampling,
                "tensorrt_llm._tensorrt_engine": engine}

    @property
    def module(self) -> types.ModuleType:
        return self.modules["tensorrt_llm"]

    def install(self, monkeypatch: pytest.MonkeyPatch) -> "FakeTRTLLM":
        """Put this release in sys.modules (None for an absent submodule: importing it fails)."""
        for name, module in self.modules.items():
            monkeypatch.setitem(sys.modules, name, module)
        return self

    # -- the scripted "model" -------------------------------------------------------------

    def complete(self, prompt: list[int], sp: Any) -> CompletionOutput:
        """TensorRT-LLM's stopping rules over the scripted tokens."""
        want = self.script(prompt, sp)
        stops = set(sp.stop_token_ids or [])
        out, reason, stop_reason = [], "length", None
        for token in want[: sp.max_tokens]:
            if token == sp.end_id:
                reason = "stop"  # the end id is not returned
                break
            out.append(token)
            if token in stops:
                reason, stop_reason = "stop", token
                if not sp.include_stop_str_in_output:
                    out.pop()
                break
        lps = [-0.25 * (k + 1) for k in range(len(out))]
        if not sp.logprobs:
            logprobs: list[Any] = []  # none asked for, none returned
        elif self.float_logprobs:
            logprobs = lps
        else:
            logprobs = [{t: Logprob(lp, 1)} for t, lp in zip(out, lps)]
        return CompletionOutput(0, "", out, sum(lps) if sp.logprobs else None, logprobs, reason, stop_reason)
