"""Flow-DPO (Liu et al. 2025, "Improving Video Generation with Human Feedback") as pure functions.

The DPO objective of Diffusion-DPO (Wallace et al. 2024) for rectified flow: on a pair (winner w, loser l) noised
with the same noise and timestep, the per-sample velocity MSE e of the policy θ and of the frozen reference give

    Δ = (e_θ(w) − e_ref(w)) − (e_θ(l) − e_ref(l)),      loss = −log σ(−β/2 · Δ) × weight,   averaged over the pairs

so the policy lowers its error on the winner and raises it on the loser relative to the reference. β is constant
(``stage.dpo_beta``; the paper trains with β = 500 and reports that a β weighted by the timestep reward-hacked).
At the first step the policy is the reference, Δ = 0 and the loss is log 2.

    x_t, t_2B, noise, drop_2B = pair_flow_inputs(x0_2B, g, loc=0.0, scale=1.0, use_shift=True, vae_spatial=8,
                                                 drop_prob=0.1)            # rows: B winners, then their B losers
    with torch.no_grad():
        e_ref_2B = rf.flow_loss(reference(x_t, t_2B, ...), x0_2B, noise)
    e_2B = rf.flow_loss(policy(x_t, t_2B, ...), x0_2B, noise)
    delta_B = dpo_delta(e_2B, e_ref_2B)
    loss = flow_dpo_loss(delta_B, beta=500.0, weight_B=weight_B)
    sums = dpo_sums(delta_B, e_2B, e_ref_2B, beta=500.0)   # add up over micro-batches and DP ranks, then
    metrics = dpo_metrics(sums)   # {"dpo_implicit_acc", "dpo_reward_margin", "dpo_kl_proxy"}

``dpo_implicit_acc``: the fraction of pairs the policy ranks right relative to the reference (Δ < 0);
``dpo_reward_margin``: the mean implicit reward margin −β/2·Δ; ``dpo_kl_proxy``: the mean of e_θ − e_ref over
winners and losers (how far the policy's errors moved from the reference's, a proxy for the KL the β term holds back).
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from models import rectified_flow as rf

METRICS = ("dpo_implicit_acc", "dpo_reward_margin", "dpo_kl_proxy")
SUMS = ("pairs", "correct", "margin", "kl")   # the keys of dpo_sums


def pair_flow_inputs(x0_2B: torch.Tensor, generator: Optional[torch.Generator], loc: float, scale: float,
                     use_shift: bool, vae_spatial: int = rf.VAE_SPATIAL, drop_prob: float = 0.0
                     ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_t, t [2B], noise, caption drop [2B]) for B pairs stacked as [winners; losers] (one latent shape): noise,
    timestep and caption dropout are drawn once per pair from ``generator`` (in that order, as
    ``rf.training_step_inputs`` draws them) and shared by its winner and loser."""
    b2 = x0_2B.shape[0]
    if b2 % 2:
        raise ValueError(f"pair_flow_inputs: expected [winners; losers], an even batch, got {b2}")
    b = b2 // 2
    _, t_B, noise_B = rf.training_step_inputs(x0_2B[:b], generator, loc, scale, use_shift, vae_spatial=vae_spatial)
    drop_B = torch.rand(b, generator=generator) < drop_prob
    noise, t_2B = torch.cat([noise_B, noise_B]), torch.cat([t_B, t_B])
    return rf.interpolate(x0_2B, noise, t_2B), t_2B, noise, torch.cat([drop_B, drop_B]).to(x0_2B.device)


def dpo_delta(e_policy_2B: torch.Tensor, e_ref_2B: torch.Tensor) -> torch.Tensor:
    """Δ [B] = (e_θ(w) − e_ref(w)) − (e_θ(l) − e_ref(l)) from per-sample errors [2B] = [winners; losers]."""
    d_2B = e_policy_2B - e_ref_2B
    b = d_2B.shape[0] // 2
    return d_2B[:b] - d_2B[b:]


def flow_dpo_loss(delta_B: torch.Tensor, beta: float, weight_B: Optional[torch.Tensor] = None) -> torch.Tensor:
    """mean over pairs of −log σ(−β/2 · Δ) × weight (log 2 at Δ = 0)."""
    loss_B = -F.logsigmoid(-0.5 * beta * delta_B)
    if weight_B is not None:
        loss_B = loss_B * weight_B.to(loss_B)
    return loss_B.mean()


@torch.no_grad()
def dpo_sums(delta_B: torch.Tensor, e_policy_2B: torch.Tensor, e_ref_2B: torch.Tensor, beta: float
             ) -> Dict[str, float]:
    """Sums over one micro-batch's pairs, to be added over micro-batches and DP ranks before ``dpo_metrics``."""
    return {"pairs": float(delta_B.numel()), "correct": float((delta_B < 0).sum()),
            "margin": float((-0.5 * beta * delta_B).sum()), "kl": float((e_policy_2B - e_ref_2B).sum())}


def dpo_metrics(sums: Dict[str, float]) -> Dict[str, float]:
    """{"dpo_implicit_acc", "dpo_reward_margin", "dpo_kl_proxy"} from summed ``dpo_sums``."""
    n = max(sums["pairs"], 1.0)
    return {"dpo_implicit_acc": sums["correct"] / n, "dpo_reward_margin": sums["margin"] / n,
            "dpo_kl_proxy": sums["kl"] / (2 * n)}
