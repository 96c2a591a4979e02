"""Bayesian Attention Modules (BAM): Weibull attention weights with a contextual gamma prior.

Fan, Zhang, Chen & Zhou 2020, "Bayesian Attention Modules", NeurIPS, arXiv:2010.10604, the
"soft Weibull" variant; reference code zhougroup/BAM (``transformers-master/src/transformers/
modeling_albert.py``, ``AlbertAttention`` with ``att_type='soft_weibull'``,
``att_prior_type='contextual'``; the attentive neural process ``Attention`` class for the
same formula). The hierarchical successor, Bayesian attention belief networks, is ``babn``.

With scores s_ij = q_i·k_j/√d and p_ij = softmax_j(s_ij) over the keys query i may see,
the unnormalised attention weights are random,

    W_ij ~ Weibull(k, λ_ij),   λ_ij = p_ij / Γ(1 + 1/k)          (so E[W_ij] = p_ij)
    W_ij = λ_ij (−log(1 − u_ij))^{1/k},   u_ij ~ U(0, 1)          (reparameterised)
    A_ij = W_ij / Σ_j' W_ij'   ⇔   A_i = softmax_j(s_ij + (1/k) log(−log(1 − u_ij)))

(Γ(1 + 1/k) and the row log-sum-exp cancel in the normalisation). The prior is the paper's
contextual gamma: W_ij ~ Gamma(α_ij = β π_ij, β), π_ij = softmax_j(g(k_j)) over the keys
query i may see, g a small MLP of the key shared by the heads (Linear(d, 10) → LeakyReLU(0.1)
→ Linear(10, 1), the reference's ``se_linear1/se_nonlinear/se_linear2``). The regulariser
is the closed-form KL (γ: Euler's constant)

    KL(Weibull(k, λ) ‖ Gamma(α, β)) = γα/k − α log λ + log k + βλΓ(1 + 1/k) − γ − 1
                                      − α log β + log Γ(α)

and aux_loss = kl_weight · (mean KL over the allowed (query, key) pairs). In evaluation the
weights are their mean, normalised: A = softmax(s), ordinary softmax attention.

Cost: O(L²·d) time as softmax attention. The fast path (``bam_attention``) never keeps an
(L, L) tensor for backward: queries are processed in blocks, each block recomputed in the
backward pass (``torch.utils.checkpoint``, which replays the random draws), and the KL is
summed per row in closed form from the row log-sum-exp and O(L·d) prefix sums (only its
log Γ(α) term needs every (i, j) pair, and only with causal masking). ``bam_reference`` is
the plain formula, the float64 reference of the tests. ``weibull_shape`` (k) sets the
noise: the weight's coefficient of variation falls like ~1.28/k; k → ∞ gives softmax.

Deviations from the reference code: the KL is averaged over allowed (query, key) pairs
(the reference averages over every entry, masked ones included), its constant terms are
kept (they do not change gradients), the prior is normalised over the keys a query may see
(with causal masking that is a per-row normalisation; the reference has no causal case),
and no ``eps`` is added inside logarithms (we work in log space).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from harness.core import Attention, AttentionContext, register_mechanism

EULER_GAMMA = 0.5772156649015329


@dataclass
class BAMConfig:
    weibull_shape: float = 10.0  # k: larger = less attention noise (k → ∞: plain softmax)
    prior_rate: float = 1.0  # β of the gamma prior; its shape is α = β·π (π: contextual prior mean)
    prior_hidden: int = 10  # hidden width of the prior's key MLP (reference: att_se_hid_size)
    kl_weight: float = 0.01  # aux_loss = kl_weight · mean KL over allowed (query, key) pairs
    query_block: int = 0  # queries per block of the fast path; 0 = auto (about 2M scores per block)


# ----------------------------------------------------------------------------- the formula


def weibull_gamma_kl(shape: float, log_scale: Tensor, alpha: Tensor, rate: float) -> Tensor:
    """Closed-form KL(Weibull(shape, exp(log_scale)) ‖ Gamma(alpha, rate)), elementwise.

    Weibull density (k/λ)(x/λ)^{k−1}e^{−(x/λ)^k}; gamma density β^α x^{α−1} e^{−βx}/Γ(α)."""
    k = shape
    return (
        EULER_GAMMA * alpha / k
        - alpha * log_scale
        + math.log(k)
        + rate * torch.exp(log_scale + math.lgamma(1.0 + 1.0 / k))
        - EULER_GAMMA
        - 1.0
        - alpha * math.log(rate)
        + torch.lgamma(alpha)
    )


def bam_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    prior_logits: Tensor,
    *,
    allowed: Tensor,
    shape: float,
    rate: float,
    noise: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The plain formula, every (i, j) pair written out (the tests' reference, any dtype).

    q: (B, H, Lq, D), k/v: (B, H, Lk, D), prior_logits: (B, H, Lk), allowed: bool broadcastable
    to (B, H, Lq, Lk), noise: ε (B, H, Lq, Lk) or None (evaluation: the mean weights).
    Returns out (B, H, Lq, D) (0 for a query with no allowed key), the KL summed over allowed
    pairs (scalar) and the number of allowed pairs."""
    scores = torch.einsum("bhid,bhjd->bhij", q, k) / math.sqrt(q.shape[-1])  # (B, H, Lq, Lk)
    allowed = allowed.expand_as(scores)
    empty = ~allowed.any(-1, keepdim=True)
    usable = allowed | empty  # a query with no key sees every key (finite), zeroed below
    log_p = torch.log_softmax(scores.masked_fill(~usable, -math.inf), -1)
    pi = torch.softmax(prior_logits[:, :, None, :].expand_as(scores).masked_fill(~usable, -math.inf), -1)
    log_lam = log_p - math.lgamma(1.0 + 1.0 / shape)  # log λ = log p − log Γ(1 + 1/k)
    alpha = torch.where(allowed, rate * pi, 1.0)  # 1 off the allowed pairs: no inf, no NaN gradient
    kl = weibull_gamma_kl(shape, log_lam.masked_fill(~usable, 0.0), alpha, rate)
    log_w = log_lam if noise is None else log_lam + noise / shape  # log W (sampled) or log E[W]·const
    weights = torch.softmax(log_w.masked_fill(~usable, -math.inf), -1).masked_fill(~allowed, 0.0)
    out = torch.einsum("bhij,bhjd->bhid", weights, v)
    return out, kl.masked_fill(~allowed, 0.0).sum(), allowed.sum()


