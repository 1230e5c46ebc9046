"""The TensorRT-LLM engine against TensorRT-LLM's API: the real module where it runs, else a stand-in.

Two kinds of tests:
- API tests (fixture `trtllm`): create engines on both backends, generate, and check what comes
  back. Where the real `tensorrt_llm` imports and CUDA is available they run against it (and are
  marked `gpu`), on a tiny random Llama (head size 64) imported with `import_base_model` and
  exported to `hf/` by the engine itself; elsewhere against the stand-in (tests/trtllm_standin.py),
  which enforces the argument checks of the real API (each names the upstream function it
  mirrors), so a call the real API would reject fails here as well.
- Mapping tests (fixture `standin`): our request -> SamplingParams and result -> Sample mapping,
  build-once/reuse, the release differences. Their "model" is a script, so they always use the
  stand-in (injected into sys.modules, hiding a real installation).

On a GPU cluster (TensorRT-LLM >= 1.0 installed, one GPU free; e.g. inside NVIDIA's TensorRT-LLM
container with this repository mounted and `pip install --no-deps -e .`):

    srun -N1 --gpus-per-node=1 --time=00:30:00 python -m pytest tests/unit/test_trtllm_engine.py -m gpu -v

runs the API tests against the real module (`-m gpu` leaves the stand-in-only tests out; drop it
to run both kinds). The TensorRT-backend test is skipped on releases without that backend.
SELFREWARD_TRTLLM_STANDIN=1 forces the stand-in everywhere.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from megatron_selfreward.config import load_config
from megatron_selfreward.generation.engine import GenerationRequest, SamplingParams, sample_seed
from megatron_selfreward.tokenizer import ByteTokenizer
from tests.conftest import CONFIGS
from tests.trtllm_standin import CompletionOutput, FakeTRTLLM, Logprob

TOK = ByteTokenizer(512)
EOS = TOK.eos_token_id


def _real_trtllm_available() -> bool:
    if os.environ.get("SELFREWARD_TRTLLM_STANDIN") == "1" or not torch.cuda.is_available():
        return False
    try:
        return importlib.util.find_spec("tensorrt_llm") is not None
    except ValueError:  # a stand-in without __spec__ left in sys.modules
        return False


REAL = _real_trtllm_available()
# API tests need a GPU exactly when they run against the real module.
api_test = pytest.mark.gpu if REAL else (lambda test: test)
# A real TensorRT-LLM cannot run head size 16 (tiny.yaml); the same tiny Llama with head size 64.
REAL_MODEL = ["model.hidden_size=256", "model.num_attention_heads=4", "model.num_query_groups=2",
              "model.ffn_hidden_size=512"]


def default_script(prompt: list[int], sp: Any) -> list[int]:
    """What the stand-in's "model" says: 'ab' then EOS, repeated."""
    return TOK.encode("ab") + [EOS]


def _standin(release: str = "1.3", **kwargs: Any) -> FakeTRTLLM:
    fake = FakeTRTLLM(release, **kwargs)
    fake.script = default_script
    return fake


@dataclasses.dataclass
class Api:
    """The `tensorrt_llm` the API tests run against."""

    real: bool
    fake: FakeTRTLLM | None
    overrides: list[str]
    engines: list[Any] = dataclasses.field(default_factory=list)

    def has_tensorrt_backend(self) -> bool:
        if self.fake is not None:
            return self.fake.release.tensorrt_backend
        try:
            import tensorrt_llm._tensorrt_engine  # noqa: F401
        except Exception:  # noqa: BLE001 - absent or refusing: either way no such backend
            return False
        return True


@pytest.fixture
def trtllm(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch):
    """The real tensorrt_llm (REAL) or a stand-in release (indirect param, default 1.3)."""
    release = getattr(request, "param", "1.3")
    if REAL:
        if release != "1.3":
            pytest.skip("one run against the installed release is enough")
        api = Api(True, None, REAL_MODEL)
    else:
        api = Api(False, _standin(release).install(monkeypatch), [])
    yield api
    for engine in api.engines:
        engine.close()


