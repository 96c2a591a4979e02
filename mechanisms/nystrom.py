"""Nyström attention (Xiong, Zeng, Chakraborty, Tan, Fung, Li & Singh 2021, "Nyströmformer:
A Nyström-Based Algorithm for Approximating Self-Attention", arXiv:2102.03902).

The softmax matrix S = softmax(Q Kᵀ/√d) is approximated from m landmarks Q̃, K̃ (means of
m contiguous segments of the queries and keys), eq. (15) of the paper:

    Ŝ V = softmax(Q K̃ᵀ/√d) · pinv(softmax(Q̃ K̃ᵀ/√d)) · (softmax(Q̃ Kᵀ/√d) · V)
            (L × m)              (m × m)                    (m × L)(L × d)

plus (optionally) a depthwise convolution of V along the sequence as a residual. pinv is
the iterative Moore–Penrose method of the paper (Razavi et al. 2014),

    Z₀ = Aᵀ / (‖A‖₁ ‖A‖∞),   Z ← ¼ Z (13I − AZ (15I − AZ (7I − AZ))),

with the scaling ‖A‖₁‖A‖∞ computed for each (example, head) matrix — never a max over the
batch as in the published code, which makes one example's output depend on the others.

Accuracy/speed trade-off: ``num_landmarks`` (m; more landmarks = closer to softmax) and
``pinv_iterations`` (more = closer to the true pseudo-inverse). When every token is its own
landmark (m ≥ L) the mechanism computes exact softmax attention (plus the conv residual),
as the authors' code does (mlpen/Nystromformer, ``NystromAttention.forward``: ``if
self.num_landmarks == self.seq_len`` it takes the dense softmax); the three-factor form with
a 6-iteration pinv would leave a ~4% relative error at L = m = 64. Cost O(L·m·d + m³·iterations) time, O(L·m) memory;
the products are
taken right to left so no L × m × m term appears. A converged pinv is not better for m < L:
it inverts the tiny singular values of an ill-conditioned middle factor and can amplify the
error (measured on random inputs, L = 64: relative error 0.74 → 0.04 steadily as m goes
4 → 64 with 6 iterations, but > 1 at several m < L with 20); the default 6 iterations act
as a regulariser, as in the paper.

Lengths that are not a multiple of m: token t of L goes to segment ⌊t·m/L⌋, so segment
sizes differ by at most one and no landmark is wasted on pure padding (padding only at the
end would leave e.g. 31 of 64 segments empty at L = 65).

Padding is per example: with a key-padding mask the segments are cut over each example's
ℓ real tokens alone (the r-th real token goes to segment ⌊r·min(m, ℓ)/ℓ⌋), and an example
with ℓ ≤ m gets the exact softmax, as it would alone. So an example's outputs on its real
tokens do not depend on how much padding its batch has (tested in float64 to 1e-10 in
``tests/mechanisms/test_padding_invariance.py``: an example alone vs padded by 150 keys in a
mixed batch). A segment with no valid token (ℓ < m) is a masked landmark (zero row and
column of the middle factor, whose pseudo-inverse is then zero there too), never NaN.

Defaults: ``conv_kernel_size = 35`` and m ∈ {32, 64, 128, 256} are the authors' LRA configs
(mlpen/Nystromformer ``LRA/code/lra_config.py``: ``"nystrom-64": {"num_landmarks": 64,
"conv_kernel_size": 35}`` for every task); lucidrains' nystrom-attention uses 33. Under
``scale=lra`` (``PROTOCOLS`` below) ``protocol=nystromformer`` runs ``nystrom-64``, the model
its ``LRA/README.md`` names (64 landmarks, conv 35), and ``protocol=pytorch`` Skyformer's
``"nystrom": {"num_landmarks": 128}`` (pkuzengqi/Skyformer ``src/config.py``), whose
``src/models/attention_nystrom.py`` adds the conv only when the config has a
``conv_kernel_size``, which it does not: 128 landmarks, no conv. LRA ran no Nyströmformer.

Deviations from the authors' code (mlpen/Nystromformer ``LRA/code/attention_nystrom.py``):
(1) their landmarks are means over the padded length (Q and K are zeroed at padded positions
and reshaped into m segments of L/m), so padding shrinks and shifts them, and kernel_1 and
kernel_2 are not masked: ours are means over the real tokens only (issue 21 measured 0.092
between the two on a padded example); (2) they need L divisible by m; (3) their pinv scaling is a maximum over
the whole batch (``init_option = "original"``), ours per (example, head) matrix; (4) their
exact path runs only when m equals the configured length, ours whenever m ≥ L (per example
with a mask); (5) they scale Q and K each by d^(-1/4), we scale Q by d^(-1/2) (same scores).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from harness.core import Attention, AttentionContext, register_mechanism, zero_padded


@dataclass
class NystromConfig:
    num_landmarks: int = 64  # m segment-mean landmarks: the accuracy/speed knob (exact when m >= L)
    pinv_iterations: int = 6  # iterations of the Moore–Penrose method: more = closer to the exact pinv
    conv_kernel_size: int = 35  # depthwise conv residual on V along the sequence (authors' LRA configs); 0 disables it


def segment_means(x: Tensor, valid: Tensor | None, num_segments: int) -> tuple[Tensor, Tensor | None]:
    """Means of n = min(num_segments, L) contiguous segments of each example's real tokens.

    Without a mask: segment i holds tokens ⌈iL/n⌉ … ⌈(i+1)L/n⌉ − 1, i.e. token t is in
    segment ⌊t·n/L⌋, so sizes differ by at most one and no segment is empty (L = 65, n = 64:
    one segment of two tokens, not 31 empty ones). With a mask the same rule runs on the
    real tokens of each example alone: the r-th real token of an example with ℓ real tokens
    is in segment ⌊r·n_ℓ/ℓ⌋, n_ℓ = min(num_segments, ℓ), and the segments n_ℓ … n − 1 are
    empty (masked). So an example's landmarks do not depend on how much padding its batch
    has, nor on where the masked tokens are.

    x: (B, H, L, D), valid: (B, L) bool (True = real token) or None.
    Returns (B, H, n, D) in at least float32, and the (B, n) bool validity of each segment
    (None when every segment holds a valid token)."""
    b, h, length, d = x.shape
    n = min(num_segments, length)
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    if valid is None:
        if length % n == 0:  # equal segments: a reshape
            return x.reshape(b, h, n, length // n, d).mean(3), None
        segment = torch.arange(length, device=x.device) * n // length  # (L,)
        sums = x.new_zeros(b, h, n, d).index_add_(2, segment, x)
        return sums / torch.bincount(segment, minlength=n).to(x.dtype)[:, None], None
    real = valid.sum(-1, keepdim=True)  # (B, 1) ℓ per example
    segments = real.clamp(min=1, max=n)  # (B, 1) n_ℓ
    rank = valid.cumsum(-1) - 1  # (B, L) place of each real token among the real ones
    segment = torch.where(valid, rank * segments // real.clamp_min(1), n)  # (B, L); n = a dump slot
    sums = x.new_zeros(b, h, n + 1, d).scatter_add_(2, segment[:, None, :, None].expand(b, h, length, d), x)
    count = torch.zeros(b, n + 1, dtype=torch.long, device=x.device).scatter_add_(1, segment, torch.ones_like(segment))
    count = count[:, :n]
    means = sums[:, :, :n] / count.clamp_min(1).to(x.dtype)[:, None, :, None]
    return means, count > 0


def masked_softmax(scores: Tensor, col_valid: Tensor | None, row_valid: Tensor | None) -> Tensor:
    """Softmax over the last axis of scores (B, H, R, C) in at least float32, with columns
    where col_valid (B, C) is False given weight exactly 0 and rows where row_valid (B, R)
    is False set to 0. A row with no valid column is finite (uniform) — callers zero it."""
    scores = scores.to(torch.promote_types(scores.dtype, torch.float32))
    if col_valid is not None:
        scores = scores.masked_fill(~col_valid[:, None, None, :], torch.finfo(scores.dtype).min)
    weights = scores.softmax(-1)
    if row_valid is not None:
        weights = weights.masked_fill(~row_valid[:, None, :, None], 0.0)
    return weights


def iterative_pinv(a: Tensor, iterations: int) -> Tensor:
    """Moore–Penrose pseudo-inverse of each matrix a (..., R, C) -> (..., C, R), by the
    iteration of Razavi et al. (2014) used in Nyströmformer, in at least float32 with
    autocast off. Z₀ = Aᵀ/(‖A‖₁‖A‖∞) per matrix: valid for any real matrix (σ_max² ≤
    ‖A‖₁‖A‖∞), so every singular value of AZ₀ lies in (0, 1] and the iteration converges
    to pinv(A) (zero where A is zero); a zero matrix gives zero."""
    with torch.autocast(a.device.type, enabled=False):
        a = a.to(torch.promote_types(a.dtype, torch.float32))
        magnitude = a.abs()
        norm_1 = magnitude.sum(-2).amax(-1)  # (...,) max column sum of this matrix
        norm_inf = magnitude.sum(-1).amax(-1)  # (...,) max row sum of this matrix
        scale = (norm_1 * norm_inf).clamp_min(torch.finfo(a.dtype).tiny)
        z = a.transpose(-1, -2) / scale[..., None, None]  # (..., C, R)
        eye = torch.eye(a.shape[-2], dtype=a.dtype, device=a.device)
        for _ in range(iterations):
            az = a @ z  # (..., R, R)
            z = 0.25 * z @ (13 * eye - az @ (15 * eye - az @ (7 * eye - az)))
        return z


def exact_softmax_attention(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None) -> Tensor:
    """softmax(Q Kᵀ/√d) V over valid keys (SDPA), in at least float32; a row with no valid key is 0."""
    dtype = torch.promote_types(q.dtype, torch.float32)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    if key_padding_mask is None:
        return F.scaled_dot_product_attention(q, k, v)
    keep = ~key_padding_mask.bool()  # (B, L)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])
    return torch.where(keep.any(-1)[:, None, None, None], out, torch.zeros((), dtype=dtype))


def nystrom_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    num_landmarks: int,
    pinv_iterations: int,
    key_padding_mask: Tensor | None = None,
) -> tuple[Tensor, int]:
    """q, k, v: (B, H, L, D) -> (Ŝ V: (B, H, L, D) in at least float32, landmarks used).

    Scores are taken under the ambient autocast; softmax, pinv and the three products in
    float32 (float64 inputs stay float64)."""
    dim = q.shape[-1]
    if num_landmarks >= q.shape[-2]:  # every token its own landmark: the exact softmax
        return exact_softmax_attention(q, k, v, key_padding_mask), q.shape[-2]
    valid = None if key_padding_mask is None else ~key_padding_mask.bool()  # (B, L)
    q = q * (dim**-0.5)
    q_land, land_valid = segment_means(q, valid, num_landmarks)  # (B, H, m, D), (B, m)
    k_land, _ = segment_means(k, valid, num_landmarks)
    q_land, k_land = q_land.to(q.dtype), k_land.to(k.dtype)
    kernel_1 = masked_softmax(q @ k_land.transpose(-1, -2), land_valid, None)  # (B, H, L, m)
    kernel_2 = masked_softmax(q_land @ k_land.transpose(-1, -2), land_valid, land_valid)  # (B, H, m, m)
    kernel_3 = masked_softmax(q_land @ k.transpose(-1, -2), valid, land_valid)  # (B, H, m, L)
    kernel_2_inv = iterative_pinv(kernel_2, pinv_iterations)  # (B, H, m, m)
    with torch.autocast(q.device.type, enabled=False):
        v = zero_padded(v, key_padding_mask).to(kernel_3.dtype)
        out = kernel_1 @ (kernel_2_inv @ (kernel_3 @ v))  # (B, H, L, D)
        short = None if valid is None else valid.sum(-1) <= num_landmarks  # (B,) every real token a landmark
        if short is not None and bool(short.any()):
            # such an example gets the exact softmax, as it would alone (m ≥ ℓ): its landmarks are its
            # tokens, so kernel_1 is already softmax(Q Kᵀ/√d) over its real keys
            v_land, _ = segment_means(v, valid, num_landmarks)
            out = torch.where(short[:, None, None, None], kernel_1 @ v_land.to(kernel_1.dtype), out)
    return out, q_land.shape[-2]


def value_conv_residual(v: Tensor, conv: nn.Conv2d, key_padding_mask: Tensor | None) -> Tensor:
    """Depthwise convolution of v (B, H, L, D) along L, one kernel per head, zero-padded
    ends, padded keys zeroed first so they do not leak into their neighbours."""
    length = v.shape[-2]
    weight = conv.weight.to(v.dtype)  # (H, 1, kernel, 1); autocast may still lower both
    out = F.conv2d(zero_padded(v, key_padding_mask), weight, padding=conv.padding, groups=conv.groups)
    return out[:, :, :length]  # an even kernel gives L + 1 rows


# The authors' settings per scale=lra protocol (sources: the module docstring).
PROTOCOLS = {
    "nystromformer": {"*": {"num_landmarks": 64, "conv_kernel_size": 35}},  # lra_config.py "nystrom-64"
    "pytorch": {"*": {"num_landmarks": 128, "conv_kernel_size": 0}},  # Skyformer src/config.py "nystrom"
}


@register_mechanism("nystrom", NystromConfig, key_padding=True, family="low_rank", protocols=PROTOCOLS)
class NystromAttention(Attention):
    """Nyströmformer (Xiong et al. 2021): segment-mean landmarks, iterative pinv, conv residual."""

    def __init__(self, cfg: NystromConfig, *, heads: int, dim_head: int, max_len: int):
        super().__init__(cfg, heads=heads, dim_head=dim_head, max_len=max_len)
        if cfg.num_landmarks < 1 or cfg.pinv_iterations < 0 or cfg.conv_kernel_size < 0:
            raise ValueError(
                f"nystrom needs num_landmarks >= 1, pinv_iterations >= 0 and conv_kernel_size >= 0, got {cfg}"
            )
        self.value_conv: nn.Conv2d | None = None
        if cfg.conv_kernel_size > 0:
            kernel = cfg.conv_kernel_size
            self.value_conv = nn.Conv2d(heads, heads, (kernel, 1), padding=(kernel // 2, 0), groups=heads, bias=False)
        self._landmarks = 0

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
        out, self._landmarks = nystrom_attention(
            q,
            k,
            v,
            num_landmarks=self.cfg.num_landmarks,
            pinv_iterations=self.cfg.pinv_iterations,
            key_padding_mask=key_padding_mask,
        )
        if self.value_conv is not None:
            out = out + value_conv_residual(v, self.value_conv, key_padding_mask)
        return out.to(q.dtype)

    def metrics(self) -> dict[str, float]:
        return {"landmarks": float(self._landmarks)}
