"""Evaluation: pairwise verdicts, both-orders aggregation, the OpenAI-compatible judge client
(against a local HTTP server), and metrics.json of a tiny random-model run."""

from __future__ import annotations

import json
import shutil
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator

import pytest

from megatron_selfreward.judging.openai_client import JudgeEndpointError, OpenAICompatibleClient
from megatron_selfreward.judging.head_to_head import (
    PairwiseVerdict,
    combine_both_orders,
    load_pairwise_template,
    parse_pairwise_verdict,
    render_pairwise_prompt,
    summarize_outcomes,
)
from tests.conftest import CONFIGS

# ---------------------------------------------------------------------------------------------
# Pairwise prompt and verdict parser


@pytest.mark.parametrize("text, choice, reason", [
    ("Output (a)", "a", None),
    ("Output (b)", "b", None),
    ("output (B)", "b", None),
    ("  **Output (a)**  ", "a", None),
    ("## Output (b)", "b", None),
    ("Output: b", "b", None),
    ("Output(a)", "a", None),
    ("(a)", "a", None),
    ("b", "b", None),
    ("A.", "a", None),
    ("I prefer Output (b).", "b", None),
    # a label opening a line decides over one inside a sentence
    ("Output (b). Output (a) is more of a joke.", "b", None),
    ("Output (a) is better than Output (b)", "a", None),
    # the question echoed back is not a verdict
    ("Which is best, Output (a) or Output (b)?", None, "missing"),
    ("Which is best, Output (a) or Output (b)?\nOutput (b)", "b", None),
    ("I think Output (b) is better than Output (a)", None, "ambiguous"),
    ("Output (a)\nOutput (b)", None, "ambiguous"),
    ("Both are equally good.", None, "missing"),
    ("Output as a table", None, "missing"),
    ("Output (c)", None, "missing"),
    ("", None, "missing"),
    (None, None, "missing"),
])
def test_parse_pairwise_verdict(text, choice, reason):
    assert parse_pairwise_verdict(text) == PairwiseVerdict(choice, reason)


def test_pairwise_prompt_fills_slots_once_and_literally():
    template = load_pairwise_template()
    assert "Output (a) or Output (b)" in template and not template.endswith("\n")
    text = render_pairwise_prompt("say <OUTPUT_B_HERE>", "first <INSTRUCTION_HERE>", "second")
    assert "## Instruction:\nsay <OUTPUT_B_HERE>\n" in text
    assert "## Output (a):\nfirst <INSTRUCTION_HERE>\n" in text
    assert "## Output (b):\nsecond\n" in text
    assert "<OUTPUT_A_HERE>" not in text


A, B, NONE = PairwiseVerdict("a"), PairwiseVerdict("b"), PairwiseVerdict(None, "missing")


@pytest.mark.parametrize("first, second, outcome", [
    (A, B, "win"),         # candidate preferred in both positions
    (B, A, "loss"),        # baseline preferred in both positions
    (A, A, "tie"),         # always the first position: disagreement
    (B, B, "tie"),         # always the second position: disagreement
    (A, NONE, "unjudged"),
    (NONE, B, "unjudged"),
    (NONE, NONE, "unjudged"),
])
def test_both_orders_aggregation(first, second, outcome):
    assert combine_both_orders(first, second) == outcome


def test_summarize_outcomes_rates_over_judged():
    s = summarize_outcomes(["win", "win", "tie", "loss", "unjudged"])
    assert (s["win"], s["tie"], s["loss"], s["unjudged"], s["judged"]) == (2, 1, 1, 1, 4)
    assert (s["win_rate"], s["tie_rate"], s["loss_rate"]) == (0.5, 0.25, 0.25)
    assert s["unjudged_rate"] == 0.2
    empty = summarize_outcomes([])
    assert empty["win_rate"] is None and empty["unjudged_rate"] is None
    with pytest.raises(ValueError, match="unknown"):
        summarize_outcomes(["draw"])