@pytest.fixture
def standin(monkeypatch: pytest.MonkeyPatch) -> FakeTRTLLM:
    return _standin().install(monkeypatch)


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


def _engine(tmp_path: Path, *overrides: str, tokenizer: Any = TOK, **kwargs: Any):
    from megatron_selfreward.generation.trtllm_engine import TRTLLMEngine

    model_dir = tmp_path / "models" / "M1" if (tmp_path / "models" / "M1").exists() else _hf_model_dir(tmp_path)
    return TRTLLMEngine(_cfg(*overrides), model_dir, tokenizer=tokenizer, **kwargs)


def _model_dir(api: Api, root: Path) -> Path:
    """A model directory the API tests load: a real tiny Llama for the real module."""
    if not api.real:
        return _hf_model_dir(root)
    from megatron_selfreward.pipeline.run import import_base_model

    run_dir = root / "run"
    return import_base_model(_cfg(f"pipeline.run_dir={run_dir}", *api.overrides))


def _api_engine(api: Api, model_dir: Path, *overrides: str, **kwargs: Any):
    from megatron_selfreward.generation.trtllm_engine import TRTLLMEngine

    engine = TRTLLMEngine(_cfg(*api.overrides, *overrides), model_dir, tokenizer=TOK, **kwargs)
    api.engines.append(engine)
    return engine


def _request(rid: str = "r", text: str = "hi", **params: Any) -> GenerationRequest:
    return GenerationRequest(rid, TOK.encode(text), SamplingParams(**params))


def _check_samples(result: Any, n: int, *, logprobs: bool) -> None:
    """What any backend must return: n samples, one log-prob slot per token (finite <= 0 when
    asked for, NaN when not)."""
    assert len(result.samples) == n
    for sample in result.samples:
        assert sample.token_ids and all(isinstance(t, int) for t in sample.token_ids)
        assert sample.finish_reason in ("eos", "stop", "length")
        assert len(sample.logprobs) == len(sample.token_ids)
        if logprobs:
            assert all(math.isfinite(lp) and lp <= 0 for lp in sample.logprobs)
        else:
            assert all(math.isnan(lp) for lp in sample.logprobs)


# ---------------------------------------------------------------------------------------------
# API tests: the real module where it runs, else the stand-in


@api_test
@pytest.mark.parametrize("trtllm", ["1.0", "1.3"], indirect=True)
def test_default_backend_is_pytorch_and_loads_the_hf_export_without_a_build(trtllm, tmp_path):
    model_dir = _model_dir(trtllm, tmp_path)
    engine = _api_engine(trtllm, model_dir)
    (result,) = engine.generate([_request("q", "hello", max_new_tokens=4, n=2)])
    _check_samples(result, 2, logprobs=False)
    stats = engine.stats
    assert stats["trtllm_backend"] == "pytorch" and stats["engine_built"] == 0
    assert not (model_dir / "trtllm").exists()  # nothing built, nothing saved
    if trtllm.fake is not None:
        (load,) = trtllm.fake.loads
        assert load["backend"] == "pytorch" and load["model"] == str(model_dir / "hf")
        assert "build_config" not in load and trtllm.fake.builds == []
        assert load["skip_tokenizer_init"] and load["max_seq_len"] == 3072 and load["max_batch_size"] == 8


@api_test
def test_log_probs_only_where_a_request_asks_pytorch_backend(trtllm, tmp_path):
    engine = _api_engine(trtllm, _model_dir(trtllm, tmp_path))
    # greedy where log-probs are asked for: the sampled token is then the top-1 token, whose
    # log-prob every supported release returns
    plain, scored = engine.generate([_request("plain", max_new_tokens=4),
                                     _request("scored", max_new_tokens=4, temperature=0.0, logprobs=True)])
    _check_samples(plain, 1, logprobs=False)
    _check_samples(scored, 1, logprobs=True)
    assert engine.stats["logprobs_missing"] == 0 and engine.stats["logprobs_mode"] in ("raw", "trtllm_default")
    if trtllm.fake is not None:
        plain_sp, scored_sp = trtllm.fake.generate_calls[0][1]
        assert plain_sp.logprobs is None
        assert scored_sp.logprobs == 1 and scored_sp.logprobs_mode == "raw"  # LogprobMode.RAW


