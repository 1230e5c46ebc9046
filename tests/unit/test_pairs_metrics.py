"""Pair selection (max vs min, ties dropped) and reward-model metrics against hand computations."""

from __future__ import annotations

import json
import math
import random
import warnings

import numpy as np
import pytest

from megatron_selfreward.judging.metrics import (
    average_ranks,
    judge_health,
    kendall_tau_b,
    reward_model_metrics,
    spearman,
)
from megatron_selfreward.io import Records, write_jsonl
from megatron_selfreward.judging.parse import judgement_from_outputs
from megatron_selfreward.judging.preference_pairs import NoPairReason, build_pair, select_pair_indices
from megatron_selfreward.records import Judgement, PreferencePair, Prompt, Response
from megatron_selfreward.stages.respond import run_build_pairs

# ----------------------------------------------------------------------- pairs


@pytest.mark.parametrize(
    "scores, expected",
    [
        ([3.0, 5.0, 1.0, 4.0], (1, 2)),
        ([5.0, 5.0, 1.0], (0, 2)),  # equal max: first in response order is chosen
        ([5.0, 1.0, 5.0, 1.0], (0, 1)),  # equal min: first in response order is rejected
        ([None, 4.0, None, 2.0], (1, 3)),  # unscored candidates are skipped, never the loser
        ([13 / 3, 4.0], (0, 1)),
        ([4.0, 4.0, 4.0], NoPairReason.TIE),
        ([3.0, None, 3.0], NoPairReason.TIE),
        ([None, 3.0], NoPairReason.TOO_FEW_SCORED),
        ([None, None, None, None], NoPairReason.TOO_FEW_SCORED),
        ([], NoPairReason.TOO_FEW_SCORED),
    ],
)
def test_pairs_select_indices(scores, expected):
    assert select_pair_indices(scores) == expected


def test_pairs_reason_serialises_as_plain_string():
    assert NoPairReason.TIE == "tie" and f"{NoPairReason.TOO_FEW_SCORED}" == "too_few_scored"


def _candidates(sample_scores: list[list[str]]):
    prompt = Prompt("p7", "Name a prime number.")
    responses = [Response("p7", f"p7-r{i}", f"answer {i}", 3, "stop") for i in range(len(sample_scores))]
    judgements = [
        judgement_from_outputs("p7", r.response_id, outputs) for r, outputs in zip(responses, sample_scores)
    ]
    return prompt, responses, judgements


def test_pairs_build_pair_max_vs_min_with_failed_judgement_excluded():
    prompt, responses, judgements = _candidates(
        [
            ["Score: 3", "Score: 4", "Score: 3"],  # 10/3
            ["garbage", "Score: 10", "Score: 8/10"],  # all failed: excluded (a 0 would make it the loser)
            ["Score: 5", "Score: 5", "no score"],  # 5.0
            ["Score: 2", "Score: 3", "Score: 1"],  # 2.0
        ]
    )
    pair, reason = build_pair(prompt, responses, list(reversed(judgements)))  # judgement order is irrelevant
    assert reason is None
    assert pair == PreferencePair(
        prompt_id="p7",
        prompt="Name a prime number.",
        chosen="answer 2",
        rejected="answer 3",
        chosen_score=5.0,
        rejected_score=2.0,
        chosen_response_id="p7-r2",
        rejected_response_id="p7-r3",
    )


def test_pairs_build_pair_tie_and_too_few():
    prompt, responses, judgements = _candidates([["Score: 4"], ["Score: 4/5"], ["Score: 4.0"], ["?"]])
    assert build_pair(prompt, responses, judgements) == (None, NoPairReason.TIE)
    prompt, responses, judgements = _candidates([["Score: 4"], ["?"], ["Score: 9"], [""]])
    assert build_pair(prompt, responses, judgements) == (None, NoPairReason.TOO_FEW_SCORED)


def test_pairs_build_pair_rejects_mismatched_ids():
    prompt, responses, judgements = _candidates([["Score: 4"], ["Score: 2"]])
    with pytest.raises(ValueError, match="has no judgement"):
        build_pair(prompt, responses, judgements[:1])
    with pytest.raises(ValueError, match="unknown responses"):
        build_pair(prompt, responses[:1], judgements)
    with pytest.raises(ValueError, match="two judgements"):
        build_pair(prompt, responses, judgements + judgements[:1])
    foreign = Judgement("p8", "p7-r0", [4.0], ["Score: 4"], [None], 4.0)
    with pytest.raises(ValueError, match="prompt_id 'p8'"):
        build_pair(prompt, responses, [foreign, judgements[1]])
    with pytest.raises(ValueError, match="duplicate response_id"):
        build_pair(prompt, [responses[0], responses[0]], judgements[:1])


