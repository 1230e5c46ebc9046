"""The generation engine protocol: what every backend (in-process Megatron, TensorRT-LLM) offers.

Algorithms (response sampling, judging, prompt generation) build `GenerationRequest`s and read
`GenerationResult`s; they never know which backend ran them. Token ids are the contract: prompts
go in as token ids, samples come back as token ids plus text (decoded by the engine when it has
a tokenizer, otherwise by the caller).

Semantics every backend must keep:
- `generate(requests)` returns one result per request, in input order; `samples[j]` is sample j.
- `temperature == 0` is greedy decoding; otherwise temperature, then top-k, then top-p
  (nucleus over the top-k-renormalised distribution) shape the sampling distribution.
- A request's samples are reproducible from `(seed, sample index)` alone: the same request with
  the same seed gives the same samples whatever else is in the batch (up to floating-point
  differences in the logits of different batch shapes, which in practice never flip a token).
- `Sample.logprobs[i]` is the log-probability of generated token i under the model's
  *unmodified* next-token distribution: `log_softmax` of the raw logits over the real
  vocabulary, before temperature, top-k or top-p. That is the quantity DPO and diagnostics need,
  and it does not depend on the sampling settings. A request that needs them says so
  (`SamplingParams.logprobs`): an engine for which they cost extra (TensorRT-LLM) computes them
  only then and leaves NaN otherwise; the Megatron engine always fills them.
- Weights are loaded once per iteration with `load_weights`, never per request.
"""

from __future__ import annotations

import abc
import hashlib
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Mapping, Sequence

FinishReason = Literal["stop", "length", "eos"]


@dataclass(frozen=True)
class Followup:
    """A continuation the engine writes after a sample's own end, in the same KV cache.

    When the sample ends by EOS or by reaching max_new_tokens, and `skip_if(text)` is false
    (or unset): the final EOS is dropped, `token_ids` are fed as if the model had written them,
    then up to `max_new_tokens` more tokens are drawn (from `allowed_token_ids` alone when
    given). A sample ended by a stop token or stop string gets none. Used by judge.force_score:
    a verdict without a score gets the score cue and one score token, with no second prefill of
    the prompt and the verdict.
    """

    token_ids: tuple[int, ...]
    max_new_tokens: int
    allowed_token_ids: tuple[int, ...] = ()
    skip_if: Callable[[str], bool] | None = None

    def __post_init__(self) -> None:
        if not self.token_ids or self.max_new_tokens < 1:
            raise ValueError("Followup needs token_ids and max_new_tokens >= 1")


@dataclass
class SamplingParams:
    """How to decode one request.

    temperature: 0 = greedy. top_k: 0 = off. top_p: 1.0 = off.
    n: samples per request; they share one prompt prefill.
    seed: None = derived from the engine's seed and the request id.
    stop_strings: generation stops once the decoded text contains one; the text is cut before it
        (needs a tokenizer). stop_token_ids: extra token ids that end a sample ("stop"); the
        engine's EOS ids end it with "eos".
    allowed_token_ids: when given, every generated token is drawn from these ids alone (the
        distribution renormalised over them, as vLLM's option of the same name); log-probs stay
        those of the unmodified distribution.
    followup: see `Followup` (engines that cannot continue in place refuse it).
    logprobs: the caller reads `Sample.logprobs` (see the module docstring); no stage does today.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 64
    n: int = 1
    seed: int | None = None
    stop_strings: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    allowed_token_ids: list[int] = field(default_factory=list)
    followup: Followup | None = None
    logprobs: bool = False

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"SamplingParams.temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"SamplingParams.top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ValueError(f"SamplingParams.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.n < 1:
            raise ValueError(f"SamplingParams.n must be >= 1, got {self.n}")
        if any(not s for s in self.stop_strings):
            raise ValueError("SamplingParams.stop_strings must not contain empty strings")
        if any(t < 0 for t in self.allowed_token_ids):
            raise ValueError(f"SamplingParams.allowed_token_ids must be token ids >= 0, got {self.allowed_token_ids}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class GenerationRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)

    def __post_init__(self) -> None:
        if not self.prompt_token_ids:
            raise ValueError(f"request {self.request_id!r}: prompt_token_ids is empty")


@dataclass
class Sample:
    """One generated continuation.

    token_ids: the generated tokens, including the token that ended the sample (EOS, a stop
        token, or the token that completed a stop string), so a trainer sees what the model
        actually emitted. text: the decoded continuation without that EOS / stop token and cut
        before the first stop string; "" until someone with a tokenizer fills it.
    logprobs: one per token in token_ids, under the unmodified distribution (module docstring);
        NaN where the engine computed none (not requested, or not returned).
    followup_at: where a `Followup` begins in token_ids (None: the sample got none); its text
        is appended to the sample's own text.
    """

    token_ids: list[int]
    logprobs: list[float]
    finish_reason: FinishReason
    text: str = ""
    followup_at: int | None = None


@dataclass
class GenerationResult:
    request_id: str
    samples: list[Sample]


def sample_seed(seed: int | None, sample_index: int, *, engine_seed: int, request_id: str) -> int:
    """The RNG seed of one sample: a stable hash, so it is the same in every process and batch.

    With an explicit request seed the request id does not enter, so two requests with the same
    seed sample alike (as in vLLM); without one, the engine seed and the request id stand in.
    """
    key = f"{seed}:{sample_index}" if seed is not None else f"{engine_seed}:{request_id}:{sample_index}"
    digest = hashlib.sha256(key.encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def engine_rates(counters: Mapping[str, Any]) -> dict[str, float]:
    """Rates derived from engine counters (one engine's, or several workers' summed):
    `prefill_saved_fraction` where prefill tokens are counted, and `output_tokens_per_s` over
    the prefill + decode time."""
    rates: dict[str, float] = {}
    if "prefill_tokens_requested" in counters:
        requested = counters["prefill_tokens_requested"]
        rates["prefill_saved_fraction"] = (1.0 - counters.get("prefill_tokens_computed", 0) / requested
                                           if requested else 0.0)
    busy = counters.get("prefill_time_s", 0) + counters.get("decode_time_s", 0)
    rates["output_tokens_per_s"] = counters.get("decode_tokens", 0) / busy if busy else 0.0
    return rates


class GenerationEngine(abc.ABC):
    """A backend that turns requests into samples. See the module docstring for the contract."""

    @abc.abstractmethod
    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """Generate every request; results in input order."""

    @abc.abstractmethod
    def load_weights(self, source: Any) -> None:
        """Take new weights (once per iteration): a checkpoint path or backend-specific object."""

    @property
    def stats(self) -> dict[str, float]:
        """Counters and timings for the throughput report; backends fill what they can."""
        return {}

    # Backends set these: the tokenizer that decodes samples and the end-of-sequence ids.
    tokenizer: Any = None
    eos_token_ids: frozenset[int] = frozenset()

    def decode_text(self, token_ids: Sequence[int], finish_reason: FinishReason,
                    params: SamplingParams) -> str:
        """The sample's text: without a final EOS / stop token, cut before the first stop string."""
        ids = list(token_ids)
        if ids and finish_reason in ("eos", "stop") and (
            ids[-1] in self.eos_token_ids or ids[-1] in params.stop_token_ids
        ):
            ids = ids[:-1]
        text = self.tokenizer.decode(ids)
        cuts = [text.find(s) for s in params.stop_strings if s in text]
        return text[: min(cuts)] if cuts else text