@api_test
@pytest.mark.parametrize("trtllm", ["1.0", "1.3"], indirect=True)
def test_tensorrt_backend_returns_log_probs_only_from_an_llm_created_for_them(trtllm, tmp_path):
    if not trtllm.has_tensorrt_backend():
        pytest.skip("this TensorRT-LLM has no TensorRT engine backend")
    model_dir = _model_dir(trtllm, tmp_path)
    engine = _api_engine(trtllm, model_dir, "generation.trtllm_backend=tensorrt")
    (result,) = engine.generate([_request(max_new_tokens=4)])
    _check_samples(result, 1, logprobs=False)
    with pytest.raises(ValueError, match="logprobs=True"):  # refused before TensorRT-LLM would
        engine.generate([_request(max_new_tokens=4, logprobs=True)])
    engine.close()

    scoring = _api_engine(trtllm, model_dir, "generation.trtllm_backend=tensorrt", logprobs=True)
    assert scoring.stats["engine_built"] == 1  # another engine: this one keeps generation logits
    assert scoring.stats["logprobs_mode"] == "sampling"  # temperature applied, whatever the mode
    (result,) = scoring.generate([_request(max_new_tokens=4, temperature=0.0, logprobs=True)])
    _check_samples(result, 1, logprobs=True)
    if trtllm.fake is not None:
        first, second = trtllm.fake.builds
        assert "gather_generation_logits" not in first and not first["build_config"].gather_generation_logits
        assert second["gather_generation_logits"] and second["build_config"].gather_generation_logits


@api_test
def test_the_pytorch_llm_refuses_tensorrt_only_arguments(trtllm, tmp_path):
    # The stand-in's check is upstream's: the same call fails against the real module.
    from megatron_selfreward.generation.trtllm_api import build_config_class, pytorch_llm_class

    model_dir = _model_dir(trtllm, tmp_path)
    if trtllm.real:
        from megatron_selfreward.generation.trtllm_build import prepare_model_dir

        prepare_model_dir(_cfg(*trtllm.overrides), model_dir)
    with pytest.raises(ValueError, match=None if trtllm.real else "specific to TensorRT backend"):
        pytorch_llm_class()(model=str(model_dir / "hf"), skip_tokenizer_init=True,
                            build_config=build_config_class()(max_seq_len=64))


# ---------------------------------------------------------------------------------------------
# Supported releases


def test_selecting_trtllm_without_tensorrt_llm_is_a_clear_error(monkeypatch, tmp_path):
    from megatron_selfreward.policy import load_policy

    monkeypatch.setitem(sys.modules, "tensorrt_llm", None)  # `import tensorrt_llm` raises ImportError
    with pytest.raises(RuntimeError) as err:
        load_policy(_cfg(), tmp_path)  # refuses before looking at the model directory
    message = str(err.value)
    assert "generation.engine" in message and "TensorRT-LLM cannot be imported" in message
    assert "NVIDIA's package index" in message and "README" in message
    assert "generation.engine=megatron" in message