# ----------------------------------------------------------------------------- the fast path


def _block_mask(
    rows: slice, lq: int, lk: int, keep_key: Tensor | None, causal: bool, device, open_empty: bool = True
) -> Tensor | None:
    """(B|1, 1, bq, Lk) bool, True = may attend, for query rows ``rows``; with ``open_empty`` a
    row with no allowed key is opened to every key (finite arithmetic; the caller zeroes it)."""
    mask = None
    if causal:
        i = torch.arange(rows.start, rows.stop, device=device)[:, None]
        mask = (torch.arange(lk, device=device)[None, :] <= i + (lk - lq))[None, None]
    if keep_key is not None:
        mask = keep_key[:, None, None, :] if mask is None else mask & keep_key[:, None, None, :]
    if mask is None or not open_empty:
        return mask
    return mask | ~mask.any(-1, keepdim=True)


def _block_noise(like: Tensor, seed: int) -> Tensor:
    """ε for one block from its own seeded generator, so the backward pass redraws the same."""
    gen = torch.Generator(device=like.device).manual_seed(seed)
    u = torch.empty(like.shape, dtype=like.dtype, device=like.device).uniform_(2.0**-24, 1.0, generator=gen)
    return u.log_().neg_().log_()  # log(−log u)


class _SampledAttentionBlock(torch.autograd.Function):
    """One block of queries: out = softmax(s + ε/k) v and the clean row log-sum-exp of s, where
    s = q kᵀ/√d. Saves only q, k, v, out and two (B, H, bq) vectors; the backward pass
    recomputes s and redraws ε (flash-attention style: rowsum(dA ⊙ A) = rowsum(g ⊙ out))."""

    @staticmethod
    def forward(ctx, qb, k, v, keep_key, rows, lq, causal, inv_shape, seed):
        scale = qb.shape[-1] ** -0.5
        mask = _block_mask(rows, lq, k.shape[-2], keep_key, causal, qb.device)
        s = torch.matmul(qb, k.transpose(-1, -2)).mul_(scale)  # (B, H, bq, Lk)
        if mask is not None:
            s.masked_fill_(~mask, -math.inf)
        lse_clean = torch.logsumexp(s, -1, keepdim=True)  # (B, H, bq, 1)
        if seed is not None:
            s.add_(_block_noise(s, seed).mul_(inv_shape))
            lse = torch.logsumexp(s, -1, keepdim=True)
        else:
            lse = lse_clean
        out = torch.matmul(s.sub_(lse).exp_(), v)  # (B, H, bq, D)
        ctx.save_for_backward(qb, k, v, keep_key, out, lse, lse_clean)
        ctx.args = (rows, lq, causal, inv_shape, seed, scale)
        return out, lse_clean.squeeze(-1)

    @staticmethod
    def backward(ctx, g_out, g_lse):
        qb, k, v, keep_key, out, lse, lse_clean = ctx.saved_tensors
        rows, lq, causal, inv_shape, seed, scale = ctx.args
        mask = _block_mask(rows, lq, k.shape[-2], keep_key, causal, qb.device)
        s = torch.matmul(qb, k.transpose(-1, -2)).mul_(scale)
        if mask is not None:
            s.masked_fill_(~mask, -math.inf)
        p_clean = torch.exp(s - lse_clean) if g_lse is not None else None
        if seed is not None:
            s.add_(_block_noise(s, seed).mul_(inv_shape))
        a = s.sub_(lse).exp_()  # the sampled weights A (B, H, bq, Lk)
        dv = torch.matmul(a.transpose(-1, -2), g_out)
        da = torch.matmul(g_out, v.transpose(-1, -2))
        ds = a.mul_(da.sub_((g_out * out).sum(-1, keepdim=True)))
        if p_clean is not None:
            ds.add_(p_clean.mul_(g_lse[..., None]))
        ds.mul_(scale)
        return torch.matmul(ds, k), torch.matmul(ds.transpose(-1, -2), qb), dv, None, None, None, None, None, None


