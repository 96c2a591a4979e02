"""Bayesian Attention Belief Networks (BABN): a gamma belief network over the attention weights.

Zhang, Fan, Chen & Zhou 2021, "Bayesian Attention Belief Networks", ICML, arXiv:2106.05251.

What is the paper's (its abstract, the only text of it we could find: no authors' code is
published, zhougroup/BAM holds only BAM): the *decoder* models the unnormalised attention
weights with a hierarchy of gamma distributions; the *encoder* stacks Weibull distributions
in a deterministic-upward-stochastic-downward structure to approximate the posterior; the
two are trained with a variational lower bound; any deterministic attention, pretrained
ones included, converts to it. What is BAM's (Fan et al. 2020, ``bam``, same authors): the
Weibull posterior whose mean is the softmax, W ~ Weibull(k, p/Γ(1+1/k)), its reparameterised
draw, a fixed shape k, the contextual gamma prior Gamma(β π, β) with π = softmax_j(g(k_j)),
g the key MLP of zhougroup/BAM, and the closed-form KL. What is WHAI's (Zhang, Chen, Guo &
Zhou 2018, ICLR, arXiv:1803.01328; code read: BoChenGroup/PyDPM ``pydpm/_model/_whai.py``):
the hierarchy θ_l ~ Gamma(Φ_{l+1} θ_{l+1}, 1/c_{l+1}) with the top layer's prior fixed, the
upward deterministic states h_l computed from h_{l−1}, Weibull(k_l, λ_l) posteriors drawn
top-down, each layer's KL taken against the gamma whose shape is built from the *sample*
of the layer above, and evaluation with every layer at its posterior mean.

OUR READING (labelled so; not the paper's equations), for T = ``num_layers`` layers over
the allowed (query i, key j) pairs, s_ij = q_i·k_j/√d, c = log Γ(1 + 1/k):

    upward      h_l,ij = log softmax_j(τ̄_l s_ij),    τ̄_1 = 1,  τ̄_l = τ_2⋯τ_l  (learned per head)
    top         log λ_T = h_T − c
    downward    log λ_l = (1 − ω_l) h_l + ω_l log W_{l+1} − c,   ω_l = σ(learned, per head)
    sample      W_l = λ_l (−log(1 − u_l))^{1/k}           (training; evaluation: W_l = E = λ_l e^c)
    attention   A_ij = W_1,ij / Σ_j' W_1,ij'
    prior       W_T ~ Gamma(β π_ij, β),   W_l | W_{l+1} ~ Gamma(β W_{l+1,ij}, β)   (mean W_{l+1})
    aux_loss    kl_weight · Σ_l mean_{allowed ij} KL(Weibull(k, λ_l) ‖ Gamma(α_l, β))

(Φ of the GBN is the identity here: every layer lives on the same (i, j) pairs, so layer
l's gamma shape is β times the layer above's weight. The downward λ_l is a per-head
geometric mix of the upward state and the layer above's sample, WHAI's "from h_l and the
layer above" with the smallest learnable f.) With τ_l = 1 (the init) the evaluation output
is exactly softmax attention at any depth, and one layer is exactly BAM; k → ∞ gives
softmax in training too. The KL is BAM's closed form (γ: Euler's constant)

    KL(Weibull(k, λ) ‖ Gamma(α, β)) = γα/k − α log λ + log k + βλΓ(1 + 1/k) − γ − 1
                                      − α log β + log Γ(α).

Cost: O(T·L²) elementwise and O(L²·d) matmul time, like softmax attention; memory O(L·d)
kept for backward plus one query block. ``babn_attention`` processes queries in blocks,
each block checkpointed (recomputed in backward, its T noise draws replayed from a per-block
seed); no (T, L, L) stack and no (L, L) tensor is kept. Without causal masking the top
prior π is the same for every row, so its Σ_j log Γ(β π_j) is summed once per (b, h) (as in
BAM). ``babn_reference`` is the plain formula over every pair, the float64 reference of the
tests. Each layer adds per-pair work (a uniform draw, its logs, a row log-sum-exp, and the
KL's exp and log Γ, which the checkpoint runs twice), so on CPU a training step costs several
times softmax's: the ratios measured are in the report of this mechanism's commit.

Deviations from the references: fixed Weibull shape k (WHAI infers k_l per unit; BAM fixes
it); the layer-l KL uses one sample of the layer above (as WHAI); KL averaged over allowed
pairs and summed over layers (the references sum over entries); the top prior and every
softmax are normalised over the keys a query may see (causal rows separately); no ``eps``
inside logarithms (log space); in evaluation the KL (only logged) uses the means.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from harness.core import Attention, AttentionContext, register_mechanism
from mechanisms.bam import EULER_GAMMA, _block_mask, key_prior_logits, weibull_gamma_kl


@dataclass
class BABNConfig:
    num_layers: int = 2  # T: layers of the gamma belief network over the attention weights (1 = BAM)
    weibull_shape: float = 10.0  # k: larger = less attention noise (k → ∞: deterministic)
    prior_rate: float = 1.0  # β: every layer's gamma rate; its shape is β × (the layer above's weight)
    prior_hidden: int = 10  # hidden width of the top prior's key MLP (BAM's att_se_hid_size)
    kl_weight: float = 0.01  # aux_loss = kl_weight · Σ_layers mean KL over allowed (query, key) pairs
    query_block: int = 0  # queries per block of the fast path; 0 = auto (about 1M scores per block)


# ----------------------------------------------------------------------------- the formula


def babn_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    prior_logits: Tensor,
    temperatures: Tensor,
    gates: Tensor,
    *,
    allowed: Tensor,
    shape: float,
    rate: float,
    noise: list[Tensor] | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The plain formula, every (i, j) pair of every layer written out (the tests' reference).

    q: (B, H, Lq, D), k/v: (B, H, Lk, D), prior_logits g(k): (B, H, Lk), temperatures τ̄:
    (T, H) (row 0 unused: τ̄_1 = 1), gates ω: (T−1, H), allowed: bool broadcastable to (B, H, Lq, Lk),
    noise: T tensors log(−log(1−u_l)) of (B, H, Lq, Lk), bottom layer first, or None (the means).
    Returns out (B, H, Lq, D) (0 for a query with no allowed key), KL per layer summed over
    allowed pairs (T,), bottom layer first, and the number of allowed pairs."""
    n_layers = temperatures.shape[0]
    scores = torch.einsum("bhid,bhjd->bhij", q, k) / math.sqrt(q.shape[-1])  # (B, H, Lq, Lk)
    allowed = allowed.expand_as(scores)
    usable = allowed | ~allowed.any(-1, keepdim=True)  # a query with no key sees every key; zeroed below
    c = math.lgamma(1.0 + 1.0 / shape)

    def log_softmax(x: Tensor) -> Tensor:  # over the usable keys, 0 elsewhere (finite everywhere)
        return torch.log_softmax(x.masked_fill(~usable, -math.inf), -1).masked_fill(~usable, 0.0)

    upward = [
        log_softmax(scores if layer == 0 else temperatures[layer][None, :, None, None] * scores)
        for layer in range(n_layers)
    ]
    log_pi = log_softmax(prior_logits[:, :, None, :].expand_as(scores))
    kls = [scores.new_zeros(())] * n_layers
    log_w = None
    for layer in reversed(range(n_layers)):
        if layer == n_layers - 1:
            log_lam, alpha = upward[layer] - c, rate * log_pi.exp()
        else:
            w = gates[layer][None, :, None, None]
            log_lam, alpha = (1 - w) * upward[layer] + w * log_w - c, rate * log_w.exp()
        kl = weibull_gamma_kl(shape, log_lam, torch.where(allowed, alpha, 1.0), rate)
        kls[layer] = kl.masked_fill(~allowed, 0.0).sum()
        log_w = log_lam + (c if noise is None else noise[layer] / shape)  # log E[W_l] or log of the draw
    weights = torch.softmax(log_w.masked_fill(~usable, -math.inf), -1).masked_fill(~allowed, 0.0)
    out = torch.einsum("bhij,bhjd->bhid", weights, v)
    return out, torch.stack(kls), allowed.sum()