def test_a_release_outside_the_supported_range_is_refused_with_what_to_install(monkeypatch, tmp_path):
    from megatron_selfreward.generation.trtllm_api import SUPPORTED_TRTLLM

    fake = _standin("0.21").install(monkeypatch)
    with pytest.raises(RuntimeError) as err:
        _engine(tmp_path)
    message = str(err.value)
    assert "TensorRT-LLM 0.21.0 is installed" in message and f"TensorRT-LLM {SUPPORTED_TRTLLM} is supported" in message
    assert f"pip install 'tensorrt-llm{SUPPORTED_TRTLLM}'" in message and "generation.engine=megatron" in message
    assert fake.loads == [] and not (tmp_path / "models" / "M1" / "trtllm").exists()  # refused first

    monkeypatch.setattr(fake.module, "__version__", "1.0.0rc4")  # a 1.0 pre-release is not 1.0
    with pytest.raises(RuntimeError, match="1.0.0rc4 is installed"):
        _engine(tmp_path)


def test_release_1_0_has_no_logprobs_mode_and_a_top_level_build_config(monkeypatch, tmp_path):
    fake = _standin("1.0").install(monkeypatch)
    engine = _engine(tmp_path)
    engine.generate([_request("r", seed=3, logprobs=True)])
    (sp,) = fake.generate_calls[0][1]
    assert sp.seed == sample_seed(3, 0, engine_seed=0, request_id="r") and sp.logprobs == 1
    assert not hasattr(sp, "logprobs_mode") and engine.stats["logprobs_mode"] == "trtllm_default"
    assert engine.stats["trtllm_version"] == "1.0.0"


def test_a_release_without_the_tensorrt_backend_says_to_use_the_pytorch_one(monkeypatch, tmp_path):
    fake = _standin("main").install(monkeypatch)
    with pytest.raises(RuntimeError, match="generation.trtllm_backend=pytorch"):
        _engine(tmp_path, "generation.trtllm_backend=tensorrt")
    engine = _engine(tmp_path)  # the default backend is all such a release has
    engine.generate([_request()])
    assert [load["backend"] for load in fake.loads] == ["pytorch"]


def test_the_standin_refuses_what_upstream_refuses(standin, tmp_path):
    """The checks our engine relies on the stand-in to make, one by one."""
    SP = standin.SamplingParams
    with pytest.raises(ValueError):  # SamplingParams._validate / LogprobMode
        SP(logprobs=1, logprobs_mode="raw_logprobs")
    with pytest.raises(ValueError, match="top_p"):
        SP(top_p=1.5)
    with pytest.raises(ValueError, match="Greedy decoding"):
        SP(n=2, top_k=1)
    hf_dir = _hf_model_dir(tmp_path) / "hf"
    trt = standin.TrtLLM(model=str(hf_dir), skip_tokenizer_init=True)
    with pytest.raises(ValueError, match="gather_generation_logits=True"):  # BaseLLM._check_arguments
        trt.generate([[1, 2]], SP(end_id=-1, logprobs=1))
    with pytest.raises(ValueError, match="end_id"):  # BaseLLM._prepare_sampling_params
        trt.generate([[1, 2]], SP())
    with pytest.raises(ValueError, match="max_seq_len"):
        standin.TrtLLM(model=str(hf_dir), skip_tokenizer_init=True, build_config=standin.modules[
            "tensorrt_llm.llmapi"].BuildConfig(max_seq_len=8)).generate([[1] * 6], SP(end_id=-1, max_tokens=4))
    with pytest.raises(ValueError, match="invalid argument"):  # BaseLLM.__init__
        standin.TorchLLM(model=str(hf_dir), no_such_argument=1)
    torch_llm = standin.TorchLLM(model=str(hf_dir), skip_tokenizer_init=True)
    assert torch_llm.generate([[1, 2]], SP(end_id=-1, logprobs=1))  # no creation flag needed
    with pytest.raises(ValueError, match="max_num_tokens"):
        torch_llm.generate([[1] * 8193], SP(end_id=-1))


# ---------------------------------------------------------------------------------------------
# Request -> SamplingParams


