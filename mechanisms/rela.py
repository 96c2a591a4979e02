"""Rectified Linear Attention, ReLA (Biao Zhang, Ivan Titov & Rico Sennrich 2021, "Sparse
Attention with Linear Units", EMNLP 2021, arXiv:2104.07012).

The softmax is replaced by a ReLU and the weights are not normalised; the heads are joined
and a gated RMSNorm over the whole hidden size n = H·D stabilises the output (ReLA-g):

    W_h = ReLU(Q_h K_hᵀ / √d)                  (B, H, Lq, Lk), exact zeros = sparsity
    o   = [W_1 V_1, …, W_H V_H]                (B, Lq, H·D)   heads joined
    O   = g ⊙ o / √(mean_n(o²) + ε) ⊙ σ(w ⊙ o)  g, w ∈ ℝⁿ, the gate reads o itself

The gated RMSNorm follows the authors' code (github.com/bzhangGo/zero, ``modules/rela.py``:
``dot_attention`` → ``combine_heads`` → ``gated_rms_norm``: ``scale * x * rsqrt(mean(x²) + eps)
* sigmoid(gate * x)`` over the last axis of the joined heads). Because the norm runs over all
heads, the heads are *coupled*: one head's values change every head's output scale.

``stabiliser`` picks how the output is stabilised:

* ``"gate"`` (default): ReLA-g as above, the authors' code.
* ``"init"``: ReLA-i, the paper's other stabiliser (RMSNorm without a gate, relying on a
  specialised initialisation). The authors' released code implements only the gate and the
  paper's text could not be consulted here, so this is *our reading*: the same RMSNorm over
  H·D with no gate, its gain g initialised to the constant ``init_gain`` (< 1 starts the
  attention branch small) instead of 1.
* ``"query_gate"``: this harness's earlier variant, kept for comparison (not the paper's):
  a per-head RMSNorm over D and a gate σ(q W_g + b_g) read from the query with a D×D matrix
  per head (the paper gates from the layer input, which a mechanism does not see).

Deviations from the authors' code: the gate vector w is initialised Xavier-uniform for a
vector of n entries, U(±√(3/n)) (the authors take their framework's default initialiser);
ε = ``norm_eps`` (1e-6; the authors use their framework's epsilon); masked pairs get weight 0
by masking the ReLU output (the authors multiply the logits by a 0/1 mask, the same thing);
no attention dropout (the harness has none inside mechanisms).

Masked pairs (padded keys, future keys) get weight exactly 0; a query with no positive score
(or no allowed key) mixes to 0 — ReLA heads can "switch off". Exact, O(Lq·Lk·d) time like
softmax. Fast path: ``blocked_relu_attention`` processes ``block_size`` queries at a time
and recomputes the scores in backward (a custom autograd Function), so no (Lq, Lk) tensor is
kept for backward: O(block·Lk) memory; causal blocks skip the keys they cannot see.
``relu_attention`` is the plain formula the tests compare it against in float64.
``metrics()['sparsity']`` is the share of exactly-zero weights among allowed pairs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from harness.core import Attention, AttentionContext, allowed_mask, register_mechanism, zero_padded

STABILISERS = ("gate", "init", "query_gate")


@dataclass
class ReLANormConfig:
    """The output stabiliser's settings (shared with ``rela_nystrom``)."""

    stabiliser: str = "gate"  # "gate" (ReLA-g, authors' code), "init" (ReLA-i, our reading), "query_gate" (old variant)
    norm_eps: float = 1e-6  # ε of the output RMSNorm
    init_gain: float = 0.1  # "init" only: the RMSNorm gain's initial value


@dataclass
class ReLAConfig(ReLANormConfig):
    block_size: int = 256  # queries per block of the fused path (memory O(block·Lk)); 0 = plain formula


# ----------------------------------------------------------------------------- the math


def relu_attention(
    q: Tensor, k: Tensor, v: Tensor, *, key_padding_mask: Tensor | None = None, causal: bool = False
) -> tuple[Tensor, Tensor, Tensor | None]:
    """The plain formula. q: (B, H, Lq, D), k/v: (B, H, Lk, D) -> (W V: (B, H, Lq, D),
    W: (B, H, Lq, Lk), allowed: bool broadcastable to W, or None when nothing is masked)."""
    scores = q @ k.transpose(-1, -2) * (q.shape[-1] ** -0.5)  # (B, H, Lq, Lk)
    weights = F.relu(scores)
    allowed = allowed_mask(q.shape[-2], k.shape[-2], key_padding_mask=key_padding_mask, causal=causal, device=q.device)
    if allowed is not None:
        weights = weights.masked_fill(~allowed, 0.0)
    return weights @ v, weights, allowed