# ----------------------------------------------------------------------------- the fast path


def layer_noise(like: Tensor, seed: int, num_layers: int) -> list[Tensor]:
    """The T draws log(−log u) for one query block from its own seeded generator, drawn top
    layer first (so the backward recomputation redraws the same); returned bottom layer first."""
    gen = torch.Generator(device=like.device).manual_seed(seed)
    draws = []
    for _ in range(num_layers):
        u = torch.empty(like.shape, dtype=like.dtype, device=like.device).uniform_(2.0**-24, 1.0, generator=gen)
        draws.append(u.log_().neg_().log_())
    return draws[::-1]


def _babn_block(
    qb: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    temperatures: Tensor,
    gates: Tensor,
    keep_key: Tensor | None,
    rows: slice,
    lq: int,
    causal: bool,
    shape: float,
    rate: float,
    seed: int | None,
) -> tuple[Tensor, Tensor]:
    """One block of queries rows: qb (B, H, bq, D) -> out (B, H, bq, D), KL per layer (T,).
    g: (B, H, Lk) prior logits (causal), or (B, H, Lk) log π already normalised over the kept
    keys (non-causal: the same for every row), whose Σ_j log Γ(β π_j) the caller adds."""
    n_layers = temperatures.shape[0]
    lk = k.shape[-2]
    usable = _block_mask(rows, lq, lk, keep_key, causal, qb.device)  # (B|1, 1, bq, Lk) or None
    allowed = _block_mask(rows, lq, lk, keep_key, causal, qb.device, open_empty=False)
    s = torch.matmul(qb, k.transpose(-1, -2)) * qb.shape[-1] ** -0.5  # (B, H, bq, Lk)
    c = math.lgamma(1.0 + 1.0 / shape)

    def log_softmax(x: Tensor) -> Tensor:
        if usable is None:
            return x - torch.logsumexp(x, -1, keepdim=True)
        x = x.masked_fill(~usable, -math.inf)
        return (x - torch.logsumexp(x, -1, keepdim=True)).masked_fill(~usable, 0.0)

    def kl_sum(log_lam: Tensor, alpha: Tensor, with_lgamma: bool = True) -> Tensor:
        # the closed form (module docstring); log Γ(α) left out where the caller sums it per row
        kl = (EULER_GAMMA / shape - math.log(rate)) * alpha - alpha * log_lam + rate * torch.exp(log_lam + c)
        if with_lgamma:
            kl = kl + torch.lgamma(alpha if allowed is None else torch.where(allowed, alpha, 1.0))
        if allowed is not None:
            kl = kl.masked_fill(~allowed, 0.0)
        pairs = kl.numel() if allowed is None else allowed.expand_as(kl).sum().to(kl.dtype)
        return kl.sum() + (math.log(shape) - EULER_GAMMA - 1.0) * pairs

    noise = layer_noise(s, seed, n_layers) if seed is not None else None
    kls = []
    log_w = None
    for layer in reversed(range(n_layers)):
        h = log_softmax(s if layer == 0 else s * temperatures[layer][None, :, None, None])  # upward state h_l
        if layer == n_layers - 1:
            log_lam = h - c
            if causal:  # contextual prior β π, π normalised over the keys each row may see
                kls.append(kl_sum(log_lam, rate * torch.exp(log_softmax(g[:, :, None, :].expand_as(s)))))
            else:
                kls.append(kl_sum(log_lam, rate * torch.exp(g[:, :, None, :]).expand_as(s), with_lgamma=False))
        else:
            w = gates[layer][None, :, None, None]
            log_lam = torch.lerp(h, log_w, w) - c  # (1 − ω) h_l + ω log W_{l+1} − c
            kls.append(kl_sum(log_lam, rate * torch.exp(log_w)))
        log_w = log_lam + (c if noise is None else noise[layer] / shape)
    if usable is not None:
        log_w = log_w.masked_fill(~usable, -math.inf)
    a = torch.softmax(log_w, -1)
    if allowed is not None:
        a = a.masked_fill(~allowed, 0.0)
    return torch.matmul(a, v), torch.stack(kls[::-1])