def test_sampling_request_maps_to_one_trtllm_request_per_sample(standin, tmp_path):
    engine = _engine(tmp_path, "pipeline.seed=7")
    request = _request("q1", "hello", temperature=0.7, top_p=0.9, top_k=40, max_new_tokens=12, n=3,
                       stop_token_ids=[5])
    (result,) = engine.generate([request])
    ((inputs, params),) = standin.generate_calls
    assert inputs == [TOK.encode("hello")] * 3 and len(result.samples) == 3
    for j, sp in enumerate(params):
        assert (sp.n, sp.max_tokens, sp.temperature, sp.top_p, sp.top_k) == (1, 12, 0.7, 0.9, 40)
        assert sp.seed == sample_seed(None, j, engine_seed=7, request_id="q1")
        assert (sp.end_id, sp.pad_id) == (-1, -1)  # EOS comes back as a stop token, kept with its log-prob
        assert sp.stop_token_ids == [EOS, 5] and sp.include_stop_str_in_output
        assert sp.logprobs is None  # not asked for
        assert sp.stop is None
    assert len({sp.seed for sp in params}) == 3


def test_explicit_seed_gives_the_same_samples_seeds_whatever_the_request_id(standin, tmp_path):
    engine = _engine(tmp_path)
    engine.generate([_request("a", n=2, seed=11), _request("b", "other", n=2, seed=11)])
    seeds = [sp.seed for sp in standin.generate_calls[0][1]]
    assert seeds[:2] == seeds[2:] == [sample_seed(11, 0, engine_seed=0, request_id="x"),
                                      sample_seed(11, 1, engine_seed=0, request_id="x")]


def test_greedy_and_off_switches(standin, tmp_path):
    engine = _engine(tmp_path)
    engine.generate([_request("g", temperature=0.0, top_p=0.5, top_k=3),
                     _request("s", temperature=1.0, top_p=1.0, top_k=0)])
    greedy, sampled = standin.generate_calls[0][1]
    assert (greedy.top_k, greedy.top_p, greedy.temperature) == (1, None, None)  # the LLM API's greedy
    # top_k 0 (off) -> None; top_p 1.0 is passed, since top_p=None would mean greedy there
    assert (sampled.top_k, sampled.top_p, sampled.temperature) == (None, 1.0, 1.0)


def test_max_tokens_is_clamped_to_the_context_and_bad_prompts_are_refused(standin, tmp_path):
    engine = _engine(tmp_path, "model.max_seq_len=64")
    engine.generate([GenerationRequest("long", list(range(60)), SamplingParams(max_new_tokens=16))])
    assert standin.generate_calls[0][1][0].max_tokens == 4
    with pytest.raises(ValueError, match="max_seq_len"):
        engine.generate([GenerationRequest("x", [1] * 64, SamplingParams())])
    with pytest.raises(ValueError, match="vocabulary"):
        engine.generate([GenerationRequest("x", [1, 600], SamplingParams())])


def test_allowed_token_ids_are_refused_not_ignored(standin, tmp_path):
    engine = _engine(tmp_path)
    with pytest.raises(ValueError, match="judge.force_score: false"):
        engine.generate([GenerationRequest("x", [1, 2], SamplingParams(allowed_token_ids=[3, 4]))])
    assert standin.generate_calls == []


def test_trtllm_gets_token_ids_only_and_stop_strings_stay_ours(standin, tmp_path):
    model_dir = _hf_model_dir(tmp_path)
    (model_dir / "hf" / "tokenizer_config.json").write_text("{}")
    engine = _engine(tmp_path)
    assert standin.loads[0]["skip_tokenizer_init"] and standin.loads[0]["tokenizer"] is None
    engine.generate([_request(stop_strings=["\n\n"])])
    # with end_id given, the LLM API would not tokenise `stop`: it is never sent
    assert standin.generate_calls[0][1][0].stop is None


# ---------------------------------------------------------------------------------------------
# Outputs -> Samples


