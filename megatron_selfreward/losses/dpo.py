"""Preference losses (DPO and IPO) as small pure functions over sequence log-probabilities.

Every loss takes the summed log-probabilities of the chosen and rejected responses under the
policy and under the frozen reference model, one value per pair, and returns one loss per pair.
The trainer sums these and megatron divides by the global pair count, so the optimised
objective is the mean over the global batch, whatever the TP/PP/DP layout.

`LOSSES` is the registry keyed by config `dpo.loss_type`.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

PairLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]


def logratio_margin(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
) -> torch.Tensor:
    """h = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l)), per pair."""
    return (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)


def sigmoid_dpo(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """DPO (Rafailov et al. 2023, eq. 7): -log sigmoid(beta * h). Equals ln 2 when policy = reference."""
    h = logratio_margin(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    return -F.logsigmoid(beta * h)


def ipo(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """IPO (Azar et al. 2023, eq. 17): (h - 1/(2 beta))^2, with beta as the paper's tau.

    h uses summed (not length-averaged) log-probabilities, as in the paper; TRL's "ipo" divides
    each log-ratio by its completion length first, so the two differ for unequal lengths.
    """
    h = logratio_margin(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    return (h - 1.0 / (2.0 * beta)) ** 2


LOSSES: dict[str, PairLoss] = {"sigmoid": sigmoid_dpo, "ipo": ipo}


def get_loss(loss_type: str) -> PairLoss:
    try:
        return LOSSES[loss_type]
    except KeyError:
        raise ValueError(
            f"config key 'dpo.loss_type': unknown loss {loss_type!r} (known: {', '.join(LOSSES)})"
        ) from None


def implicit_rewards(
    policy_logps: torch.Tensor, ref_logps: torch.Tensor, beta: float
) -> torch.Tensor:
    """DPO's implicit reward beta * (log pi(y) - log ref(y)), for logging."""
    return beta * (policy_logps - ref_logps)


def sequence_logps(per_token_nll: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of log-probabilities over the masked (response) tokens of each row: [b, s] -> [b]."""
    return -(per_token_nll.float() * mask.float()).sum(dim=-1)


# Order of the summed statistics a DPO micro-batch reports (see `pair_stats`).
STAT_NAMES = (
    "loss", "pairs", "reward_accuracy", "reward_margin",
    "logps_chosen", "logps_rejected", "rewards_chosen", "rewards_rejected",
)


def pair_stats(
    losses: torch.Tensor,
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """Per-micro-batch sums of the logged metrics (order: STAT_NAMES); divide by "pairs" later."""
    with torch.no_grad():
        chosen_r = implicit_rewards(policy_chosen, ref_chosen, beta)
        rejected_r = implicit_rewards(policy_rejected, ref_rejected, beta)
        values = [
            losses.sum(), torch.tensor(float(losses.numel())),
            (chosen_r > rejected_r).float().sum(), (chosen_r - rejected_r).sum(),
            policy_chosen.sum(), policy_rejected.sum(), chosen_r.sum(), rejected_r.sum(),
        ]
        return torch.stack([v.detach().float().reshape(()) for v in values])


def summarize(stats: torch.Tensor) -> dict[str, float]:
    """Means per pair from summed `pair_stats` (already reduced over micro-batches and ranks)."""
    pairs = max(float(stats[1]), 1.0)
    out = {name: float(stats[i]) / pairs for i, name in enumerate(STAT_NAMES) if name != "pairs"}
    out["pairs"] = float(stats[1])
    return out
