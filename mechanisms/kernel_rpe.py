"""Kernelized attention with relative positional encoding (Luo, Li, Cai, He, Peng, Zheng, Ke,
Wang, Liu 2021, "Stable, Fast and Accurate: Kernelized Attention with Relative Positional
Encoding", NeurIPS 2021, arXiv:2106.12566).

Softmax attention with a relative-position bias b_{j−i},

    z_i = Σ_j exp(q_i·k_j/√d + b_{j−i}) v_j / Σ_j exp(q_i·k_j/√d + b_{j−i}),

becomes, with Performer's positive random features exp(q·k/√d) ≈ φ(q)ᵀφ(k) and C_ij = exp(b_{j−i}),

    z_i = φ(q_i)ᵀ [C (φ(K) ⊗ V)]_i  /  φ(q_i)ᵀ [C φ(K)]_i.

C is Toeplitz, so both products are one circulant embedding multiplied through the FFT
(``torch.fft.rfft``) in O(L log L) per column: m·(d+1) columns. max(b) is subtracted
before the exponential (it cancels), and the FFT runs in ``fft_dtype`` (float32 or float64)
whatever the autocast dtype. Causal attention zeroes b_{j−i} for j > i (lower-triangular
Toeplitz). For Lq ≠ Lk positions are bottom-right aligned (relative position j − i − (Lk − Lq)),
as for a decoder step with a cache. Rows with no visible valid key are set to 0 exactly.

Accuracy/speed: ``num_features`` (m) sets the kernel approximation error (~1/√m) and the
cost, O(L log L · m · d) time and O(L·m·d) memory per pass; ``fft_feature_block`` bounds the
memory of one FFT pass; ``fft_dtype="float64"`` trades speed for FFT round-off (which
grows with L and with the dynamic range of exp(b)).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from harness.attention import Attention, AttentionContext
from harness.registry import register_mechanism
from mechanisms.performer import (
    RandomFeatureProjection,
    check_kernel_config,
    output_dtype,
    softmax_kernel_features,
    work_dtype,
)

FFT_DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass
class KernelRPEConfig:
    num_features: int = 64  # random features m: error ~ 1/√m, cost O(L log L·m·d) — the accuracy/speed knob
    orthogonal_features: bool = True  # block-orthogonal rows with chi norms (False: i.i.d. Gaussian)
    redraw_interval: int = 1000  # training forward passes between feature redraws; 0 = never
    feature_eps: float = 1e-4  # added to the (row-normalised) query features: positive denominators
    fft_dtype: str = "float32"  # "float32" or "float64": precision of the Toeplitz products
    fft_feature_block: int = 16  # random features per FFT pass: peak memory ~ B·H·2L·block·(d+1)
    checkpoint_fft: bool = False  # recompute each FFT pass in backward instead of storing it


# ----------------------------------------------------------------------------- math


def relative_coefficients(rel_bias: Tensor, lq: int, lk: int, *, causal: bool, dtype: torch.dtype) -> Tensor:
    """C's diagonals: rel_bias (H, 2·max_len − 1) indexed by p + max_len − 1 ->
    (H, Lq + Lk − 1) of exp(b_p − max b) for p = j − i − (Lk − Lq) from −(Lk − 1) to Lq − 1,
    and 0 for p > 0 when causal."""
    max_len = (rel_bias.shape[-1] + 1) // 2
    b = rel_bias[:, max_len - lk : max_len + lq - 1].to(dtype)  # (H, Lq + Lk − 1)
    if causal:
        future = torch.arange(lq + lk - 1, device=b.device) > lk - 1  # p > 0
        b = b.masked_fill(future, -math.inf)
    return torch.exp(b - b.amax(-1, keepdim=True).detach())


def toeplitz_multiply(coeffs: Tensor, x: Tensor, lq: int) -> Tensor:
    """y_i = Σ_j coeffs[p = j − i − (Lk − Lq)] x_j by FFT (circulant embedding).

    coeffs: (H, Lq + Lk − 1) ordered by p ascending, x: (B, H, Lk, F) -> (B, H, Lq, F), in x's dtype.
    With g[s] = coeffs[p = Lq − 1 − s], y_i is entry i + Lk − 1 of the linear convolution g * x;
    an FFT length n ≥ Lq + Lk − 1 keeps the wrap-around away from those entries."""
    lk = x.shape[-2]
    n = 1 << (lq + lk - 2).bit_length()  # power of two ≥ Lq + Lk − 1
    g = torch.fft.rfft(coeffs.flip(-1), n=n, dim=-1)  # (H, n/2 + 1)
    xf = torch.fft.rfft(x, n=n, dim=-2)  # (B, H, n/2 + 1, F)
    y = torch.fft.irfft(xf * g[None, :, :, None], n=n, dim=-2)  # (B, H, n, F)
    return y[:, :, lk - 1 : lk - 1 + lq]


def _feature_block(q_feats: Tensor, k_feats: Tensor, v1: Tensor, coeffs: Tensor) -> Tensor:
    """Σ_f φ(q_i)_f [C (φ(k)_f ⊗ [v, 1])]_i for one block of features: (B, H, Lq, D + 1)."""
    b, h, lk, mb = k_feats.shape
    x = (k_feats[..., :, None] * v1[..., None, :]).reshape(b, h, lk, -1)  # (B, H, Lk, mb·(D+1))
    y = toeplitz_multiply(coeffs, x, q_feats.shape[-2]).reshape(b, h, -1, mb, v1.shape[-1])
    y = torch.cat([y[..., :-1], y[..., -1:].clamp_min(0.0)], -1)  # C φ(K) ≥ 0: clip FFT round-off
    return torch.einsum("bhim,bhime->bhie", q_feats, y)


def kernelized_rpe_attention(
    q_feats: Tensor,
    k_feats: Tensor,
    v: Tensor,
    coeffs: Tensor,
    *,
    visible: Tensor | None = None,
    block: int = 16,
    use_checkpoint: bool = False,
) -> Tensor:
    """(B, H, Lq, m), (B, H, Lk, m) (padded rows zero), (B, H, Lk, D), coeffs (H, Lq + Lk − 1)
    -> (B, H, Lq, D). ``visible`` (B, 1|H, Lq) bool: rows that see at least one valid key."""
    v1 = torch.cat([v, torch.ones_like(v[..., :1])], -1)  # (B, H, Lk, D + 1): values and the denominator
    acc = 0
    for start in range(0, q_feats.shape[-1], block):
        args = (q_feats[..., start : start + block], k_feats[..., start : start + block], v1, coeffs)
        acc = acc + (checkpoint(_feature_block, *args, use_reentrant=False) if use_checkpoint else _feature_block(*args))
    num, den = acc[..., :-1], acc[..., -1]
    # FFT round-off is relative to the whole sequence's mass: a row whose true denominator is
    # below eps·φ(q_i)ᵀΣ_j φ(k_j) (max C = 1) is noise, so floor it there (finite, bounded output).
    floor = torch.finfo(den.dtype).eps * (q_feats @ k_feats.sum(-2)[..., None]).squeeze(-1)  # (B, H, Lq)
    out = num / torch.maximum(den, floor).clamp_min(torch.finfo(den.dtype).tiny)[..., None]
    return out if visible is None else out.masked_fill(~visible[..., None], 0.0)


def visible_rows(
    batch: int, lq: int, lk: int, key_padding_mask: Tensor | None, causal: bool, device: torch.device
) -> Tensor | None:
    """(B, 1, Lq) bool: query i sees at least one valid key (None: every row does)."""
    if key_padding_mask is None and not (causal and lq > lk):
        return None
    valid = torch.ones(batch, lk, device=device) if key_padding_mask is None else (~key_padding_mask).float()
    if causal:  # keys j ≤ i + Lk − Lq: a prefix count
        counts = torch.cat([torch.zeros_like(valid[:, :1]), valid.cumsum(-1)], -1)  # (B, Lk + 1)
        last = (torch.arange(lq, device=device) + lk - lq + 1).clamp(0, lk)  # keys seen by query i
        return (counts[:, last] > 0)[:, None]
    return (valid.sum(-1, keepdim=True) > 0).expand(batch, lq)[:, None]


# ----------------------------------------------------------------------------- module


@register_mechanism("kernel_rpe", KernelRPEConfig, causal=True, cross=True, key_padding=True)
class KernelRPEAttention(Attention):
    """Kernelized attention with RPE (Luo et al. 2021): random features, Toeplitz exp(b) by FFT."""

    def __init__(self, cfg: KernelRPEConfig, *, heads: int, dim_head: int, max_len: int):
        super().__init__(cfg, heads=heads, dim_head=dim_head, max_len=max_len)
        check_kernel_config(cfg.num_features, cfg.redraw_interval, cfg.feature_eps)
        if cfg.fft_dtype not in FFT_DTYPES:
            raise ValueError(f"fft_dtype must be one of {sorted(FFT_DTYPES)}, got '{cfg.fft_dtype}'")
        if cfg.fft_feature_block < 1:
            raise ValueError(f"fft_feature_block must be >= 1, got {cfg.fft_feature_block}")
        self.projection = RandomFeatureProjection(
            cfg.num_features, dim_head, orthogonal=cfg.orthogonal_features, redraw_interval=cfg.redraw_interval
        )
        self.rel_bias = nn.Parameter(torch.zeros(heads, 2 * max_len - 1))  # b_p at index p + max_len − 1

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
        if max(lq, lk) > self.max_len:
            raise ValueError(
                f"kernel_rpe has relative-position biases for lengths up to max_len={self.max_len}, "
                f"got Lq={lq}, Lk={lk}; build it with max_len >= {max(lq, lk)}"
            )
        kpm = None if key_padding_mask is None else key_padding_mask.bool()
        projection = self.projection.step()
        out_dtype = output_dtype(q)
        fft_dtype = torch.promote_types(FFT_DTYPES[self.cfg.fft_dtype], work_dtype(q))
        with torch.autocast(q.device.type, enabled=False):  # features and FFT in float32/float64
            q_feats = softmax_kernel_features(q, projection, is_query=True, eps=self.cfg.feature_eps)
            k_feats = softmax_kernel_features(
                k, projection, is_query=False, key_padding_mask=kpm, eps=self.cfg.feature_eps
            )
            coeffs = relative_coefficients(self.rel_bias, lq, lk, causal=causal, dtype=fft_dtype)
            out = kernelized_rpe_attention(
                q_feats.to(fft_dtype),
                k_feats.to(fft_dtype),
                v.to(fft_dtype),
                coeffs,
                visible=visible_rows(q.shape[0], lq, lk, kpm, causal, q.device),
                block=self.cfg.fft_feature_block,
                use_checkpoint=self.cfg.checkpoint_fft and torch.is_grad_enabled(),
            )
        return out.to(out_dtype)

    def metrics(self) -> dict[str, float]:
        b = self.rel_bias.detach()
        return {"feature_redraws": float(self.projection.redraws), "rpe_bias_range": float(b.max() - b.min())}