def test_finish_reasons_tokens_logprobs_and_text(standin, tmp_path):
    engine = _engine(tmp_path)
    scripts = {"eos": TOK.encode("ok") + [EOS, 7], "stop": TOK.encode("no") + [5, 9], "len": TOK.encode("abcdefgh")}
    standin.script = lambda prompt, sp: scripts[TOK.decode(prompt)]
    eos, stop, length = engine.generate([_request("1", "eos", logprobs=True),
                                         _request("2", "stop", stop_token_ids=[5]),
                                         _request("3", "len", max_new_tokens=4)])
    (s,) = eos.samples
    assert (s.finish_reason, s.token_ids, s.text) == ("eos", TOK.encode("ok") + [EOS], "ok")
    assert s.logprobs == [-0.25, -0.5, -0.75]  # one per token, the ending one included
    (s,) = stop.samples
    assert (s.finish_reason, s.token_ids, s.text) == ("stop", TOK.encode("no") + [5], "no")
    assert len(s.logprobs) == 3 and all(math.isnan(lp) for lp in s.logprobs)  # none asked for
    (s,) = length.samples
    assert (s.finish_reason, s.token_ids, s.text) == ("length", TOK.encode("abcd"), "abcd")
    stats = engine.stats
    assert (stats["requests"], stats["samples"], stats["decode_tokens"]) == (3, 3, 10)
    assert stats["prefill_tokens"] == len(TOK.encode("eosstoplen")) and stats["logprobs_missing"] == 0
    assert stats["decode_time_s"] >= 0 and "output_tokens_per_s" in stats
    engine.reset_stats()
    assert engine.stats["samples"] == 0


def test_stop_strings_cut_tokens_and_text_like_the_megatron_engine(standin, tmp_path):
    engine = _engine(tmp_path)
    # TensorRT-LLM is not told about stop strings, so it decodes on: the engine finds where the
    # string completes, keeps that token, and cuts the text before it.
    standin.script = lambda prompt, sp: TOK.encode("Score: 4\nmore text here")
    (res,) = engine.generate([_request(stop_strings=["\nmore"], max_new_tokens=40, logprobs=True)])
    (s,) = res.samples
    assert s.finish_reason == "stop" and s.text == "Score: 4"
    assert s.token_ids == TOK.encode("Score: 4\nmore") and len(s.logprobs) == len(s.token_ids)
    assert all(math.isfinite(lp) for lp in s.logprobs)


def test_stop_reason_string_from_trtllm_is_a_stop(standin, tmp_path):
    from megatron_selfreward.generation.trtllm_engine import TRTLLMEngine

    engine = _engine(tmp_path)
    out = CompletionOutput(0, "x END", TOK.encode("x END"), None,
                           [{t: Logprob(-1.0)} for t in TOK.encode("x END")], "stop", "END")
    sample = TRTLLMEngine._to_sample(engine, out, SamplingParams(stop_strings=["END"]), 32)
    assert (sample.finish_reason, sample.text, sample.token_ids) == ("stop", "x ", TOK.encode("x END"))


def test_float_logprobs_and_missing_ones(monkeypatch, tmp_path):
    _standin(float_logprobs=True).install(monkeypatch)
    engine = _engine(tmp_path)
    (res,) = engine.generate([_request(logprobs=True)])
    assert res.samples[0].logprobs == [-0.25, -0.5, -0.75]
    # top-k dicts need not hold the sampled token
    out = CompletionOutput(0, "ab", TOK.encode("ab"), None, [{999: Logprob(-0.1)}], "length", None)
    sample = engine._to_sample(out, SamplingParams(max_new_tokens=2, logprobs=True), 2)
    assert math.isnan(sample.logprobs[0]) and math.isnan(sample.logprobs[1])
    assert engine.stats["logprobs_missing"] == 2


def test_a_cancelled_request_fails_loudly(standin, tmp_path):
    engine = _engine(tmp_path)
    out = CompletionOutput(0, "", [1], None, [], "cancelled", None)
    with pytest.raises(RuntimeError, match="cancelled"):
        engine._to_sample(out, SamplingParams(), 8)


