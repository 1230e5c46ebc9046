"""The TensorRT-LLM engine's mapping and build logic, against a stand-in `tensorrt_llm` module.

TensorRT-LLM cannot be installed on the CPU machines these tests run on, so `FakeTRTLLM` below
stands in for it (injected into `sys.modules`). It has the real LLM API's shape as documented by
TensorRT-LLM (`LLM(model=..., tensor_parallel_size=..., build_config=...)`, `.generate(inputs,
sampling_params=[...])`, `.save(dir)`, `.shutdown()`; `SamplingParams` as a keyword dataclass;
outputs with `.outputs[i].token_ids / .text / .logprobs / .finish_reason / .stop_reason`) and
mimics its documented semantics where they matter here: a stop token ends the sample with
finish_reason "stop" and stop_reason = the token, kept in token_ids only with
include_stop_str_in_output; the end id ends it without being returned. It records everything it
receives. What this proves: our request -> SamplingParams mapping, the result mapping, and that
the engine is built once per model and reused. What it cannot prove: that a real TensorRT-LLM
build accepts these arguments and generates correctly on a GPU (never run here).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pytest

from megatron_selfreward.config import load_config
from megatron_selfreward.generation.engine import GenerationRequest, SamplingParams, sample_seed
from megatron_selfreward.tokenizer import ByteTokenizer
from tests.conftest import CONFIGS

TOK = ByteTokenizer(512)
EOS = TOK.eos_token_id


# ---------------------------------------------------------------------------------------------
# The stand-in


@dataclass(slots=True, kw_only=True)
class FakeSamplingParams:
    end_id: int | None = None
    pad_id: int | None = None
    max_tokens: int = 32
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    n: int = 1
    best_of: int | None = None
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    temperature: float | None = None
    logprobs: int | None = None
    logprobs_mode: str = "processed_logprobs"
    detokenize: bool = True


@dataclass(slots=True, kw_only=True)
class OldFakeSamplingParams:
    """An older release: `random_seed`, no `logprobs_mode`."""
    end_id: int | None = None
    pad_id: int | None = None
    max_tokens: int = 32
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    n: int = 1
    top_k: int | None = None
    top_p: float | None = None
    random_seed: int | None = None
    temperature: float | None = None
    logprobs: int | None = None


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


def default_script(prompt: list[int], sp: Any) -> list[int]:
    """What the fake model 'wants' to say: 'ab' then EOS, repeated."""
    return TOK.encode("ab") + [EOS]


class FakeTRTLLM:
    """A `tensorrt_llm` module: records constructions, builds, saves and generate calls."""

    def __init__(self, *, engine_module: bool = False, old_params: bool = False,
                 float_logprobs: bool = False) -> None:
        self.module = types.ModuleType("tensorrt_llm")
        self.llms: list[Any] = []
        self.builds: list[dict] = []
        self.generate_calls: list[tuple[list, list]] = []
        self.script: Callable[[list[int], Any], list[int]] = default_script
        self.float_logprobs = float_logprobs
        fake = self

        class BuildConfig:
            def __init__(self, **kwargs: Any) -> None:
                self.kwargs = kwargs

        class LLM:
            def __init__(self, model: str, tokenizer: str | None = None, skip_tokenizer_init: bool = False,
                         tensor_parallel_size: int = 1, dtype: str = "auto", **kwargs: Any) -> None:
                self.model, self.kwargs, self.closed = Path(model), dict(kwargs), False
                self.init = dict(model=str(model), tokenizer=tokenizer, skip_tokenizer_init=skip_tokenizer_init,
                                 tensor_parallel_size=tensor_parallel_size, dtype=dtype, **kwargs)
                if (self.model / "config.json").is_file() and "build_config" in kwargs:
                    fake.builds.append(self.init)  # an HF directory: builds an engine
                elif not (self.model / "fake_engine.json").is_file():
                    raise RuntimeError(f"{model}: neither an HF model to build nor a saved engine")
                fake.llms.append(self)

            def save(self, engine_dir: str) -> None:
                Path(engine_dir).mkdir(parents=True, exist_ok=True)
                (Path(engine_dir) / "fake_engine.json").write_text(json.dumps({"from": str(self.model)}))

            def shutdown(self) -> None:
                self.closed = True

            def generate(self, inputs: list, sampling_params: Any = None, use_tqdm: bool = True) -> list:
                assert isinstance(inputs, list) and all(isinstance(p, list) for p in inputs)
                assert all(isinstance(t, int) for p in inputs for t in p)
                params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(inputs)
                fake.generate_calls.append((inputs, params))
                return [RequestOutput(i, p, [fake.complete(p, sp)]) for i, (p, sp) in enumerate(zip(inputs, params))]

        self.module.LLM = LLM
        self.module.SamplingParams = OldFakeSamplingParams if old_params else FakeSamplingParams
        self.module.BuildConfig = BuildConfig
        self.engine_module = None
        if engine_module:  # TensorRT-LLM >= 1.0: the engine-building LLM lives here
            class TopLevelPyTorchLLM:
                def __init__(self, *args: Any, **kwargs: Any) -> None:
                    raise AssertionError("the PyTorch-backend LLM builds no engine")

            self.module.LLM = TopLevelPyTorchLLM
            self.engine_module = types.ModuleType("tensorrt_llm._tensorrt_engine")
            self.engine_module.LLM = LLM

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
        logprobs = lps if self.float_logprobs else [{t: Logprob(lp, 1)} for t, lp in zip(out, lps)]
        return CompletionOutput(0, TOK.decode(out), out, sum(lps), logprobs, reason, stop_reason)

    def install(self, monkeypatch: pytest.MonkeyPatch) -> "FakeTRTLLM":
        monkeypatch.setitem(sys.modules, "tensorrt_llm", self.module)
        if self.engine_module is not None:
            monkeypatch.setitem(sys.modules, "tensorrt_llm._tensorrt_engine", self.engine_module)
        else:
            monkeypatch.setitem(sys.modules, "tensorrt_llm._tensorrt_engine", None)  # import fails
        return self


# ---------------------------------------------------------------------------------------------
# Helpers


def _cfg(*overrides: str):
    return load_config(CONFIGS / "tiny.yaml", ["generation.engine=trtllm", *overrides])


def _hf_model_dir(root: Path, name: str = "M1") -> Path:
    """A model directory whose weights are an HF export (no megatron/): used as it is."""
    model_dir = root / "models" / name
    (model_dir / "hf").mkdir(parents=True)
    (model_dir / "hf" / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    (model_dir / "hf" / "model.safetensors").write_bytes(b"weights")
    (root / "models" / f"{name}.manifest.json").write_text(json.dumps({"stage": "train_dpo", "run": 1}))
    return model_dir


def _engine(fake: FakeTRTLLM, tmp_path: Path, *overrides: str, tokenizer: Any = TOK):
    from megatron_selfreward.generation.trtllm_engine import TRTLLMEngine

    model_dir = tmp_path / "models" / "M1" if (tmp_path / "models" / "M1").exists() else _hf_model_dir(tmp_path)
    return TRTLLMEngine(_cfg(*overrides), model_dir, tokenizer=tokenizer)


def _request(rid: str = "r", text: str = "hi", **params: Any) -> GenerationRequest:
    return GenerationRequest(rid, TOK.encode(text), SamplingParams(**params))


# ---------------------------------------------------------------------------------------------
# Import error


def test_selecting_trtllm_without_tensorrt_llm_is_a_clear_error(monkeypatch, tmp_path):
    from megatron_selfreward.policy import load_policy

    monkeypatch.setitem(sys.modules, "tensorrt_llm", None)  # `import tensorrt_llm` raises ImportError
    with pytest.raises(RuntimeError) as err:
        load_policy(_cfg(), tmp_path)  # refuses before looking at the model directory
    message = str(err.value)
    assert "generation.engine" in message and "TensorRT-LLM cannot be imported" in message
    assert "NVIDIA's package index" in message and "README" in message
    assert "generation.engine=megatron" in message


# ---------------------------------------------------------------------------------------------
# Request -> SamplingParams


def test_sampling_request_maps_to_one_trtllm_request_per_sample(monkeypatch, tmp_path):
    fake = FakeTRTLLM().install(monkeypatch)
    engine = _engine(fake, tmp_path, "pipeline.seed=7")
    request = _request("q1", "hello", temperature=0.7, top_p=0.9, top_k=40, max_new_tokens=12, n=3,
                       stop_token_ids=[5])
    (result,) = engine.generate([request])
    ((inputs, params),) = fake.generate_calls
    assert inputs == [TOK.encode("hello")] * 3 and len(result.samples) == 3
    for j, sp in enumerate(params):
        assert (sp.n, sp.max_tokens, sp.temperature, sp.top_p, sp.top_k) == (1, 12, 0.7, 0.9, 40)
        assert sp.seed == sample_seed(None, j, engine_seed=7, request_id="q1")
        assert (sp.end_id, sp.pad_id) == (-1, -1)  # EOS comes back as a stop token, kept with its log-prob
        assert sp.stop_token_ids == [EOS, 5] and sp.include_stop_str_in_output
        assert sp.logprobs == 1 and sp.logprobs_mode == "raw_logprobs"
        assert sp.stop is None
    assert len({sp.seed for sp in params}) == 3


def test_explicit_seed_gives_the_same_samples_seeds_whatever_the_request_id(monkeypatch, tmp_path):
    fake = FakeTRTLLM().install(monkeypatch)
    engine = _engine(fake, tmp_path)
    engine.generate([_request("a", n=2, seed=11), _request("b", "other", n=2, seed=11)])
    seeds = [sp.seed for sp in fake.generate_calls[0][1]]
    assert seeds[:2] == seeds[2:] == [sample_seed(11, 0, engine_seed=0, request_id="x"),
                                      sample_seed(11, 1, engine_seed=0, request_id="x")]


def test_greedy_and_off_switches(monkeypatch, tmp_path):
    fake = FakeTRTLLM().install(monkeypatch)
    engine = _engine(fake, tmp_path)
    engine.generate([_request("g", temperature=0.0, top_p=0.5, top_k=3),
                     _request("s", temperature=1.0, top_p=1.0, top_k=0)])
    greedy, sampled = fake.generate_calls[0][1]
    assert (greedy.top_k, greedy.top_p, greedy.temperature) == (1, None, None)  # the LLM API's greedy
    # top_k 0 (off) -> None; top_p 1.0 is passed, since top_p=None would mean greedy there
    assert (sampled.top_k, sampled.top_p, sampled.temperature) == (None, 1.0, 1.0)


def test_max_tokens_is_clamped_to_the_context_and_bad_prompts_are_refused(monkeypatch, tmp_path):
    fake = FakeTRTLLM().install(monkeypatch)
    engine = _engine(fake, tmp_path, "model.max_seq_len=64")
    engine.generate([GenerationRequest("long", list(range(60)), SamplingParams(max_new_tokens=16))])
    assert fake.generate_calls[0][1][0].max_tokens == 4
    with pytest.raises(ValueError, match="max_seq_len"):
        engine.generate([GenerationRequest("x", [1] * 64, SamplingParams())])
    with pytest.raises(ValueError, match="vocabulary"):
        engine.generate([GenerationRequest("x", [1, 600], SamplingParams())])


def test_allowed_token_ids_are_refused_not_ignored(monkeypatch, tmp_path):
    fake = FakeTRTLLM().install(monkeypatch)
    engine = _engine(fake, tmp_path)
    with pytest.raises(ValueError, match="judge.force_score: false"):
        engine.generate([GenerationRequest("x", [1, 2], SamplingParams(allowed_token_ids=[3, 4]))])
    assert fake.generate_calls == []


def test_trtllm_gets_token_ids_only_and_stop_strings_stay_ours(monkeypatch, tmp_path):
    fake = FakeTRTLLM().install(monkeypatch)
    model_dir = _hf_model_dir(tmp_path)
    (model_dir / "hf" / "tokenizer_config.json").write_text("{}")
    engine = _engine(fake, tmp_path)
    assert fake.builds[0]["skip_tokenizer_init"] and fake.builds[0]["tokenizer"] is None
    engine.generate([_request(stop_strings=["\n\n"])])
    # with end_id given, the LLM API would not tokenise `stop`: it is never sent
    assert fake.generate_calls[0][1][0].stop is None


def test_an_older_release_gets_random_seed_and_no_logprobs_mode(monkeypatch, tmp_path):
    fake = FakeTRTLLM(old_params=True).install(monkeypatch)
    engine = _engine(fake, tmp_path)
    engine.generate([_request("r", seed=3)])
    (sp,) = fake.generate_calls[0][1]
    assert sp.random_seed == sample_seed(3, 0, engine_seed=0, request_id="r")
    assert engine.stats["logprobs_mode"] == "trtllm_default"


# ---------------------------------------------------------------------------------------------
# Outputs -> Samples


def test_finish_reasons_tokens_logprobs_and_text(monkeypatch, tmp_path):
    fake = FakeTRTLLM().install(monkeypatch)
    engine = _engine(fake, tmp_path)
    scripts = {"eos": TOK.encode("ok") + [EOS, 7], "stop": TOK.encode("no") + [5, 9], "len": TOK.encode("abcdefgh")}
    fake.script = lambda prompt, sp: scripts[TOK.decode(prompt)]
    eos, stop, length = engine.generate([_request("1", "eos"), _request("2", "stop", stop_token_ids=[5]),
                                         _request("3", "len", max_new_tokens=4)])
    (s,) = eos.samples
    assert (s.finish_reason, s.token_ids, s.text) == ("eos", TOK.encode("ok") + [EOS], "ok")
    assert s.logprobs == [-0.25, -0.5, -0.75]  # one per token, the ending one included
    (s,) = stop.samples
    assert (s.finish_reason, s.token_ids, s.text) == ("stop", TOK.encode("no") + [5], "no")
    (s,) = length.samples
    assert (s.finish_reason, s.token_ids, s.text) == ("length", TOK.encode("abcd"), "abcd")
    stats = engine.stats
    assert (stats["requests"], stats["samples"], stats["decode_tokens"]) == (3, 3, 10)
    assert stats["prefill_tokens"] == len(TOK.encode("eosstoplen")) and stats["logprobs_missing"] == 0
    assert stats["decode_time_s"] >= 0 and "output_tokens_per_s" in stats
    engine.reset_stats()
    assert engine.stats["samples"] == 0


def test_stop_strings_cut_tokens_and_text_like_the_megatron_engine(monkeypatch, tmp_path):
    fake = FakeTRTLLM().install(monkeypatch)
    engine = _engine(fake, tmp_path)
    # TensorRT-LLM is not told about stop strings, so it decodes on: the engine finds where the
    # string completes, keeps that token, and cuts the text before it.
    fake.script = lambda prompt, sp: TOK.encode("Score: 4\nmore text here")
    (res,) = engine.generate([_request(stop_strings=["\nmore"], max_new_tokens=40)])
    (s,) = res.samples
    assert s.finish_reason == "stop" and s.text == "Score: 4"
    assert s.token_ids == TOK.encode("Score: 4\nmore") and len(s.logprobs) == len(s.token_ids)


def test_stop_reason_string_from_trtllm_is_a_stop(monkeypatch, tmp_path):
    from megatron_selfreward.generation.trtllm_engine import TRTLLMEngine

    engine = _engine(FakeTRTLLM().install(monkeypatch), tmp_path)
    out = CompletionOutput(0, "x END", TOK.encode("x END"), None,
                           [{t: Logprob(-1.0)} for t in TOK.encode("x END")], "stop", "END")
    sample = TRTLLMEngine._to_sample(engine, out, SamplingParams(stop_strings=["END"]), 32)
    assert (sample.finish_reason, sample.text, sample.token_ids) == ("stop", "x ", TOK.encode("x END"))


def test_float_logprobs_and_missing_ones(monkeypatch, tmp_path):
    fake = FakeTRTLLM(float_logprobs=True).install(monkeypatch)
    engine = _engine(fake, tmp_path)
    (res,) = engine.generate([_request()])
    assert res.samples[0].logprobs == [-0.25, -0.5, -0.75]
    # the PyTorch backend's top-k dicts need not hold the sampled token
    out = CompletionOutput(0, "ab", TOK.encode("ab"), None, [{999: Logprob(-0.1)}], "length", None)
    sample = engine._to_sample(out, SamplingParams(max_new_tokens=2), 2)
    assert math.isnan(sample.logprobs[0]) and math.isnan(sample.logprobs[1])
    assert engine.stats["logprobs_missing"] == 2


def test_a_cancelled_request_fails_loudly(monkeypatch, tmp_path):
    engine = _engine(FakeTRTLLM().install(monkeypatch), tmp_path)
    out = CompletionOutput(0, "", [1], None, [], "cancelled", None)
    with pytest.raises(RuntimeError, match="cancelled"):
        engine._to_sample(out, SamplingParams(), 8)


# ---------------------------------------------------------------------------------------------
# Build once per model, reuse


def test_engine_is_built_once_and_reused_while_it_matches(monkeypatch, tmp_path):
    from megatron_selfreward.convert.trtllm_export import ENGINE_STAMP_FILE

    fake = FakeTRTLLM().install(monkeypatch)
    model_dir = _hf_model_dir(tmp_path)
    first = _engine(fake, tmp_path, "parallel.tensor_model_parallel_size=2")
    (build,) = fake.builds
    assert build["model"] == str(model_dir / "hf") and build["tensor_parallel_size"] == 2
    assert build["dtype"] == "bfloat16" and build["pipeline_parallel_size"] == 1
    bc = build["build_config"].kwargs
    assert bc == {"max_batch_size": 8, "max_input_len": 3071, "max_seq_len": 3072}
    assert (model_dir / "trtllm" / "fake_engine.json").is_file()
    assert (model_dir / "trtllm" / ENGINE_STAMP_FILE).is_file()
    assert first.stats["engine_built"] == 1
    first.generate([_request()])
    first.generate([_request()])
    assert len(fake.builds) == 1 and len(fake.llms) == 1  # two generate calls, one engine

    first.close()
    assert fake.llms[0].closed
    again = _engine(fake, tmp_path, "parallel.tensor_model_parallel_size=2")
    assert len(fake.builds) == 1 and again.stats["engine_built"] == 0
    loaded = fake.llms[-1]
    assert loaded.init["model"] == str(model_dir / "trtllm") and loaded.init["tensor_parallel_size"] == 2

    _engine(fake, tmp_path, "parallel.tensor_model_parallel_size=1")  # another layout: rebuilt
    assert len(fake.builds) == 2
    (tmp_path / "models" / "M1.manifest.json").write_text(json.dumps({"stage": "train_dpo", "run": 2}))
    _engine(fake, tmp_path, "parallel.tensor_model_parallel_size=1")  # new weights: rebuilt
    assert len(fake.builds) == 3
    _engine(fake, tmp_path, "parallel.tensor_model_parallel_size=1")
    assert len(fake.builds) == 3


def test_load_weights_switches_to_the_next_model(monkeypatch, tmp_path):
    fake = FakeTRTLLM().install(monkeypatch)
    engine = _engine(fake, tmp_path)
    m2 = _hf_model_dir(tmp_path, "M2")
    engine.load_weights(m2)
    assert fake.llms[0].closed and fake.builds[-1]["model"] == str(m2 / "hf")
    assert engine.model_dir == m2
    with pytest.raises(TypeError, match="model directory"):
        engine.load_weights(object())


def test_newer_releases_build_with_the_engine_llm_class(monkeypatch, tmp_path):
    fake = FakeTRTLLM(engine_module=True).install(monkeypatch)
    engine = _engine(fake, tmp_path)
    assert len(fake.builds) == 1
    engine.generate([_request()])


def test_an_interrupted_build_is_redone(monkeypatch, tmp_path):
    from megatron_selfreward.convert.trtllm_export import ENGINE_STAMP_FILE

    fake = FakeTRTLLM().install(monkeypatch)
    model_dir = _hf_model_dir(tmp_path)
    _engine(fake, tmp_path)
    (model_dir / "trtllm" / ENGINE_STAMP_FILE).unlink()  # as if killed before the stamp
    _engine(fake, tmp_path)
    assert len(fake.builds) == 2


# ---------------------------------------------------------------------------------------------
# The policy: no Megatron model, HF exported from megatron/ first


def test_policy_exports_hf_from_megatron_and_never_builds_the_model(monkeypatch, tmp_path):
    import megatron_selfreward.megatron.model as model_module
    from megatron_selfreward.convert.trtllm_export import EXPORT_STAMP_FILE
    from megatron_selfreward.generation.trtllm_engine import TRTLLMEngine
    from megatron_selfreward.policy import load_policy
    from megatron_selfreward.stages.import_model import run_import_model

    run_dir = tmp_path / "run"
    m0 = run_import_model(load_config(CONFIGS / "tiny.yaml", [f"pipeline.run_dir={run_dir}"]), run_dir)
    assert (m0 / "megatron").is_dir() and not (m0 / "hf").exists()

    fake = FakeTRTLLM().install(monkeypatch)
    real_build = model_module.build_model

    def build_model(cfg, meta=False, **kwargs):
        # the HF export reads megatron's sharded layout from a meta-device model (no weights)
        if not meta:
            pytest.fail("built the Megatron model")
        return real_build(cfg, meta=True, **kwargs)

    monkeypatch.setattr(model_module, "build_model", build_model)
    cfg = _cfg(f"pipeline.run_dir={run_dir}")
    policy = load_policy(cfg, m0)
    assert policy.model is None and isinstance(policy.engine, TRTLLMEngine)
    assert (m0 / "hf" / "config.json").is_file() and (m0 / "hf" / EXPORT_STAMP_FILE).is_file()
    assert json.loads((m0 / "hf" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert fake.builds[0]["model"] == str(m0 / "hf")
    assert fake.builds[0]["skip_tokenizer_init"]  # a random-init test model has no HF tokenizer
    (res,) = policy.engine.generate([_request()])
    assert res.samples[0].text == "ab" and res.samples[0].finish_reason == "eos"
    policy.close()
    assert fake.llms[0].closed

    mtime = (m0 / "hf" / "config.json").stat().st_mtime_ns
    load_policy(cfg, m0)  # second load: neither exported nor built again
    assert (m0 / "hf" / "config.json").stat().st_mtime_ns == mtime and len(fake.builds) == 1


def test_a_foreign_hf_dir_beside_megatron_is_not_overwritten(monkeypatch, tmp_path):
    from megatron_selfreward.convert.trtllm_export import prepare_model_dir

    model_dir = tmp_path / "M3"
    (model_dir / "megatron").mkdir(parents=True)
    (model_dir / "megatron" / "metadata.json").write_text("{}")
    (model_dir / "hf").mkdir()
    (model_dir / "hf" / "config.json").write_text("{}")
    with pytest.raises(FileExistsError, match="not exported from"):
        prepare_model_dir(_cfg(), model_dir)
    assert (model_dir / "hf" / "config.json").read_text() == "{}"


def test_build_spec_default_is_unchanged_for_standalone_exports():
    from megatron_selfreward.convert.trtllm_export import build_spec

    cfg = _cfg("generation.max_new_tokens=64", "judge.max_new_tokens=96", "model.max_seq_len=256")
    assert build_spec(cfg, "h", "e").max_input_len == 256 - 96
    assert build_spec(cfg, "h", "e", max_input_len=255).max_input_len == 255
    with pytest.raises(ValueError, match="max_input_len"):
        build_spec(cfg, "h", "e", max_input_len=256)
    assert dataclasses.asdict(build_spec(cfg, "h", "e"))["dtype"] == "bfloat16"


def test_build_tool_model_dir_mode_builds_what_the_engine_then_reuses(monkeypatch, tmp_path, capsys):
    from megatron_selfreward.convert.trtllm_export import main

    fake = FakeTRTLLM().install(monkeypatch)
    model_dir = _hf_model_dir(tmp_path)
    args = ["--config", str(CONFIGS / "tiny.yaml"), "--model-dir", str(model_dir), "generation.engine=trtllm"]
    assert main(args) == 0 and json.loads(capsys.readouterr().out)["built"] is True
    assert fake.llms[0].closed  # the tool releases what it built
    assert main(args) == 0 and json.loads(capsys.readouterr().out)["built"] is False
    engine = _engine(fake, tmp_path)
    assert len(fake.builds) == 1 and engine.stats["engine_built"] == 0


def test_workers_loading_the_same_model_build_it_once(monkeypatch, tmp_path):
    import threading
    import time

    fake = FakeTRTLLM().install(monkeypatch)
    _hf_model_dir(tmp_path)
    real_save = fake.module.LLM.save

    def slow_save(self, engine_dir):  # a build takes a while: the other worker must wait for it
        time.sleep(0.3)
        real_save(self, engine_dir)

    monkeypatch.setattr(fake.module.LLM, "save", slow_save)
    engines, errors = [], []

    def worker() -> None:
        try:
            engines.append(_engine(fake, tmp_path))
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(engines) == 2
    assert len(fake.builds) == 1 and sorted(e.stats["engine_built"] for e in engines) == [0, 1]
