"""Bayesian attention: stochastic attention weights with a contextual Gamma prior.

Bayesian attention belief networks (Zhang, Fan, Chen, Zhou 2021, arXiv:2106.05251), in
the single-layer form of Bayesian attention modules (Fan, Zhang, Chen, Zhou 2020,
"Bayesian Attention Modules", arXiv:2010.10604, the "soft Weibull" variant).

With scores s_ij = q_i·k_j/√d and p_ij = softmax_j(s_ij) over the keys query i may see,
the unnormalised attention weights are random,

    W_ij ~ Weibull(k, λ_ij),   λ_ij = p_ij / Γ(1 + 1/k)          (so E[W_ij] = p_ij)
    W_ij = λ_ij (−log(1 − u_ij))^{1/k},   u_ij ~ U(0, 1)          (reparameterised)
    A_ij = W_ij / Σ_j' W_ij'   ⇔   A_i = softmax_j(s_ij + (1/k) log(−log(1 − u_ij)))

(worked in log space: λ comes from the log-softmax, i.e. the scores minus their row
log-sum-exp, and Γ(1 + 1/k) cancels in the normalisation). The prior is a contextual
Gamma with the key-only mean π_ij = softmax_j(w_h·k_j) (one learned vector w_h per head;
BAM uses a small MLP of the key, we use a linear map) and a fixed rate β:
W_ij ~ Gamma(α_ij = β π_ij, β). The regulariser is the closed-form KL (γ: Euler's const.)

    KL(Weibull(k, λ) ‖ Gamma(α, β)) = γα/k − α log λ + log k + βλΓ(1 + 1/k) − γ − 1
                                      − α log β + log Γ(α)

averaged over the allowed (query, key) pairs and weighted: aux_loss = kl_weight · mean KL.
In evaluation the weights are their mean, normalised: A = softmax(s), ordinary softmax
attention, deterministic.

Not an approximation: the accuracy/speed trade-off is that of softmax attention, O(L²·d)
time and O(L²) memory. ``weibull_shape`` (k) sets the noise: the weight's coefficient of
variation falls like ~1.28/k, and k → ∞ gives deterministic softmax in training too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from harness.attention import Attention, AttentionContext, allowed_mask
from harness.registry import register_mechanism

EULER_GAMMA = 0.5772156649015329


@dataclass
class BayesianConfig:
    weibull_shape: float = 10.0  # k: larger = less attention noise (k → ∞: plain softmax)
    prior_rate: float = 1.0  # β of the Gamma prior; its shape is α = β·π (π: contextual prior mean)
    kl_weight: float = 0.01  # aux_loss = kl_weight · mean KL over allowed (query, key) pairs


def weibull_gamma_kl(shape: float, log_scale: Tensor, alpha: Tensor, rate: float) -> Tensor:
    """Closed-form KL(Weibull(shape, exp(log_scale)) ‖ Gamma(alpha, rate)), elementwise.

    Weibull density (k/λ)(x/λ)^{k−1}e^{−(x/λ)^k}; Gamma density β^α x^{α−1} e^{−βx}/Γ(α)."""
    k = shape
    lgamma_1_1k = math.lgamma(1.0 + 1.0 / k)
    return (
        EULER_GAMMA * alpha / k
        - alpha * log_scale
        + math.log(k)
        + rate * torch.exp(log_scale + lgamma_1_1k)
        - EULER_GAMMA
        - 1.0
        - alpha * math.log(rate)
        + torch.lgamma(alpha)
    )


def masked_log_softmax(logits: Tensor, allowed: Tensor) -> Tensor:
    """log softmax over the allowed entries of the last dim; disallowed entries → 0 (a
    safe finite value: callers mask them out). Every row must have an allowed entry."""
    logits = logits.masked_fill(~allowed, float("-inf"))
    return torch.log_softmax(logits, dim=-1).masked_fill(~allowed, 0.0)


def weibull_noise(shape: float, like: Tensor) -> Tensor:
    """(1/k)·log(−log(1 − u)), u ~ U(0, 1): log of a unit-scale Weibull(k) draw."""
    u = torch.rand_like(like).clamp(1e-7, 1.0 - 1e-7)
    return torch.log(-torch.log1p(-u)) / shape


def bayesian_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    prior_logits: Tensor,
    *,
    allowed: Tensor,
    shape: float,
    rate: float,
    sample: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """q: (B, H, Lq, D), k/v: (B, H, Lk, D), prior_logits: (B, H, 1, Lk), allowed: bool
    broadcastable to (B, H, Lq, Lk) -> out (B, H, Lq, D), KL (B, H, Lq, Lk) (0 where not
    allowed), allowed expanded to (B, H, Lq, Lk). Rows with no allowed key give 0."""
    scores = torch.einsum("bhid,bhjd->bhij", q, k).float() / math.sqrt(q.shape[-1])  # (B, H, Lq, Lk)
    allowed = allowed.expand_as(scores)
    empty = ~allowed.any(-1, keepdim=True)  # (B, H, Lq, 1)
    usable = allowed | empty  # empty rows see every key (finite), zeroed at the end
    log_p = masked_log_softmax(scores, usable)  # log E[W] = log p
    log_pi = masked_log_softmax(prior_logits.float().expand_as(scores), usable)
    log_lam = log_p - math.lgamma(1.0 + 1.0 / shape)  # Weibull scale λ = p / Γ(1 + 1/k)
    kl = weibull_gamma_kl(shape, log_lam, rate * log_pi.exp(), rate).masked_fill(~allowed, 0.0)
    logits = log_p + weibull_noise(shape, log_p) if sample else log_p
    weights = torch.softmax(logits.masked_fill(~usable, float("-inf")), dim=-1).masked_fill(~allowed, 0.0)
    out = torch.einsum("bhij,bhjd->bhid", weights.to(v.dtype), v)
    return out, kl, allowed


@register_mechanism("bayesian", BayesianConfig, causal=True, cross=True, key_padding=True)
class BayesianAttention(Attention):
    """Bayesian attention (Fan et al. 2020; Zhang et al. 2021): Weibull attention weights, Gamma prior, KL aux loss."""

    def __init__(self, cfg: BayesianConfig, *, heads: int, dim_head: int, max_len: int):
        super().__init__(cfg, heads=heads, dim_head=dim_head, max_len=max_len)
        if cfg.weibull_shape <= 0 or cfg.prior_rate <= 0 or cfg.kl_weight < 0:
            raise ValueError(
                f"bayesian needs weibull_shape > 0, prior_rate > 0, kl_weight >= 0; got {cfg}"
            )
        # contextual prior: π_ij = softmax_j(w_h · k_j); zero init = uniform prior over keys
        self.prior_proj = nn.Parameter(torch.zeros(heads, dim_head))
        self._last_kl: Tensor | None = None  # kept as a tensor: no device sync per step

    def forward(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        key_padding_mask: Tensor | None = None,
        causal: bool = False,
        context: AttentionContext | None = None,
    ) -> Tensor:
        lq, lk = q.shape[-2], k.shape[-2]
        allowed = allowed_mask(lq, lk, key_padding_mask=key_padding_mask, causal=causal, device=q.device)
        if allowed is None:
            allowed = torch.ones(1, 1, lq, lk, dtype=torch.bool, device=q.device)
        prior_logits = torch.einsum("bhjd,hd->bhj", k.float(), self.prior_proj.float())[:, :, None, :]
        out, kl, allowed = bayesian_attention(
            q, k, v, prior_logits, allowed=allowed, shape=self.cfg.weibull_shape,
            rate=self.cfg.prior_rate, sample=self.training,
        )
        mean_kl = kl.sum() / allowed.sum().clamp_min(1)
        self._last_kl = mean_kl.detach()
        self.aux_loss = self.cfg.kl_weight * mean_kl
        return out.to(q.dtype)

    def metrics(self) -> dict[str, float]:
        return {} if self._last_kl is None else {"kl": float(self._last_kl)}