# ---------------------------------------------------------------------------------------------
# Model directories: the PyTorch backend loads hf/; the TensorRT backend builds once, reuses

TRT = "generation.trtllm_backend=tensorrt"


def test_load_weights_switches_to_the_next_model(standin, tmp_path):
    engine = _engine(tmp_path)
    m2 = _hf_model_dir(tmp_path, "M2")
    engine.load_weights(m2)
    assert standin.llms[0].closed and standin.loads[-1]["model"] == str(m2 / "hf")
    assert engine.model_dir == m2 and standin.builds == []
    with pytest.raises(TypeError, match="model directory"):
        engine.load_weights(object())


def test_tensorrt_engine_is_built_once_and_reused_while_it_matches(standin, tmp_path):
    from megatron_selfreward.generation.trtllm_build import ENGINE_STAMP_FILE

    model_dir = _hf_model_dir(tmp_path)
    first = _engine(tmp_path, TRT, "parallel.tensor_model_parallel_size=2")
    (build,) = standin.builds
    assert build["model"] == str(model_dir / "hf") and build["tensor_parallel_size"] == 2
    assert build["dtype"] == "bfloat16" and build["pipeline_parallel_size"] == 1
    bc = build["build_config"].kwargs
    assert bc == {"max_batch_size": 8, "max_input_len": 3071, "max_seq_len": 3072}
    assert "build_config" in json.loads((model_dir / "trtllm" / "config.json").read_text())
    assert (model_dir / "trtllm" / ENGINE_STAMP_FILE).is_file()
    assert first.stats["engine_built"] == 1 and first.stats["trtllm_backend"] == "tensorrt"
    first.generate([_request()])
    first.generate([_request()])
    assert len(standin.builds) == 1 and len(standin.llms) == 1  # two generate calls, one engine

    first.close()
    assert standin.llms[0].closed
    again = _engine(tmp_path, TRT, "parallel.tensor_model_parallel_size=2")
    assert len(standin.builds) == 1 and again.stats["engine_built"] == 0
    loaded = standin.llms[-1]
    assert loaded.init["model"] == str(model_dir / "trtllm") and loaded.init["tensor_parallel_size"] == 2
    again.generate([_request()])  # the saved engine's limits are what _check_arguments reads

    _engine(tmp_path, TRT, "parallel.tensor_model_parallel_size=1")  # another layout: rebuilt
    assert len(standin.builds) == 2
    (tmp_path / "models" / "M1.manifest.json").write_text(json.dumps({"stage": "train_dpo", "run": 2}))
    _engine(tmp_path, TRT, "parallel.tensor_model_parallel_size=1")  # new weights: rebuilt
    assert len(standin.builds) == 3
    _engine(tmp_path, TRT, "parallel.tensor_model_parallel_size=1")
    assert len(standin.builds) == 3


def test_an_interrupted_build_is_redone(standin, tmp_path):
    from megatron_selfreward.generation.trtllm_build import ENGINE_STAMP_FILE

    model_dir = _hf_model_dir(tmp_path)
    _engine(tmp_path, TRT)
    (model_dir / "trtllm" / ENGINE_STAMP_FILE).unlink()  # as if killed before the stamp
    _engine(tmp_path, TRT)
    assert len(standin.builds) == 2