def _block_weights(q_blk: Tensor, k: Tensor, start: int, causal_offset: int | None) -> Tensor:
    """ReLU weights of the query block starting at ``start``: (B, H, c, Lk'). q is pre-scaled by
    1/√d and padded keys are zero rows of k, so their score is 0 and ReLU gives them weight 0;
    the causal triangle is masked only where it cuts the block (the last c keys it sees)."""
    w = torch.relu_(q_blk @ k.transpose(-1, -2))  # (B, H, c, Lk')
    if causal_offset is not None:
        c, lk = w.shape[-2], w.shape[-1]
        first = max(0, start + causal_offset + 1)  # keys before `first` are seen by every row
        if first < lk:
            i = torch.arange(start, start + c, device=w.device)[:, None]
            j = torch.arange(first, lk, device=w.device)[None, :]
            w[..., first:].masked_fill_(j > i + causal_offset, 0.0)
    return w


class _BlockedReLUAttention(torch.autograd.Function):
    """W V over query blocks; backward recomputes each block's W (nothing (Lq, Lk) is saved).
    Inputs: q pre-scaled by 1/√d, k and v with padded rows zeroed. Also returns the number of
    non-zero weights (for the sparsity metric)."""

    @staticmethod
    def forward(ctx, q, k, v, causal, block):  # noqa: D102
        lq, lk = q.shape[-2], k.shape[-2]
        offset = lk - lq if causal else None
        out = q.new_zeros(*q.shape[:-1], v.shape[-1])
        nonzero = 0
        for s in range(0, lq, block):
            e = min(s + block, lq)
            kend = lk if offset is None else max(0, min(lk, e + offset))  # keys any query of the block sees
            if kend == 0:
                continue
            w = _block_weights(q[:, :, s:e], k[:, :, :kend], s, offset)  # (B, H, c, Lk')
            out[:, :, s:e] = w @ v[:, :, :kend]
            nonzero = nonzero + torch.count_nonzero(w)
        ctx.save_for_backward(q, k, v)
        ctx.causal, ctx.block = causal, block
        nonzero = torch.as_tensor(nonzero, dtype=torch.float64, device=q.device)
        ctx.mark_non_differentiable(nonzero)
        return out, nonzero

    @staticmethod
    def backward(ctx, grad_out, _grad_nonzero):  # noqa: D102
        q, k, v = ctx.saved_tensors
        lq, lk = q.shape[-2], k.shape[-2]
        offset = lk - lq if ctx.causal else None
        acc = torch.promote_types(q.dtype, torch.float32)  # key/value gradients summed over blocks
        dq = torch.zeros_like(q)
        dk = torch.zeros(k.shape, dtype=acc, device=k.device)
        dv = torch.zeros(v.shape, dtype=acc, device=v.device)
        grad_out = grad_out.to(v.dtype)
        for s in range(0, lq, ctx.block):
            e = min(s + ctx.block, lq)
            kend = lk if offset is None else max(0, min(lk, e + offset))
            if kend == 0:
                continue
            qb, kb, vb, gb = q[:, :, s:e], k[:, :, :kend], v[:, :, :kend], grad_out[:, :, s:e]
            w = _block_weights(qb, kb, s, offset)  # (B, H, c, Lk')
            dv[:, :, :kend] += w.transpose(-1, -2) @ gb
            ds = torch.ops.aten.threshold_backward(gb @ vb.transpose(-1, -2), w, 0)  # ReLU': 0 where w <= 0
            dq[:, :, s:e] = ds @ kb
            dk[:, :, :kend] += ds.transpose(-1, -2) @ qb
        return dq, dk.to(k.dtype), dv.to(v.dtype), None, None


def allowed_pairs(batch: int, heads: int, lq: int, lk: int, keep: Tensor | None, causal: bool) -> Tensor:
    """Number of allowed (query, key) pairs over batch and heads, in O(B·L) (no (Lq, Lk) mask)."""
    device = None if keep is None else keep.device
    keep = torch.ones(batch, lk, dtype=torch.bool, device=device) if keep is None else keep
    if not causal:
        return keep.sum(dtype=torch.float64) * lq * heads
    seen = torch.cat([keep.new_zeros(keep.shape[0], 1, dtype=torch.float64), keep.double().cumsum(-1)], -1)  # (B, Lk+1)
    last = (torch.arange(lq, device=keep.device) + (lk - lq) + 1).clamp(0, lk)  # keys visible to query i
    return seen[:, last].sum() * heads


def blocked_relu_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    key_padding_mask: Tensor | None = None,
    causal: bool = False,
    block_size: int = 256,
) -> tuple[Tensor, Tensor]:
    """Fast form of ``relu_attention``: (W V: (B, H, Lq, D), sparsity: 0-dim float64, the share
    of exactly-zero weights among allowed pairs)."""
    keep = None if key_padding_mask is None else ~key_padding_mask.bool()  # (B, Lk)
    q = q * q.shape[-1] ** -0.5
    k, v = zero_padded(k, key_padding_mask), zero_padded(v, key_padding_mask)  # padded scores are 0: ReLU -> 0
    out, nonzero = _BlockedReLUAttention.apply(q, k, v, causal, block_size)
    allowed = allowed_pairs(q.shape[0], q.shape[1], q.shape[-2], k.shape[-2], keep, causal)
    return out, torch.where(allowed > 0, 1 - nonzero / allowed.clamp_min(1), 0.0)