def _iteration_files(tmp_path, suffix: str = ""):
    """prompts/responses/judgements with every outcome (pair, tie, too few scored, no responses, a
    judged prompt missing from the prompts file), responses and judgements in shuffled order."""
    rng = random.Random(5)
    verdicts = ["Score: 5", "Score: 4", "Score: 3", "Score: 4.5", "Score: 1", "Score: 9", "none", ""]
    prompts = [Prompt(f"p{i}", f"prompt {i} ü") for i in range(60)]
    responses = [Response(p.prompt_id, f"{p.prompt_id}-r{r}", f"answer {p.prompt_id}.{r}\n" * r, r, "stop")
                 for i, p in enumerate(prompts) if i % 11 for r in range(1 if i % 7 == 0 else rng.randint(2, 4))]
    judgements = [judgement_from_outputs(r.prompt_id, r.response_id, [rng.choice(verdicts) for _ in range(3)])
                  for r in responses]
    judgements.append(judgement_from_outputs("p-extra", "p-extra-r0", ["Score: 4"]))
    rng.shuffle(responses)
    rng.shuffle(judgements)
    paths = [tmp_path / f"{name}.jsonl{suffix}" for name in ("prompts", "responses", "judgements")]
    for path, records in zip(paths, (prompts, responses, judgements)):
        write_jsonl(path, records)
    return paths, prompts, responses, judgements


STAGE_FP = {"inputs": {}, "params": {"test": "build_pairs"}}  # the executor passes its spec's


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_build_pairs_stage_streams_the_pairs_build_pair_gives(tmp_path, suffix):
    paths, prompts, responses, judgements = _iteration_files(tmp_path, suffix)
    prompts_path, responses_path, judgements_path = paths
    out = tmp_path / "pairs.jsonl"
    got = run_build_pairs(prompts_path, responses_path, judgements_path, out, STAGE_FP)
    # The reference: every record in memory, grouped by prompt, build_pair per prompt.
    want, dropped = [], {}
    for p in prompts:
        mine = [r for r in responses if r.prompt_id == p.prompt_id]
        if not mine:
            dropped["no_responses"] = dropped.get("no_responses", 0) + 1
            continue
        pair, reason = build_pair(p, sorted(mine, key=responses.index),
                                  [j for j in judgements if j.prompt_id == p.prompt_id])
        if pair is None:
            dropped[reason.value] = dropped.get(reason.value, 0) + 1
        else:
            want.append(pair)
    assert isinstance(got, Records) and got == want and len(got) == len(want) > 10
    write_jsonl(tmp_path / "reference.jsonl", want)
    assert out.read_bytes() == (tmp_path / "reference.jsonl").read_bytes()
    counts = json.loads((tmp_path / "pairs.manifest.json").read_text())["counts"]
    assert counts == {"prompts": 60, "pairs": len(want), "dropped": dropped}
    assert set(dropped) == {"no_responses", "too_few_scored", "tie"}


def test_build_pairs_stage_refuses_responses_without_judgements(tmp_path):
    (prompts_path, responses_path, judgements_path), _, _, judgements = _iteration_files(tmp_path)
    lost = judgements[0]
    write_jsonl(judgements_path, [j for j in judgements if j is not lost])
    with pytest.raises(ValueError, match=f"response {lost.response_id!r} has no judgement"):
        run_build_pairs(prompts_path, responses_path, judgements_path, tmp_path / "pairs.jsonl", STAGE_FP)
    assert not (tmp_path / "pairs.jsonl").exists() and not (tmp_path / "pairs.manifest.json").exists()


# --------------------------------------------------------------- correlations


def test_metrics_average_ranks():
    assert average_ranks([10, 30, 20]) == [1.0, 3.0, 2.0]
    assert average_ranks([4, 4, 2, 4]) == [3.0, 3.0, 1.0, 3.0]  # positions 2,3,4 -> 3
    assert average_ranks([1, 1]) == [1.5, 1.5]
    assert average_ranks([]) == []


def test_metrics_known_values():
    # Published reference values (SciPy documentation examples).
    assert spearman([1, 2, 3, 4, 5], [5, 6, 7, 8, 7]) == pytest.approx(0.8207826816681233)
    assert kendall_tau_b([12, 2, 1, 12, 2], [1, 4, 7, 1, 0]) == pytest.approx(-0.47140452079103173)