def _allowed_per_row(b: int, lq: int, lk: int, key_padding_mask: Tensor | None, causal: bool, device) -> Tensor:
    """(B, 1, Lq) number of keys each query may see, without the (Lq, Lk) mask."""
    if key_padding_mask is None:
        keep = torch.ones(b, lk, dtype=torch.long, device=device)
    else:
        keep = (~key_padding_mask.bool()).long()
    prefix = torch.cumsum(keep, -1)  # (B, Lk)
    if not causal:
        return prefix[:, -1:, None].expand(b, 1, lq) if lk else torch.zeros(b, 1, lq, dtype=torch.long, device=device)
    last = torch.arange(lq, device=device) + (lk - lq)  # the last key row i may see
    return torch.where(last >= 0, prefix[:, last.clamp(0, max(lk - 1, 0))], 0)[:, None, :]


def babn_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    prior_logits: Tensor,
    temperatures: Tensor,
    gates: Tensor,
    *,
    key_padding_mask: Tensor | None,
    causal: bool,
    shape: float,
    rate: float,
    sample: bool,
    query_block: int = 0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Same maths and outputs as ``babn_reference`` (noise drawn inside, per query block), with
    no (Lq, Lk) tensor kept for backward. Float32 inside (float64 stays). Returns out
    (B, H, Lq, D), KL per layer summed over allowed pairs (T,), allowed pairs."""
    b, h, lq, _ = q.shape
    lk = k.shape[-2]
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    q, k, v, g = q.to(work), k.to(work), v.to(work), prior_logits.to(work)
    temperatures, gates = temperatures.to(work), gates.to(work)
    keep_key = None if key_padding_mask is None else ~key_padding_mask.bool()
    n_row = _allowed_per_row(b, lq, lk, key_padding_mask, causal, q.device)  # (B, 1, Lq)

    top_lgamma = None
    if not causal:  # π is the same for every row: log π over the kept keys, Σ_j log Γ(β π_j) once per (b, h)
        kept = torch.ones(b, 1, lk, dtype=torch.bool, device=q.device) if keep_key is None else keep_key[:, None, :]
        g = torch.log_softmax(g.masked_fill(~kept, -math.inf), -1).masked_fill(~kept, 0.0)
        per_row = torch.where(kept, torch.lgamma(torch.where(kept, rate * g.exp(), 1.0)), 0.0).sum(-1)  # (B, H)
        top_lgamma = (per_row * (n_row[:, 0, :] > 0).sum(-1, keepdim=True)).sum()

    bq = query_block or max(16, min(lq, 2**20 // max(1, b * h * lk)))
    base_seed = int(torch.randint(0, 2**62, (1,)).item()) if sample else None  # from the global RNG
    recompute = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v, g, temperatures, gates))
    outs, kls = [], []
    for n, start in enumerate(range(0, lq, bq)):
        rows = slice(start, min(start + bq, lq))
        args = (
            q[:, :, rows],
            k,
            v,
            g,
            temperatures,
            gates,
            keep_key,
            rows,
            lq,
            causal,
            shape,
            rate,
            None if base_seed is None else base_seed + n,
        )
        ob, kb = checkpoint(_babn_block, *args, use_reentrant=False) if recompute else _babn_block(*args)
        outs.append(ob)
        kls.append(kb)
    out = torch.cat(outs, 2).masked_fill((n_row == 0)[..., None], 0.0)  # (B, H, Lq, D)
    kl = torch.stack(kls).sum(0)
    if top_lgamma is not None:
        kl = kl + F.one_hot(torch.tensor(kl.shape[0] - 1), kl.shape[0]).to(kl) * top_lgamma
    return out, kl, n_row.sum() * h


@register_mechanism("babn", BABNConfig, causal=True, cross=True, key_padding=True, family="full")
class BABN(Attention):
    """Bayesian attention belief networks (Zhang et al. 2021): gamma hierarchy, Weibull up-down encoder."""

    def __init__(self, cfg: BABNConfig, *, heads: int, dim_head: int, max_len: int):
        super().__init__(cfg, heads=heads, dim_head=dim_head, max_len=max_len)
        if (
            cfg.num_layers < 1
            or cfg.weibull_shape <= 0
            or cfg.prior_rate <= 0
            or cfg.kl_weight < 0
            or cfg.prior_hidden < 1
            or cfg.query_block < 0
        ):
            raise ValueError(
                "babn needs num_layers >= 1, weibull_shape > 0, prior_rate > 0, kl_weight >= 0, prior_hidden >= 1, "
                f"query_block >= 0; got {cfg}"
            )
        t = cfg.num_layers
        # upward temperatures τ_2..τ_T and downward gates ω_1..ω_{T−1}, per head; the init
        # (τ = 1, ω = ½) makes the evaluation output exactly softmax attention
        self.log_temperature = nn.Parameter(torch.zeros(t - 1, heads))
        self.gate_logit = nn.Parameter(torch.zeros(t - 1, heads))
        # contextual prior of the top layer g(k_j): BAM's key MLP, shared by the heads, its init
        self.prior_in = nn.Linear(dim_head, cfg.prior_hidden)
        self.prior_out = nn.Linear(cfg.prior_hidden, 1)
        nn.init.normal_(self.prior_in.weight, 0.0, math.sqrt(1.0 / dim_head))
        nn.init.normal_(self.prior_out.weight, 0.0, math.sqrt(1.0 / cfg.prior_hidden))
        self._last_kl: Tensor | None = None  # (T,) mean KL per layer, kept as a tensor: no sync per step

    def temperatures(self) -> Tensor:
        """τ̄: (T, H), cumulative upward temperatures, τ̄_1 = 1."""
        log_t = torch.cat([self.log_temperature.new_zeros(1, self.heads), self.log_temperature], 0)
        return torch.exp(torch.cumsum(log_t, 0))

    def gates(self) -> Tensor:
        """ω: (T−1, H), the weight of the layer above's sample in each layer's Weibull scale."""
        return torch.sigmoid(self.gate_logit)

    def prior_logits(self, k: Tensor) -> Tensor:
        """k: (B, H, Lk, D) -> g(k): (B, H, Lk), the top layer's contextual prior logits."""
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
            out, kl_sums, n_pairs = babn_attention(
                q,
                k,
                v,
                self.prior_logits(k),
                self.temperatures(),
                self.gates(),
                key_padding_mask=key_padding_mask,
                causal=causal,
                shape=self.cfg.weibull_shape,
                rate=self.cfg.prior_rate,
                sample=self.training,
                query_block=self.cfg.query_block,
            )
        mean_kl = kl_sums / n_pairs.clamp_min(1)  # (T,)
        self._last_kl = mean_kl.detach()
        self.aux_loss = self.cfg.kl_weight * mean_kl.sum()
        return out.to(q.dtype)

    def metrics(self) -> dict[str, float]:
        if self._last_kl is None:
            return {}
        kl = self._last_kl.tolist()
        return {"kl": sum(kl), **{f"kl_layer{layer + 1}": x for layer, x in enumerate(kl)}}