def _causal_lgamma_block(log_w: Tensor, log_z_rows: Tensor, keep: Tensor, rate: float) -> Tensor:
    """Σ_j log Γ(β π_ij) over allowed j for a block of rows: log_w (B, H, 1, Lk), log_z_rows
    (B, H, bq, 1), keep (B|1, 1, bq, Lk) -> (B, H, bq)."""
    alpha = torch.where(keep, rate * torch.exp((log_w - log_z_rows).clamp_max(0.0)), 1.0)  # 1: no NaN gradient
    return torch.where(keep, torch.lgamma(alpha), 0.0).sum(-1)


def bam_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    prior_logits: Tensor,
    *,
    key_padding_mask: Tensor | None,
    causal: bool,
    shape: float,
    rate: float,
    sample: bool,
    query_block: int = 0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Same maths and outputs as ``bam_reference`` (noise drawn inside, per query block), with no
    (Lq, Lk) tensor kept for backward. q: (B, H, Lq, D), k/v: (B, H, Lk, D), prior_logits:
    (B, H, Lk). Float32 inside (autocast off). Returns out, KL sum (scalar), allowed pairs."""
    b, h, lq, d = q.shape
    lk = k.shape[-2]
    work = torch.float64 if q.dtype == torch.float64 else torch.float32  # float64 stays (tests)
    q, k, v, g = q.to(work), k.to(work), v.to(work), prior_logits.to(work)
    offset = lk - lq
    keep_key = (
        torch.ones(b, lk, dtype=torch.bool, device=q.device) if key_padding_mask is None else ~key_padding_mask.bool()
    )
    # allowed keys per row, (B, 1, Lq), without building the (Lq, Lk) mask
    kept_prefix = torch.cumsum(keep_key.long(), -1)  # (B, Lk)
    if causal:
        last = torch.arange(lq, device=q.device) + offset  # the last key row i may see
        n_row = torch.where(last >= 0, kept_prefix[:, last.clamp(0, lk - 1)], 0)[:, None, :]
    else:
        n_row = kept_prefix[:, -1:, None].expand(b, 1, lq) if lk else torch.zeros(b, 1, lq, dtype=torch.long)
    empty = n_row == 0

    bq = query_block or max(16, min(lq, 2**21 // max(1, b * h * lk)))
    base_seed = int(torch.randint(0, 2**62, (1,)).item()) if sample else None  # from the global RNG
    keep_arg = None if key_padding_mask is None else keep_key
    outs, lses = [], []
    for n, start in enumerate(range(0, lq, bq)):
        rows = slice(start, min(start + bq, lq))
        seed = None if base_seed is None else base_seed + n
        ob, lb = _SampledAttentionBlock.apply(q[:, :, rows], k, v, keep_arg, rows, lq, causal, 1.0 / shape, seed)
        outs.append(ob)
        lses.append(lb)
    out = torch.cat(outs, 2).masked_fill(empty[..., None], 0.0)  # (B, H, Lq, D)
    lse = torch.cat(lses, 2)  # (B, H, Lq)

    # KL per row in closed form (module docstring): with π_ij over the allowed keys of row i,
    # Σ_j KL_ij = γβ/k − β(S_i − lse_i − c) + n_i(log k − γ − 1) + β − β log β + Σ_j log Γ(β π_ij),
    # S_i = Σ_j π_ij s_ij = q_i · (Σ_j π_ij k_j)/√d, c = log Γ(1 + 1/k).
    log_w = g.masked_fill(~keep_key[:, None, :], -math.inf)  # (B, H, Lk) unnormalised log prior
    gmax = log_w.amax(-1, keepdim=True).clamp_min(-1e30)
    w = torch.exp(log_w - gmax).double()  # (B, H, Lk), padded keys 0
    if causal:  # prefix sums over keys; row i sees keys j <= i + offset
        idx = (torch.arange(lq, device=q.device) + offset).clamp(0, lk - 1)
        z = torch.cumsum(w, -1)[..., idx]  # (B, H, Lq)
        kbar = torch.cumsum(w[..., None] * k.double(), -2)[:, :, idx]  # (B, H, Lq, D)
    else:
        z = w.sum(-1, keepdim=True).expand(b, h, lq)
        kbar = (w[..., None] * k.double()).sum(-2, keepdim=True).expand(b, h, lq, d)
    z = z.clamp_min(1e-300)
    s_bar = (q.double() * kbar).sum(-1) / z / math.sqrt(d)  # (B, H, Lq)
    log_z = torch.log(z) + gmax.double()  # (B, H, Lq)
    if causal:
        sums = []
        for start in range(0, lq, bq):
            rows = slice(start, min(start + bq, lq))
            args = (
                log_w[:, :, None, :],
                log_z[:, :, rows, None].to(work),
                _block_mask(rows, lq, lk, keep_key, True, q.device, open_empty=False),
                rate,
            )
            sums.append(
                checkpoint(_causal_lgamma_block, *args, use_reentrant=False)
                if torch.is_grad_enabled()
                else _causal_lgamma_block(*args)
            )
        lgamma_alpha = torch.cat(sums, -1).double()  # (B, H, Lq)
    else:
        kept = keep_key[:, None, :]
        alpha = torch.where(kept, rate * torch.exp(log_w.double() - log_z[..., :1]), 1.0)  # (B, H, Lk)
        lgamma_alpha = torch.where(kept, torch.lgamma(alpha), 0.0).sum(-1, keepdim=True)
    c = math.lgamma(1.0 + 1.0 / shape)
    beta = rate
    row_kl = (
        EULER_GAMMA * beta / shape
        - beta * (s_bar - lse.double() - c)
        + n_row.double() * (math.log(shape) - EULER_GAMMA - 1.0)
        + beta
        - beta * math.log(beta)
        + lgamma_alpha
    )
    kl_sum = row_kl.masked_fill(empty, 0.0).sum()
    n_pairs = n_row.expand(b, h, lq).sum()
    return out, kl_sum.to(work), n_pairs


def key_prior_logits(prior_in: nn.Linear, prior_out: nn.Linear, k: Tensor) -> Tensor:
    """The reference's contextual prior MLP on the keys, shared by the heads: (B, H, Lk, D) ->
    (B, H, Lk) logits, in float32 (float64 inputs stay float64)."""
    x = k if k.dtype == torch.float64 else k.float()
    return prior_out(F.leaky_relu(prior_in(x.to(prior_in.weight.dtype)), 0.1)).squeeze(-1)


@register_mechanism("bam", BAMConfig, causal=True, cross=True, key_padding=True, family="full")
class BAM(Attention):
    """Bayesian attention modules (Fan et al. 2020): Weibull attention weights, contextual gamma prior, KL aux loss."""

    def __init__(self, cfg: BAMConfig, *, heads: int, dim_head: int, max_len: int):
        super().__init__(cfg, heads=heads, dim_head=dim_head, max_len=max_len)
        if (
            cfg.weibull_shape <= 0
            or cfg.prior_rate <= 0
            or cfg.kl_weight < 0
            or cfg.prior_hidden < 1
            or cfg.query_block < 0
        ):
            raise ValueError(
                "bam needs weibull_shape > 0, prior_rate > 0, kl_weight >= 0, prior_hidden >= 1, query_block >= 0; "
                f"got {cfg}"
            )
        # contextual prior g(k_j): the reference's key MLP, shared by the heads, its init
        self.prior_in = nn.Linear(dim_head, cfg.prior_hidden)
        self.prior_out = nn.Linear(cfg.prior_hidden, 1)
        nn.init.normal_(self.prior_in.weight, 0.0, math.sqrt(1.0 / dim_head))
        nn.init.normal_(self.prior_out.weight, 0.0, math.sqrt(1.0 / cfg.prior_hidden))
        self._last_kl: Tensor | None = None  # kept as a tensor: no device sync per step

    def prior_logits(self, k: Tensor) -> Tensor:
        """k: (B, H, Lk, D) -> g(k): (B, H, Lk), the contextual prior's logits."""
        return key_prior_logits(self.prior_in, self.prior_out, k)

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
        with torch.autocast(q.device.type, enabled=False):
            out, kl_sum, n_pairs = bam_attention(
                q,
                k,
                v,
                self.prior_logits(k),
                key_padding_mask=key_padding_mask,
                causal=causal,
                shape=self.cfg.weibull_shape,
                rate=self.cfg.prior_rate,
                sample=self.training,
                query_block=self.cfg.query_block,
            )
        mean_kl = kl_sum / n_pairs.clamp_min(1)
        self._last_kl = mean_kl.detach()
        self.aux_loss = self.cfg.kl_weight * mean_kl
        return out.to(q.dtype)

    def metrics(self) -> dict[str, float]:
        return {} if self._last_kl is None else {"kl": float(self._last_kl)}
