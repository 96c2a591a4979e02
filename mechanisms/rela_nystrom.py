"""ReLA-Nyström: the Nyström approximation (Xiong et al. 2021, arXiv:2102.03902) of
row-normalised Rectified Linear Attention (Zhang, Titov & Sennrich 2021, arXiv:2104.07012).

Credit: the ReLA Nyströmformer of the EPFL–UPC master thesis "Understanding and improving
self-attention mechanisms" (2022), whose full text is not public: this file is OUR READING of
it. It is ``nystrom`` with what the thesis changed and nothing else: the softmax kernels
become row-normalised ReLU kernels and the output passes through ReLA's stabiliser (the
authors' gated RMSNorm over the joined heads, ``rela``'s ``stabiliser`` option). Landmarks,
pinv, the depthwise-conv skip on V (``conv_kernel_size``, same default as ``nystrom``, added
to the attention output before the stabiliser) and the exact dense form at m ≥ L are
``nystrom``'s.

Dense form approximated here (N = row normalisation, N(X)ᵢⱼ = Xᵢⱼ / max(Σⱼ Xᵢⱼ, 1e-6), so a
row with no positive score stays 0; masked entries are 0 before the sum):

    P = N(ReLU(Q Kᵀ/√d)),    O = GatedRMSNorm_{H·D}(P V + conv(V))       (ReLA's stabiliser)

Its Nyström approximation, with segment-mean landmarks Q̃, K̃ exactly as in ``nystrom``:

    P V ≈ N(ReLU(Q K̃ᵀ/√d)) · pinv(N(ReLU(Q̃ K̃ᵀ/√d))) · (N(ReLU(Q̃ Kᵀ/√d)) · V)
            (L × m)              (m × m)                     (m × L)(L × d)

The middle factor of a ReLU kernel is a general matrix (rows may be all zero, so it is not
stochastic and may be singular): its pseudo-inverse uses the iteration of ``nystrom`` with
Z₀ = Aᵀ/(‖A‖₁‖A‖∞) per matrix, which is valid for any real matrix (σ_max² ≤ ‖A‖₁‖A‖∞) and
converges to the Moore–Penrose inverse, not to an inverse that need not exist. When every
token is its own landmark (m ≥ L) the dense row-normalised P V is computed exactly (as
``nystrom`` computes exact softmax there). Row-normalised ReLA is not ``rela``: RMSNorm
ignores a positive per-row scale only when every entry it normalises shares it (one head; the
norm runs over H·D and each head has its own row sums) and no gate reads o's scale (the gate
σ(w ⊙ o) does).

Padding is per example as in ``nystrom``: segments over each example's real tokens, and
an example with ℓ ≤ m real tokens gets the dense form, as it would alone, so outputs on
real tokens do not depend on the amount of padding in the batch.

Accuracy/speed trade-off: ``num_landmarks`` (m) and ``pinv_iterations``, as in ``nystrom``
(and as there, the truncated 6-iteration pinv regularises: a converged one can amplify the
error for m < L, more so here, since a ReLU middle factor is often near-singular).
Cost O(L·m·d + m³·iterations), O(L·m) memory. ``metrics()['sparsity']`` is the share of
exact zeros among the allowed entries of the two ReLU factors (L × m and m × L),
averaged over the two.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from harness.core import AttentionContext, register_mechanism, zero_padded
from mechanisms.nystrom import iterative_pinv, segment_means, value_conv_residual
from mechanisms.rela import ReLAAttention, ReLANormConfig, relu_attention, zero_share

ROW_SUM_FLOOR = 1e-6  # denominators of the row normalisation are at least this


@dataclass
class ReLANystromConfig(ReLANormConfig):
    num_landmarks: int = 64  # m segment-mean landmarks: the accuracy/speed knob (exact when m >= L)
    pinv_iterations: int = 6  # iterations of the Moore–Penrose method: more = closer to the exact pinv
    conv_kernel_size: int = 35  # depthwise conv skip on V along the sequence (as nystrom); 0 disables it


def relu_row_normalised(
    scores: Tensor, row_valid: Tensor | None, col_valid: Tensor | None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """scores: (B, H, R, C); row_valid (B, R) / col_valid (B, C) bool or None.

    Returns N(ReLU(scores)) with invalid rows and columns 0 (at least float32), the ReLU
    weights before normalisation and their allowed mask (for the sparsity metric)."""
    weights = F.relu(scores.to(torch.promote_types(scores.dtype, torch.float32)))
    allowed = None
    if row_valid is not None:
        allowed = row_valid[:, None, :, None]  # (B, 1, R, 1)
    if col_valid is not None:
        cols = col_valid[:, None, None, :]  # (B, 1, 1, C)
        allowed = cols if allowed is None else allowed & cols
    if allowed is not None:
        weights = weights.masked_fill(~allowed, 0.0)
    return weights / weights.sum(-1, keepdim=True).clamp_min(ROW_SUM_FLOOR), weights, allowed


def relu_nystrom_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    num_landmarks: int,
    pinv_iterations: int,
    key_padding_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """q, k, v: (B, H, L, D) -> (≈ P V: (B, H, L, D) in at least float32, sparsity: 0-dim).

    Scores under the ambient autocast; ReLU, normalisation, pinv and products in float32."""
    if num_landmarks >= q.shape[-2]:  # every token its own landmark: the dense row-normalised form
        dtype = torch.promote_types(q.dtype, torch.float32)
        with torch.autocast(q.device.type, enabled=False):
            _, weights, allowed = relu_attention(
                q.to(dtype), k.to(dtype), v.to(dtype), key_padding_mask=key_padding_mask
            )
            p = weights / weights.sum(-1, keepdim=True).clamp_min(ROW_SUM_FLOOR)
            return p @ v.to(dtype), zero_share(weights, allowed)
    valid = None if key_padding_mask is None else ~key_padding_mask.bool()  # (B, L)
    q = q * (q.shape[-1] ** -0.5)
    q_land, land_valid = segment_means(q, valid, num_landmarks)  # (B, H, m, D), (B, m)
    k_land, _ = segment_means(k, valid, num_landmarks)
    q_land, k_land = q_land.to(q.dtype), k_land.to(k.dtype)
    kernel_1, relu_1, allowed_1 = relu_row_normalised(q @ k_land.transpose(-1, -2), valid, land_valid)  # (B,H,L,m)
    kernel_2, _, _ = relu_row_normalised(q_land @ k_land.transpose(-1, -2), land_valid, land_valid)  # (B,H,m,m)
    kernel_3, relu_3, allowed_3 = relu_row_normalised(q_land @ k.transpose(-1, -2), land_valid, valid)  # (B,H,m,L)
    kernel_2_inv = iterative_pinv(kernel_2, pinv_iterations)  # (B, H, m, m)
    with torch.autocast(q.device.type, enabled=False):
        v = zero_padded(v, key_padding_mask).to(kernel_3.dtype)
        out = kernel_1 @ (kernel_2_inv @ (kernel_3 @ v))  # (B, H, L, D)
        short = None if valid is None else valid.sum(-1) <= num_landmarks  # (B,) every real token a landmark
        if short is not None and bool(short.any()):
            # such an example gets the dense form, as it would alone (m ≥ ℓ): its landmarks are its
            # tokens, so kernel_1 is already N(ReLU(Q Kᵀ/√d)) over its real keys
            v_land, _ = segment_means(v, valid, num_landmarks)
            out = torch.where(short[:, None, None, None], kernel_1 @ v_land.to(kernel_1.dtype), out)
    sparsity = (zero_share(relu_1, allowed_1) + zero_share(relu_3, allowed_3)) / 2
    return out, sparsity


@register_mechanism("rela_nystrom", ReLANystromConfig, key_padding=True, family="low_rank")
class ReLANystromAttention(ReLAAttention):
    """Nyström approximation of row-normalised ReLA, followed by ReLA's gated RMSNorm."""

    def __init__(self, cfg: ReLANystromConfig, *, heads: int, dim_head: int, max_len: int):
        super().__init__(cfg, heads=heads, dim_head=dim_head, max_len=max_len)
        if cfg.num_landmarks < 1 or cfg.pinv_iterations < 0 or cfg.conv_kernel_size < 0:
            raise ValueError(
                f"rela_nystrom needs num_landmarks >= 1, pinv_iterations >= 0 and conv_kernel_size >= 0, got {cfg}"
            )
        self.value_conv: nn.Conv2d | None = None
        if cfg.conv_kernel_size > 0:  # the same depthwise conv skip as nystrom
            kernel = cfg.conv_kernel_size
            self.value_conv = nn.Conv2d(heads, heads, (kernel, 1), padding=(kernel // 2, 0), groups=heads, bias=False)

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
        out, self._sparsity = relu_nystrom_attention(
            q,
            k,
            v,
            num_landmarks=self.cfg.num_landmarks,
            pinv_iterations=self.cfg.pinv_iterations,
            key_padding_mask=key_padding_mask,
        )
        if self.value_conv is not None:
            out = out + value_conv_residual(v, self.value_conv, key_padding_mask)
        return self.normalise(out, q).to(q.dtype)