def test_metrics_undefined_correlations():
    assert spearman([3, 3, 3], [1, 2, 3]) is None
    assert kendall_tau_b([3, 3, 3], [1, 2, 3]) is None
    assert spearman([1], [1]) is None and kendall_tau_b([1], [1]) is None
    with pytest.raises(ValueError):
        spearman([1, 2], [1])


def _spearman_closed_form(x, y):
    # Only valid without ties: rho = 1 - 6 * sum(d^2) / (n (n^2 - 1)).
    n = len(x)
    rx = {v: i for i, v in enumerate(sorted(x))}
    ry = {v: i for i, v in enumerate(sorted(y))}
    d2 = sum((rx[a] - ry[b]) ** 2 for a, b in zip(x, y))
    return 1 - 6 * d2 / (n * (n * n - 1))


def _spearman_numpy(x, y):
    # Average rank of v = (#values below v) + (#values equal to v + 1) / 2.
    def ranks(v):
        v = np.asarray(v, dtype=float)
        return np.array([(v < a).sum() + ((v == a).sum() + 1) / 2 for a in v])

    return float(np.corrcoef(ranks(x), ranks(y))[0, 1])


def _kendall_sign_matrix(x, y):
    # tau-b as the cosine between the pairwise sign matrices.
    sx = np.sign(np.subtract.outer(np.asarray(x, float), np.asarray(x, float)))
    sy = np.sign(np.subtract.outer(np.asarray(y, float), np.asarray(y, float)))
    return float((sx * sy).sum() / math.sqrt((sx * sx).sum() * (sy * sy).sum()))


def test_metrics_correlations_match_brute_force_references():
    rng = random.Random(1234)
    for trial in range(300):
        n = rng.randint(2, 9)
        if trial % 2 == 0:  # distinct values: the closed formula applies
            x, y = rng.sample(range(100), n), rng.sample(range(100), n)
            assert spearman(x, y) == pytest.approx(_spearman_closed_form(x, y), abs=1e-12)
        else:  # judge-like values with many ties
            x = [rng.choice([1, 2, 3, 3.5, 4, 5]) for _ in range(n)]
            y = [rng.choice([0, 1, 2]) for _ in range(n)]
        if len(set(x)) < 2 or len(set(y)) < 2:
            assert spearman(x, y) is None and kendall_tau_b(x, y) is None
            continue
        assert spearman(x, y) == pytest.approx(_spearman_numpy(x, y), abs=1e-12)
        assert kendall_tau_b(x, y) == pytest.approx(_kendall_sign_matrix(x, y), abs=1e-12)


def _kendall_tau_b_pair_count(x, y):
    # Every pair counted once: concordant, discordant, tied in x, tied in y (a pair tied in both
    # counts in both tie counts), tau-b = (C - D) / sqrt((n0 - n1)(n0 - n2)).
    c = d = tx = ty = n0 = 0
    for i in range(len(x)):
        for j in range(i + 1, len(x)):
            n0 += 1
            dx, dy = x[i] - x[j], y[i] - y[j]
            tx += dx == 0
            ty += dy == 0
            c += dx * dy > 0
            d += dx * dy < 0
    return (c - d) / math.sqrt((n0 - tx) * (n0 - ty))


def test_metrics_kendall_tau_b_matches_a_pair_count_on_judge_like_ties():
    rng = random.Random(99)
    checked = 0
    for _ in range(400):
        n = rng.randint(2, 12)
        x = [rng.choice([0, 1, 2, 10 / 3, 11 / 3, 4, 13 / 3, 4.5, 5]) for _ in range(n)]
        y = [rng.choice([-2, -1, 0]) for _ in range(n)] if n % 2 else [-r for r in rng.sample(range(n), n)]
        if len(set(x)) < 2 or len(set(y)) < 2:
            continue
        assert kendall_tau_b(x, y) == pytest.approx(_kendall_tau_b_pair_count(x, y), abs=1e-12)
        checked += 1
    assert checked > 300