@torch.no_grad()
def zero_share(weights: Tensor, allowed: Tensor | None) -> Tensor:
    """Share of exactly-zero entries of weights (..., R, C) among allowed ones (a 0-dim
    tensor, so no device sync here); weights are already 0 where not allowed."""
    total = weights.numel()
    n_allowed = total if allowed is None else allowed.expand(weights.shape).sum()
    n_zero_allowed = (weights == 0).sum() - (total - n_allowed)
    return n_zero_allowed / torch.as_tensor(n_allowed, device=weights.device).clamp_min(1)


def gated_rms_norm(x: Tensor, gain: Tensor, gate: Tensor | None, eps: float) -> Tensor:
    """The authors' gated RMSNorm over the joined heads. x: (B, H, L, D); gain, gate: (H, D)
    (a vector of n = H·D entries, head-major as ``combine_heads`` lays them out) -> (B, H, L, D).

    g ⊙ x / √(mean_{H,D}(x²) + ε) ⊙ σ(w ⊙ x), in at least float32."""
    dtype = x.dtype
    x = x.to(torch.promote_types(dtype, torch.float32))
    ms = x.square().mean(dim=(1, 3), keepdim=True)  # (B, 1, L, 1): one RMS over all H·D entries
    out = x * torch.rsqrt(ms + eps) * gain[:, None, :].to(x.dtype)
    if gate is not None:
        out = out * torch.sigmoid(gate[:, None, :].to(x.dtype) * x)
    return out.to(dtype)


def query_gated_head_rms_norm(
    x: Tensor, q: Tensor, gain: Tensor, gate_weight: Tensor, gate_bias: Tensor, eps: float
) -> Tensor:
    """The earlier per-head variant: x, q: (B, H, L, D); gain, gate_bias: (H, D); gate_weight:
    (H, D, D) -> g ⊙ x / √(mean_D(x²) + ε) ⊙ σ(q W_g + b_g), per head."""
    dtype = x.dtype
    x = x.to(torch.promote_types(dtype, torch.float32))
    out = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps) * gain[:, None, :]
    gate = torch.einsum("bhld,hde->bhle", q, gate_weight.to(q.dtype)) + gate_bias[:, None, :].to(q.dtype)
    return (out * torch.sigmoid(gate.to(out.dtype))).to(dtype)


# ----------------------------------------------------------------------------- module


@register_mechanism("rela", ReLAConfig, causal=True, cross=True, key_padding=True, family="full")
class ReLAAttention(Attention):
    """Rectified Linear Attention (Zhang et al. 2021): ReLU weights, gated RMSNorm over all heads."""

    def __init__(self, cfg: ReLAConfig, *, heads: int, dim_head: int, max_len: int):
        super().__init__(cfg, heads=heads, dim_head=dim_head, max_len=max_len)
        if cfg.stabiliser not in STABILISERS:
            raise ValueError(f"rela stabiliser must be one of {STABILISERS}, got '{cfg.stabiliser}'")
        if getattr(cfg, "block_size", 0) < 0 or cfg.norm_eps <= 0:
            raise ValueError(f"rela needs block_size >= 0 (0 = plain formula) and norm_eps > 0, got {cfg}")
        n = heads * dim_head
        start = cfg.init_gain if cfg.stabiliser == "init" else 1.0
        self.norm_gain = nn.Parameter(torch.full((heads, dim_head), float(start)))
        self.gate: nn.Parameter | None = None
        self.gate_weight: nn.Parameter | None = None
        self.gate_bias: nn.Parameter | None = None
        if cfg.stabiliser == "gate":
            self.gate = nn.Parameter(torch.empty(heads, dim_head).uniform_(-math.sqrt(3 / n), math.sqrt(3 / n)))
        elif cfg.stabiliser == "query_gate":
            self.gate_weight = nn.Parameter(torch.randn(heads, dim_head, dim_head) * dim_head**-0.5)
            self.gate_bias = nn.Parameter(torch.zeros(heads, dim_head))
        self._sparsity: Tensor | None = None

    def normalise(self, out: Tensor, q: Tensor) -> Tensor:
        """The stabiliser applied to the mixed values out (B, H, Lq, D)."""
        if self.cfg.stabiliser == "query_gate":
            return query_gated_head_rms_norm(
                out, q, self.norm_gain, self.gate_weight, self.gate_bias, self.cfg.norm_eps
            )
        return gated_rms_norm(out, self.norm_gain, self.gate, self.cfg.norm_eps)

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
        if self.cfg.block_size == 0:
            out, weights, allowed = relu_attention(q, k, v, key_padding_mask=key_padding_mask, causal=causal)
            self._sparsity = zero_share(weights, allowed)
        else:
            dtype = q.dtype
            if torch.is_autocast_enabled(q.device.type):
                dtype = torch.get_autocast_dtype(q.device.type)
            with torch.autocast(q.device.type, enabled=False):
                out, self._sparsity = blocked_relu_attention(
                    q.to(dtype),
                    k.to(dtype),
                    v.to(dtype),
                    key_padding_mask=key_padding_mask,
                    causal=causal,
                    block_size=self.cfg.block_size,
                )
        return self.normalise(out, q)

    def metrics(self) -> dict[str, float]:
        return {} if self._sparsity is None else {"sparsity": float(self._sparsity)}