# ---------------------------------------------------------------------------------------------
# OpenAI-compatible client against a local server


class _Server:
    """A canned /v1/chat/completions: records each request, answers from a script of
    (status, body, delay_s) entries, then repeats the last."""

    def __init__(self, script: list[tuple[int, Any, float]]) -> None:
        self.script, self.requests = list(script), []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers["Content-Length"]))
                server.requests.append({"path": self.path, "headers": dict(self.headers),
                                        "json": json.loads(body)})
                status, reply, delay = server.script.pop(0) if len(server.script) > 1 else server.script[0]
                time.sleep(delay)
                data = (reply if isinstance(reply, str) else json.dumps(reply)).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout test)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True)

    def __enter__(self) -> "_Server":
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _completion(text: str) -> dict:
    return {"id": "x", "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}]}


def test_client_request_format_and_auth_header(monkeypatch):
    monkeypatch.setenv("SR_TEST_KEY", "sk-test-123")
    with _Server([(200, _completion("Output (b)"), 0.0)]) as server:
        client = OpenAICompatibleClient(server.url, "judge-model", api_key_env="SR_TEST_KEY", timeout_s=5)
        reply = client.chat([{"role": "user", "content": "which?"}], temperature=0.0, max_tokens=7, seed=3)
    assert reply == "Output (b)"
    (req,) = server.requests
    assert req["path"] == "/v1/chat/completions"
    assert req["headers"]["Authorization"] == "Bearer sk-test-123"
    assert req["headers"]["Content-Type"] == "application/json"
    assert req["json"] == {"model": "judge-model", "messages": [{"role": "user", "content": "which?"}],
                           "temperature": 0.0, "max_tokens": 7, "seed": 3}
    assert "sk-test" not in repr(client)


def test_client_sends_no_auth_header_without_a_key(monkeypatch):
    monkeypatch.delenv("SR_TEST_KEY", raising=False)
    with _Server([(200, _completion("a"), 0.0)]) as server:
        OpenAICompatibleClient(server.url, "m", api_key_env="SR_TEST_KEY").chat([{"role": "user", "content": "q"}])
    assert "Authorization" not in server.requests[0]["headers"]


def test_client_retries_server_errors_then_succeeds(monkeypatch):
    monkeypatch.setenv("SR_TEST_KEY", "sk-secret-xyz")
    script = [(500, {"error": "boom"}, 0.0), (503, "busy", 0.0), (200, _completion("Output (a)"), 0.0)]
    with _Server(script) as server:
        client = OpenAICompatibleClient(server.url, "m", api_key_env="SR_TEST_KEY", max_retries=3, backoff_s=0.0)
        assert client.chat([{"role": "user", "content": "q"}]) == "Output (a)"
    assert len(server.requests) == 3


def test_client_gives_up_after_retries_without_leaking_the_key(monkeypatch):
    monkeypatch.setenv("SR_TEST_KEY", "sk-secret-xyz")
    with _Server([(500, {"error": "still down"}, 0.0)]) as server:
        client = OpenAICompatibleClient(server.url, "m", api_key_env="SR_TEST_KEY", max_retries=2, backoff_s=0.0)
        with pytest.raises(JudgeEndpointError, match=r"after 3 attempt\(s\).*HTTP 500") as err:
            client.chat([{"role": "user", "content": "q"}])
    assert len(server.requests) == 3
    assert "sk-secret" not in str(err.value)


def test_client_does_not_retry_a_client_error():
    with _Server([(401, {"error": "bad key"}, 0.0)]) as server:
        client = OpenAICompatibleClient(server.url, "m", max_retries=3, backoff_s=0.0)
        with pytest.raises(JudgeEndpointError, match="HTTP 401"):
            client.chat([{"role": "user", "content": "q"}])
    assert len(server.requests) == 1


def test_client_timeout_message():
    with _Server([(200, _completion("late"), 1.5)]) as server:
        client = OpenAICompatibleClient(server.url, "m", timeout_s=0.2, max_retries=0)
        started = time.monotonic()
        with pytest.raises(JudgeEndpointError, match=r"timed out after 0.2 s"):
            client.chat([{"role": "user", "content": "q"}])
    assert time.monotonic() - started < 1.5


def test_client_rejects_a_reply_that_is_not_a_completion():
    with _Server([(200, {"unexpected": True}, 0.0)]) as server:
        with pytest.raises(JudgeEndpointError, match="choices"):
            OpenAICompatibleClient(server.url, "m").chat([{"role": "user", "content": "q"}])


# ---------------------------------------------------------------------------------------------
# metrics.json of a tiny run: random models (the judge fails to parse, which must be counted)

# The paper's judge (no forced scores): a random model's verdicts then fail to parse.
TINY_OVERRIDES = ["eval.rm_samples=2", "eval.head_to_head_prompts=3", "data.eft_eval_fraction=0.1",
                  "judge.max_new_tokens=6", "eval.answer_max_new_tokens=6", "eval.judge_max_new_tokens=4",
                  "judge.force_score=false"]
RM_KEYS = {"pairwise_accuracy", "five_best_frac", "exact_match_frac", "spearman_mean", "kendall_tau_b_mean",
           "pairs_total", "pairs_evaluated", "pairs_missing_score", "num_instructions"}
H2H_KEYS = {"candidate", "baseline", "judge", "prompts", "num_comparisons", "judged", "win", "tie", "loss",
            "unjudged", "win_rate", "tie_rate", "loss_rate", "unjudged_rate", "disagreements",
            "verdict_failures", "answers", "policy"}


def _tiny_cfg(run_dir: Path, *extra: str):
    from megatron_selfreward.config import load_config

    return load_config(CONFIGS / "tiny.yaml", [f"pipeline.run_dir={run_dir}", *TINY_OVERRIDES, *extra])


def _synthetic_iteration(run_dir: Path) -> None:
    """iter1 judgements as M1 would have written them: 2 prompts x 2 responses, one sample failed."""
    from megatron_selfreward.io import write_jsonl
    from megatron_selfreward.judging.parse import judgement_from_outputs

    write_jsonl(run_dir / "iter1" / "judgements.jsonl", [
        judgement_from_outputs("p0", "p0-r0", ["Score: 4", "no verdict"]),
        judgement_from_outputs("p0", "p0-r1", ["Score: 2", "Score: 3"]),
        judgement_from_outputs("p1", "p1-r0", ["Score: 4", "Score: 4"]),
        judgement_from_outputs("p1", "p1-r1", ["Score: 4", "Score: 4"]),
    ])


def _run_evaluate(cfg, index: int = 2) -> Path:
    """The plan's evaluate (M<index> against M<index-1>) as its adapter runs it, in a 1-process
    world the way the executor provides one."""
    from megatron_selfreward.megatron.parallel import single_process_world
    from megatron_selfreward.pipeline.local import ModelCache, evaluation_of
    from megatron_selfreward.pipeline.schedule import find_stage, plan
    from megatron_selfreward.stages.evaluate import run_evaluate

    evaluation, fp = evaluation_of(cfg, find_stage(plan(cfg), "evaluate", index))
    models = ModelCache(cfg)
    with single_process_world(cfg.pipeline.seed):
        try:
            return run_evaluate(cfg, evaluation, fp, models)
        finally:
            models.release()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Iterator[tuple[Path, Path]]:
    from megatron_selfreward.pipeline.run import import_base_model

    run_dir = tmp_path_factory.mktemp("eval") / "tiny"
    cfg = _tiny_cfg(run_dir)
    m0 = import_base_model(cfg)
    for name in ("M1", "M2"):
        shutil.copytree(m0, run_dir / "models" / name)
    _synthetic_iteration(run_dir)
    out = _run_evaluate(cfg)
    yield run_dir, out


def test_metrics_json_schema_on_a_tiny_run(tiny_run):
    from megatron_selfreward.io import read_jsonl

    run_dir, out = tiny_run
    assert out == run_dir / "eval" / "M2" / "metrics.json"
    m = json.loads(out.read_text())
    assert {"schema_version", "model", "iteration", "previous_model", "reward_model", "judge_health",
            "head_to_head", "lengths", "files", "wall_time_s"} <= set(m)
    assert (m["model"], m["iteration"], m["previous_model"]) == ("M2", 2, "M1")
    rm = m["reward_model"]
    assert RM_KEYS <= set(rm["single_sample"]) and RM_KEYS <= set(rm["k_sample_mean"])
    assert rm["samples_per_response"] == 2 and "tie" in rm["policy"]
    judged = read_jsonl(run_dir / m["files"]["rm_judgements"])
    assert len(judged) == rm["num_responses"] > 0
    failures = sum(r is not None for j in judged for r in j["failure_reasons"])
    assert rm["judge_samples"] == 2 * rm["num_responses"]
    # A random model's judge outputs do not parse: counted, never scored.
    assert rm["parse_failures"] == failures > 0
    assert rm["parse_failure_rate"] == pytest.approx(failures / rm["judge_samples"])
    assert rm["k_sample_mean"]["pairs_missing_score"] + rm["k_sample_mean"]["pairs_evaluated"] \
        == rm["k_sample_mean"]["pairs_total"]
    h2h = m["head_to_head"]
    assert H2H_KEYS <= set(h2h)
    assert (h2h["candidate"], h2h["baseline"], h2h["num_comparisons"]) == ("M2", "M1", 3)
    assert h2h["win"] + h2h["tie"] + h2h["loss"] + h2h["unjudged"] == 3
    assert set(m["lengths"]) == {"M1", "M2"}
    assert m["lengths"]["M2"]["num_answers"] == 3 and m["lengths"]["M2"]["mean_tokens"] > 0
    assert all((run_dir / path).is_file() for path in m["files"].values())
    assert (run_dir / "eval" / "M2" / "metrics.manifest.json").is_file()


def test_judge_health_of_present_and_missing_iterations(tiny_run):
    run_dir, out = tiny_run
    health = json.loads(out.read_text())["judge_health"]
    assert health["iter2"] == {"missing": "iter2/judgements.jsonl"}
    h1 = health["iter1"]
    assert (h1["judged_by"], h1["num_judgements"], h1["sample_failures"]) == ("M1", 4, 1)
    assert (h1["prompts_paired"], h1["prompts_tied"], h1["tie_rate"]) == (1, 1, 0.5)
    assert h1["usable_pairs_per_prompt"] == 0.5 and h1["pairs_written"] is None
    # three of four means round to 4: above the 60% warning line
    assert h1["dominant_bucket"] == "4" and any("collapsed" in w for w in h1["warnings"])


def test_rerun_is_a_no_op(tiny_run):
    run_dir, out = tiny_run
    manifest = run_dir / "eval" / "M2" / "metrics.manifest.json"
    before = manifest.stat().st_mtime_ns
    started = time.monotonic()
    _run_evaluate(_tiny_cfg(run_dir))
    assert manifest.stat().st_mtime_ns == before and time.monotonic() - started < 5


def test_endpoint_judge_reuses_answers_and_counts_position_bias_as_ties(tiny_run):
    from megatron_selfreward.io import read_jsonl

    run_dir, _ = tiny_run
    kept = {p: p.stat().st_mtime_ns for p in (run_dir / "eval").rglob("*.manifest.json")
            if "head_to_head" not in p.name and "metrics" not in p.name}
    # A judge that always answers "Output (a)" prefers whatever is shown first: every
    # comparison disagrees across the two orders, so every one is a tie.
    with _Server([(200, _completion("Output (a)"), 0.0)]) as server:
        cfg = _tiny_cfg(run_dir, f"eval.judge={server.url}", "eval.judge_model=judge-x")
        out = _run_evaluate(cfg)
    assert len(server.requests) == 6 and all(r["json"]["model"] == "judge-x" for r in server.requests)
    h2h = json.loads(out.read_text())["head_to_head"]
    assert (h2h["tie"], h2h["disagreements"], h2h["unjudged"], h2h["tie_rate"]) == (3, 3, 0, 1.0)
    assert h2h["judge"] == f"{server.url} (judge-x)"
    rows = read_jsonl(run_dir / "eval" / "M2" / "head_to_head.jsonl")
    assert {r["raw_candidate_first"] for r in rows} == {"Output (a)"}
    # Answers and RM judgements were reused, not regenerated.
    assert {p: p.stat().st_mtime_ns for p in kept} == kept


# ---------------------------------------------------------------------------------------------
# judge.force_score in the reward-model judging (as judge_responses does it)


class _NoScoreThenCueEngine:
    """A judge that never writes a score on its own, but answers the score cue with "4"."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer, self.requests = tokenizer, []
        self.stats: dict[str, Any] = {}

    def generate(self, requests):
        from megatron_selfreward.generation.engine import GenerationResult, Sample

        self.requests += list(requests)
        out = []
        for r in requests:
            text = "4" if "-force" in r.request_id else "A fine answer, well put."
            ids = self.tokenizer.encode(text)
            out.append(GenerationResult(r.request_id, [Sample(ids, [0.0] * len(ids), "length", text)
                                                       for _ in range(r.params.n)]))
        return out


class _FixedSlot:
    def __init__(self, policy: Any) -> None:
        self.policy = policy

    def get(self, model_dir: Path) -> Any:
        return self.policy


@pytest.mark.parametrize("force", [True, False])
def test_rm_judgements_apply_force_score(tmp_path, force):
    from types import SimpleNamespace

    from megatron_selfreward.io import write_jsonl
    from megatron_selfreward.records import RankedPrompt
    from megatron_selfreward.stages.evaluate import _rm_judgements, reward_model_section
    from megatron_selfreward.stages.respond import SCORE_CUE
    from megatron_selfreward.tokenizer import ByteTokenizer

    cfg = _tiny_cfg(tmp_path / "run", f"judge.force_score={str(force).lower()}")
    tok = ByteTokenizer(cfg.model.vocab_size)
    engine = _NoScoreThenCueEngine(tok)
    ranked = [RankedPrompt(prompt_id="q0", prompt="Name a colour.", responses=["Blue.", "Dog."],
                           human_ranks=[0, 1])]
    split = tmp_path / "eft_eval.jsonl"
    write_jsonl(split, ranked)
    slot = _FixedSlot(SimpleNamespace(engine=engine, tokenizer=tok))
    (tmp_path / "M1").mkdir()
    _, judged = _rm_judgements(cfg, tmp_path / "eval", slot, tmp_path / "M1", split)
    section = reward_model_section(ranked, judged)
    manifest = json.loads((tmp_path / "eval" / "rm_judgements.manifest.json").read_text())
    if force:
        # every sample (2 responses x eval.rm_samples=2) continued after the cue and parsed
        assert [jd.sample_scores for jd in judged] == [[4.0, 4.0], [4.0, 4.0]]
        assert all(raw.endswith(SCORE_CUE + "4") for jd in judged for raw in jd.raw_outputs)
        assert sum("-force" in r.request_id for r in engine.requests) == 4
        assert (section["parse_failures"], section["forced_score_samples"]) == (0, 4)
        assert manifest["counts"]["forced_score_samples"] == 4
    else:
        assert all(s is None for jd in judged for s in jd.sample_scores)
        assert (section["parse_failures"], section["forced_score_samples"]) == (4, 0)
        assert manifest["counts"]["forced_score_samples"] == 0