def test_metrics_undefined_correlations_are_none_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # SciPy warns (ConstantInputWarning) and returns nan
        for x, y in [([3, 3, 3], [1, 2, 3]), ([1, 2, 3], [0, 0, 0]), ([2.5, 2.5], [1, 1]), ([4], [1]), ([], [])]:
            assert spearman(x, y) is None and kendall_tau_b(x, y) is None
        m = reward_model_metrics([([3.0, 3.0, 3.0], [0, 1, 2]), ([4.0, None], [1, 0]), ([5.0, 1.0], [0, 1])])
    assert (m["correlation_undefined"], m["correlation_instructions"]) == (2, 1)
    assert type(spearman([1, 2], [2, 1])) is float and type(kendall_tau_b([1, 2], [2, 1])) is float
    assert spearman([1, 2], [2, 1]) == pytest.approx(-1.0) and kendall_tau_b([1, 2], [2, 1]) == -1.0


# ------------------------------------------------------------- reward metrics


def test_metrics_reward_model_hand_computed():
    items = [
        # A: model order r0 > r2 > r1 = human order. 3/3 pairs, exact, rho = tau = 1, 5 on rank 0 (hit).
        ([5.0, 3.0, 4.0], [0, 2, 1]),
        # B: r0, r1 tie at 4 -> that pair incorrect; (r0,r2), (r1,r2) correct. Not exact.
        #    x = [4,4,2] -> ranks [2.5,2.5,1]; quality -rank = [-1,0,-2] -> ranks [2,3,1].
        #    dx = [.5,.5,-1], dy = [0,1,-1]: sxy = 1.5, sxx = 1.5, syy = 2 -> rho = 1.5/sqrt(3) = 0.8660254.
        #    tau-b: C = 2, D = 0, n0 = 3, ties in x = 1, in y = 0 -> 2/sqrt(2*3) = 0.8164966.
        ([4.0, 4.0, 2.0], [1, 0, 2]),
        # C: r1 unscored -> 2 pairs missing; (r0,r2) correct. Not exact (missing score).
        #    r0 scored 5 but is human rank 1 -> 5-best miss. Scored subset [5,1] vs [-1,-2]: rho = tau = 1.
        ([5.0, None, 1.0], [1, 0, 2]),
        # D: model tie -> 1 incorrect pair; constant scores -> correlation undefined. Not exact.
        ([3.0, 3.0], [0, 1]),
        # E: one response: no ranking, skipped entirely.
        ([5.0], [0]),
        # F: reversed: pair incorrect, 5 on rank 1 (miss), rho = tau = -1. Not exact.
        ([2.0, 5.0], [0, 1]),
    ]
    m = reward_model_metrics(items)
    # pairs: total 3+3+3+1+1 = 11, missing 2 (C), evaluated 9, correct 3+2+1+0+0 = 6, ties B1 + D1 = 2.
    assert m["pairs_total"] == 11
    assert m["pairs_missing_score"] == 2
    assert m["pairs_evaluated"] == 9
    assert m["pairs_correct"] == 6
    assert m["pairs_model_tie"] == 2
    assert m["pairwise_accuracy"] == pytest.approx(6 / 9)
    # 5-best: scored-5 responses A.r0 (rank 0), C.r0 (rank 1), F.r1 (rank 1) -> 1/3.
    assert (m["five_best_count"], m["five_best_hits"]) == (3, 1)
    assert m["five_best_frac"] == pytest.approx(1 / 3)
    # exact: only A, out of A B C D F.
    assert (m["num_instructions"], m["instructions_skipped"]) == (5, 1)
    assert (m["exact_match_count"], m["exact_match_missing_score"]) == (1, 1)
    assert m["exact_match_frac"] == pytest.approx(0.2)
    # correlations over A, B, C, F (D undefined):
    #   rho = (1 + 0.8660254 + 1 - 1) / 4, tau = (1 + 0.8164966 + 1 - 1) / 4.
    assert (m["correlation_instructions"], m["correlation_undefined"]) == (4, 1)
    assert m["spearman_mean"] == pytest.approx((1 + math.sqrt(3) / 2) / 4)
    assert m["kendall_tau_b_mean"] == pytest.approx((1 + 2 / math.sqrt(6)) / 4)


def test_metrics_reward_model_empty_and_all_failed():
    m = reward_model_metrics([])
    assert m["pairwise_accuracy"] is None and m["exact_match_frac"] is None and m["spearman_mean"] is None
    m = reward_model_metrics([([None, None], [0, 1])])
    assert m["pairs_missing_score"] == 1 and m["pairwise_accuracy"] is None
    assert m["exact_match_frac"] == 0.0 and m["correlation_undefined"] == 1
    assert m["five_best_frac"] is None