def test_policy_exports_hf_from_megatron_and_never_builds_the_model(standin, tmp_path, monkeypatch):
    import megatron_selfreward.megatron.model as model_module
    from megatron_selfreward.generation.trtllm_build import EXPORT_STAMP_FILE
    from megatron_selfreward.generation.trtllm_engine import TRTLLMEngine
    from megatron_selfreward.pipeline.run import import_base_model
    from megatron_selfreward.policy import load_policy

    run_dir = tmp_path / "run"
    m0 = import_base_model(load_config(CONFIGS / "tiny.yaml", [f"pipeline.run_dir={run_dir}"]))
    assert (m0 / "megatron").is_dir() and not (m0 / "hf").exists()

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
    assert standin.loads[0]["model"] == str(m0 / "hf") and standin.loads[0]["backend"] == "pytorch"
    assert standin.loads[0]["skip_tokenizer_init"]  # a random-init test model has no HF tokenizer
    (res,) = policy.engine.generate([_request()])
    assert res.samples[0].text == "ab" and res.samples[0].finish_reason == "eos"
    policy.close()
    assert standin.llms[0].closed

    mtime = (m0 / "hf" / "config.json").stat().st_mtime_ns
    load_policy(cfg, m0)  # second load: not exported again, and nothing is ever built
    assert (m0 / "hf" / "config.json").stat().st_mtime_ns == mtime
    assert len(standin.loads) == 2 and standin.builds == [] and not (m0 / "trtllm").exists()


def test_a_foreign_hf_dir_beside_megatron_is_not_overwritten(tmp_path):
    from megatron_selfreward.generation.trtllm_build import prepare_model_dir

    model_dir = tmp_path / "M3"
    (model_dir / "megatron").mkdir(parents=True)
    (model_dir / "megatron" / "metadata.json").write_text("{}")
    (model_dir / "hf").mkdir()
    (model_dir / "hf" / "config.json").write_text("{}")
    with pytest.raises(FileExistsError, match="not exported from"):
        prepare_model_dir(_cfg(), model_dir)
    assert (model_dir / "hf" / "config.json").read_text() == "{}"


def test_build_spec_default_is_unchanged_for_standalone_exports():
    from megatron_selfreward.generation.trtllm_build import build_spec

    cfg = _cfg("generation.max_new_tokens=64", "judge.max_new_tokens=96", "model.max_seq_len=256")
    assert build_spec(cfg, "h", "e").max_input_len == 256 - 96
    assert build_spec(cfg, "h", "e", max_input_len=255).max_input_len == 255
    with pytest.raises(ValueError, match="max_input_len"):
        build_spec(cfg, "h", "e", max_input_len=256)
    spec = dataclasses.asdict(build_spec(cfg, "h", "e"))
    assert spec["dtype"] == "bfloat16" and spec["gather_generation_logits"] is False


def test_build_tool_model_dir_mode(standin, tmp_path, capsys):
    from megatron_selfreward.generation.trtllm_build import main

    model_dir = _hf_model_dir(tmp_path)
    args = ["--config", str(CONFIGS / "tiny.yaml"), "--model-dir", str(model_dir), "generation.engine=trtllm"]
    # default (PyTorch backend): exporting hf/ is all there is to do
    assert main(args) == 0 and json.loads(capsys.readouterr().out) == {
        "hf_dir": str(model_dir / "hf"), "trtllm_backend": "pytorch", "built": False}
    assert standin.llms == [] and not (model_dir / "trtllm").exists()
    # TensorRT backend: builds what the engine then reuses
    assert main([*args, TRT]) == 0 and json.loads(capsys.readouterr().out)["built"] is True
    assert standin.llms[0].closed  # the tool releases what it built
    assert main([*args, TRT]) == 0 and json.loads(capsys.readouterr().out)["built"] is False
    engine = _engine(tmp_path, TRT)
    assert len(standin.builds) == 1 and engine.stats["engine_built"] == 0


def test_workers_loading_the_same_model_build_it_once(standin, tmp_path, monkeypatch):
    import threading
    import time

    _hf_model_dir(tmp_path)
    real_save = standin.TrtLLM.save

    def slow_save(self, engine_dir):  # a build takes a while: the other worker must wait for it
        time.sleep(0.3)
        real_save(self, engine_dir)

    monkeypatch.setattr(standin.TrtLLM, "save", slow_save)
    engines, errors = [], []

    def worker() -> None:
        try:
            engines.append(_engine(tmp_path, TRT))
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(engines) == 2
    assert len(standin.builds) == 1 and sorted(e.stats["engine_built"] for e in engines) == [0, 1]