def test_metrics_reward_model_best_score_and_inputs_validated():
    m = reward_model_metrics([([4.0, 3.0], [0, 1])], best_score=4.0)
    assert m["five_best_frac"] == 1.0
    with pytest.raises(ValueError, match="item 1: 2 model scores but 3 human ranks"):
        reward_model_metrics([([1.0, 2.0], [0, 1]), ([1.0, 2.0], [0, 1, 2])])
    with pytest.raises(ValueError, match="human ranks must be distinct"):
        reward_model_metrics([([1.0, 2.0], [0, 0])])


def test_metrics_reward_model_exact_match_ignores_rank_numbering():
    # Human ranks need only be distinct; the ordering is what must match.
    m = reward_model_metrics([([1.0, 5.0, 3.0], [7, 2, 4])])
    assert m["exact_match_frac"] == 1.0 and m["pairwise_accuracy"] == 1.0
    assert m["five_best_frac"] == 1.0  # rank 2 is this instruction's best


# --------------------------------------------------------------- judge health


def test_judge_health_hand_computed():
    j = judgement_from_outputs
    judgements = [
        j("p1", "r0", ["Score: 4", "Score: 4", "Score: 5"]),  # 13/3 -> bucket 4
        j("p1", "r1", ["Score: 4", "nothing", "Score: 4"]),  # 4 -> bucket 4
        j("p1", "r2", ["??", "Score: 8/10", "Score: 11"]),  # all failed
        j("p2", "r0", ["Score: 5", "Score: 4", "Score: five"]),  # 4.5 -> bucket 5 (half up)
        j("p2", "r1", ["Score: 4.5", "Score: 4.5", "Score: 4.5"]),  # 4.5 -> bucket 5; p2 ties
        j("p3", "r0", ["Score: 2", "Score: 2", "Score: 2"]),  # 2
        j("p3", "r1", ["", "", ""]),  # all failed; p3 has 1 scored -> too few
    ]
    h = judge_health(judgements)
    assert (h["num_judgements"], h["num_samples"]) == (7, 21)
    assert h["sample_failures"] == 8
    assert h["sample_failure_rate"] == pytest.approx(8 / 21)
    assert h["failure_reasons"] == {"missing": 5, "not_a_number": 1, "out_of_range": 1, "wrong_scale": 1}
    assert h["judgements_all_failed"] == 2
    assert h["judgement_failure_rate"] == pytest.approx(2 / 7)
    assert h["hist_mean_rounded"] == {"0": 0, "1": 0, "2": 1, "3": 0, "4": 2, "5": 2}
    assert h["hist_sample"] == {"2": 3, "4": 5, "4.5": 3, "5": 2}
    assert (h["num_prompts"], h["prompts_paired"], h["prompts_tied"], h["prompts_too_few_scored"]) == (3, 1, 1, 1)
    assert h["tie_rate"] == pytest.approx(0.5)
    assert h["dominant_bucket"] == "4" and h["dominant_bucket_frac"] == pytest.approx(0.4)
    assert len(h["warnings"]) == 1 and "failed to parse" in h["warnings"][0]


def test_judge_health_warns_on_score_collapse():
    judgements = [judgement_from_outputs(f"p{i}", "r", ["Score: 4"]) for i in range(7)]
    judgements += [judgement_from_outputs(f"p{i}", "r", ["Score: 3"]) for i in range(7, 10)]
    h = judge_health(judgements)
    assert h["dominant_bucket"] == "4" and h["dominant_bucket_frac"] == pytest.approx(0.7)
    assert h["warnings"] == [
        "score bucket 4 holds 70.0% of scored judgements (> 60%): the judge may have collapsed to one score"
    ]
    assert h["tie_rate"] is None  # one response per prompt: no prompt can pair or tie


def test_judge_health_streams_a_generator_like_a_list():
    rng = random.Random(8)
    verdicts = ["Score: 5", "Score: 4", "Score: 2", "Score: 4.5", "oops", "Score: 7"]
    judgements = [judgement_from_outputs(f"p{i % 13}", f"r{i}", [rng.choice(verdicts) for _ in range(3)])
                  for i in range(80)]
    assert judge_health(iter(judgements)) == judge_health(judgements)
    assert judge_health((j for j in judgements), 2.0, 3.0) == judge_health(judgements, 2.0, 3.0)


def test_judge_health_empty():
    h = judge_health([])
    assert h["num_judgements"] == 0 and h["sample_failure_rate"] is None
    assert h["dominant_bucket"] is None and h["warnings"] == []
