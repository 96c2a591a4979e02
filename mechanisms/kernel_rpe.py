"""Kernelized attention with relative positional encoding (Luo, Li, Cai, He, Peng, Zheng, Ke,
Wang, Liu 2021, "Stable, Fast and Accurate: Kernelized Attention with Relative Positional
Encoding", NeurIPS 2021, arXiv:2106.12566).

Softmax attention with a relative-position bias b_{j−i},

    z_i = Σ_j exp(q_i·k_j/√d + b_{j−i}) v_j / Σ_j exp(q_i·k_j/√d + b_{j−i}),

becomes, with Performer's positive random features exp(q·k/√d) ≈ φ(q)ᵀφ(k) and C_ij = exp(b_{j−i}),

    z_i = φ(q_i)ᵀ [C (φ(K) ⊗ V)]_i  /  φ(q_i)ᵀ [C φ(K)]_i.

C is Toeplitz, so both products are one circulant embedding multiplied through the FFT
(``torch.fft.rfft``) in O(L log L) per column: m·(d+1) columns (§3.2). max(b) is subtracted
before the exponential (it cancels), and the FFT runs in ``fft_dtype`` (float32 or float64)
whatever the autocast dtype. Short non-causal sequences (Lq, Lk ≤ ``dense_max_len``, 1024 by
default) skip the FFT: the same product written out, (φ(Q)φ(K)ᵀ ∘ C)[V, 1], O(L²·(m + d)) time
and O(L²) memory per head, exact (``dense_rpe_attention``). Measured on one thread of a shared 2-core CPU, forward
and backward, H = 4, d = 16, m = 64, 4096 tokens a batch: the FFT path costs 45× the dense one at
L = 128, 20–28× at 256–512 and 9× at 1024 (pocketfft over m·(d+1) = 1088 columns per head),
so at these lengths the FFT is all cost; set ``dense_max_len=0`` to measure the FFT path
alone. For Lq ≠ Lk positions are bottom-right aligned (relative
position j − i − (Lk − Lq)), as for a decoder step with a cache. Rows with no visible valid
key are set to 0 exactly.

Causal attention (C lower-triangular) is *not* one FFT here: a transform over the whole
sequence has round-off relative to its largest term, so a huge future key (one aligned with
a random feature has log-feature |w|²/2) moved earlier outputs by their own scale, and so did
the key stabiliser and the denominator floor taken over all keys. The causal path (below,
``causal_kernelized_rpe_attention``) never lets a future key touch a past output: a running
key stabiliser, exact dense leaves of ``causal_leaf`` positions and, above them, recursive
doubling where each FFT sees only keys in the past of all the queries it serves. Cost
O(L log L · log(L/C) · m·d) instead of O(L log L · m·d), memory O(B·H·L·C) for the leaves
(measured on one CPU thread at L = 4096: 1.5–1.8× the bare FFTs of the m·(d+1) channels
with C = 1024/512, against 1.1–1.5× for the non-causal path); ``causal_kernelized_rpe_reference``
is the plain formula the tests compare it against in float64.

§3.3 (training stability): the variance of the positive-feature estimator grows with ‖q‖
and ‖k‖; the paper normalises queries and keys and lets the RPE supply the sharpness that
normalisation takes away. ``normalize_qk=True`` is our reading of that recipe: ℓ2-normalised
q̂, k̂ and the kernel exp(q̂·k̂ + b_{j−i}) (no 1/√d, no learned temperature).

Sources: the paper's equations (arXiv:2106.12566, §2.3, §3.2 Toeplitz/FFT, §3.3); the
authors' code was not found (lsj2408/URPE is their later Universal RPE), so the FFT layout,
the stabilisers and the causal blocking are ours. Deviations from the paper: Performer's
block-orthogonal positive features with query/key stabilisers and a query-side eps (from
``mechanisms/performer.py``); b is one learned scalar per head and relative position (the
paper's "most general" RPE), clipped only by max_len; the denominator floor (eps · visible
mass) and (non-causal) the clip of C φ(K) at 0 are ours; the causal path's blocking is ours.

Accuracy/speed: ``num_features`` (m) sets the kernel approximation error (~1/√m) and the
cost, O(L log L · m · d) time and O(L·m·d) memory per pass; ``fft_feature_block`` bounds the
memory of one FFT pass; ``fft_dtype="float64"`` trades speed for FFT round-off (which
grows with L and with the dynamic range of exp(b)); ``causal_leaf`` moves causal work
between the dense leaves (matmuls, O(L·C)) and the FFT levels (log2(L/C) of them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from harness.core import Attention, AttentionContext, register_mechanism
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
    redraw_interval: int = 1000  # training steps between feature redraws (by context.step); 0 = never
    feature_eps: float = 1e-4  # added to the (row-normalised) query features: positive denominators
    fft_dtype: str = "float32"  # "float32" or "float64": precision of the Toeplitz products
    fft_feature_block: int = 16  # random features per FFT pass: peak memory ~ B·H·2L·block·(d+1)
    checkpoint_fft: bool = False  # recompute each FFT pass in backward instead of storing it
    dense_max_len: int = (
        1024  # non-causal with Lq, Lk <= this: the exact (Lq × Lk) product, no FFT (cheaper there); 0 = always FFT
    )
    causal_leaf: int = (
        512  # causal: positions per exact dense leaf (power of 2); memory ~ B·H·L·leaf, FFT levels log2(L/leaf)
    )
    normalize_qk: bool = False  # §3.3: ℓ2-normalised q and k, kernel exp(q̂·k̂ + b_{j−i}): bounded feature variance


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
    return torch.matmul(q_feats[..., None, :], y)[..., 0, :]  # Σ_m φ(q_i)_m y_ime (a batched matvec)


def dense_rpe_attention(
    q_feats: Tensor, k_feats: Tensor, v: Tensor, coeffs: Tensor, *, visible: Tensor | None = None
) -> Tensor:
    """The non-causal product written out for short sequences: A = (φ(Q) φ(K)ᵀ) ∘ C with
    C_ij = coeffs[j − i + Lq − 1], out = A [V, 1] normalised. O(Lq·Lk·(m + d)) time and
    O(Lq·Lk) memory per head, exact (no FFT round-off); same arguments as the FFT path."""
    lq, lk = q_feats.shape[-2], k_feats.shape[-2]
    index = torch.arange(lk, device=coeffs.device)[None, :] - torch.arange(lq, device=coeffs.device)[:, None] + lq - 1
    scores = (q_feats @ k_feats.transpose(-1, -2)) * coeffs[:, index]  # (B, H, Lq, Lk), all ≥ 0
    acc = scores @ torch.cat([v, torch.ones_like(v[..., :1])], -1)
    mass = (q_feats @ k_feats.sum(-2)[..., None]).squeeze(-1)
    return normalised_rows(acc, mass, visible)


def normalised_rows(acc: Tensor, mass: Tensor, visible: Tensor | None) -> Tensor:
    """num / den from acc (B, H, Lq, D + 1) = [num, den] and mass (B, H, Lq) = φ(q_i)ᵀ Σ_{j visible} φ(k_j).

    FFT round-off is relative to the mass the transform mixed: a row whose true denominator
    is below eps·mass (max C = 1) is noise, so it is floored there (finite, bounded output).
    ``visible`` (B, 1|H, Lq) bool: rows that see at least one valid key (others are set to 0)."""
    num, den = acc[..., :-1], acc[..., -1]
    floor = torch.finfo(den.dtype).eps * mass
    out = num / torch.maximum(den, floor).clamp_min(torch.finfo(den.dtype).tiny)[..., None]
    return out if visible is None else out.masked_fill(~visible[..., None], 0.0)


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
    """Non-causal: (B, H, Lq, m), (B, H, Lk, m) (padded rows zero), (B, H, Lk, D), coeffs
    (H, Lq + Lk − 1) -> (B, H, Lq, D). One FFT over the whole sequence per feature block."""
    v1 = torch.cat([v, torch.ones_like(v[..., :1])], -1)  # (B, H, Lk, D + 1): values and the denominator
    acc = 0
    for start in range(0, q_feats.shape[-1], block):
        args = (q_feats[..., start : start + block], k_feats[..., start : start + block], v1, coeffs)
        acc = acc + (
            checkpoint(_feature_block, *args, use_reentrant=False) if use_checkpoint else _feature_block(*args)
        )
    mass = (q_feats @ k_feats.sum(-2)[..., None]).squeeze(-1)  # (B, H, Lq)
    return normalised_rows(acc, mass, visible)


# ----------------------------------------------------------------------------- causal path
#
# One FFT over the whole sequence is not causal in floating point: its round-off is relative
# to the largest term it mixes, so a huge future key moves past outputs (and so do a key
# stabiliser and a denominator floor taken over all keys). The causal path below never lets
# a future key touch a past output, at any precision:
#
#   * keys are stabilised by a running maximum s_j = max_{j' ≤ j} log φ(k_{j'}) (not the
#     global one); query i combines key j ≤ i with the factor exp(s_j − s_i) ≤ 1;
#   * leaves of ``causal_leaf`` positions: the exact dense (C × C) lower-triangular product;
#   * above them, recursive doubling: at block size s every left block S sends to its right
#     neighbour T the full (not triangular) Toeplitz product T_{t,u} = c_{s + t − u}, one FFT
#     of length 2s that only ever sees S (all of it is in the past of all of T), scaled by
#     exp(σ_S − s_i) with σ_S = s at the end of S. Every pair j < i in different leaves is
#     covered exactly once: at the level where i and j first fall into sibling blocks.
#
# Cost: log2(L / C) levels, each about half the FFT work of the one non-causal product, plus
# the leaves' O(L·C·(m + d)) matmuls: O(L log L · log(L / C) · m · d) time, O(L·(C + m·d)) memory.


def key_log_features(k: Tensor, projection: Tensor, key_padding_mask: Tensor | None) -> Tensor:
    """Unstabilised log φ(k) = w·k' − |k'|²/2 − log √m, k' = k·d^(-1/4) (Performer's positive
    features): (B, H, L, D), (m, D) -> (B, H, L, m) in k's dtype, −inf at padded keys."""
    k = k * k.shape[-1] ** -0.25
    logits = k @ projection.to(k.dtype).t() - k.square().sum(-1, keepdim=True) / 2 - 0.5 * math.log(projection.shape[0])
    if key_padding_mask is not None:
        logits = logits.masked_fill(key_padding_mask[:, None, :, None], -math.inf)
    return logits


def running_stabiliser(logits: Tensor) -> Tensor:
    """(B, H, L, m) -> (B, H, L): s_j = max over keys j' ≤ j and features (no gradient; it
    cancels), 0 before the first valid key (whose features are 0 anyway)."""
    with torch.no_grad():
        s = logits.amax(-1).cummax(-1).values
        return torch.where(torch.isfinite(s), s, torch.zeros_like(s))


def causal_decay(rel_bias: Tensor, length: int, *, dtype: torch.dtype) -> Tensor:
    """(H, 2·max_len − 1) -> (H, L): c_p = exp(b_{−p} − max) for p = i − j = 0..L−1, the
    diagonals of the lower-triangular Toeplitz C."""
    max_len = (rel_bias.shape[-1] + 1) // 2
    b = rel_bias[:, max_len - length : max_len].flip(-1).to(dtype)  # (H, L): entry p is b_{−p}
    return torch.exp(b - b.amax(-1, keepdim=True).detach())


def _sibling_block(q_t: Tensor, phi_s: Tensor, v1_s: Tensor, kernel: Tensor) -> Tensor:
    """Σ_f φ(q_t)_f Σ_u c_{s + t − u} φ̃(k_u)_f [v_u, 1] for target t of T, sources u of S.

    q_t: (B, H, N, s, mb), phi_s: (B, H, N, s, mb) (already scaled to σ_S), v1_s: (B, H, N, s, E),
    kernel: (H, s + 1) = rfft([0, c_1, ..., c_{2s−1}], 2s) -> (B, H, N, s, E)."""
    size, mb = phi_s.shape[-2], phi_s.shape[-1]
    x = (phi_s[..., None] * v1_s[..., None, :]).flatten(-2)  # (B, H, N, s, mb·E)
    xf = torch.fft.rfft(x, n=2 * size, dim=-2)  # (B, H, N, s + 1, mb·E)
    # circular length 2s: outputs s..2s−1 of the linear convolution have no wrap-around
    y = torch.fft.irfft(xf * kernel[None, :, None, :, None], n=2 * size, dim=-2)[..., size:, :]
    y = y.unflatten(-1, (mb, v1_s.shape[-1]))  # (B, H, N, s, mb, E)
    # no clip of the denominator channel here: its round-off (≤ eps · this block's mass) is
    # covered by the floor eps · mass in ``normalised_rows``, and the clip would copy y
    return torch.matmul(q_t[..., None, :], y)[..., 0, :]  # Σ_f φ(q_t)_f y_tfe (a batched matvec)


def causal_kernelized_rpe_attention(
    q_feats: Tensor,
    k_logits: Tensor,
    v: Tensor,
    decay: Tensor,
    *,
    visible: Tensor | None = None,
    leaf: int = 512,
    block: int = 16,
    use_checkpoint: bool = False,
) -> Tensor:
    """Causal (square): z_i = Σ_{j ≤ i} φ(q_i)·φ(k_j) c_{i−j} v_j / Σ_{j ≤ i} φ(q_i)·φ(k_j) c_{i−j}.

    q_feats (B, H, L, m), k_logits (B, H, L, m) = log φ(k) (−inf at padded keys), v (B, H, L, D),
    decay (H, L) = c_0..c_{L−1} -> (B, H, L, D)."""
    b, h, length, m = q_feats.shape
    leaf = min(leaf, 1 << (length - 1).bit_length())
    padded = leaf << max(0, math.ceil(math.log2(length / leaf)))  # leaf · 2^levels ≥ L
    pad = padded - length  # padded tail keys are in everyone's future: they are never read
    q_feats = F.pad(q_feats, (0, 0, 0, pad))
    k_logits = F.pad(k_logits, (0, 0, 0, pad), value=-math.inf)
    v1 = F.pad(torch.cat([v, torch.ones_like(v[..., :1])], -1), (0, 0, 0, pad))  # (B, H, Lp, E = D + 1)
    decay = F.pad(decay, (0, pad))  # (H, Lp)
    e = v1.shape[-1]

    s = running_stabiliser(k_logits)  # (B, H, Lp)
    phi = torch.exp(k_logits - s[..., None])  # (B, H, Lp, m) in (0, 1], 0 at padded keys

    # leaves: exact dense lower-triangular products
    n = padded // leaf
    qc, kc = q_feats.view(b, h, n, leaf, m), phi.view(b, h, n, leaf, m)
    sc, v1c = s.view(b, h, n, leaf), v1.view(b, h, n, leaf, e)
    offset = torch.arange(leaf, device=q_feats.device)
    offset = offset[:, None] - offset[None, :]  # (C, C): t − u
    toeplitz = decay[:, offset.clamp_min(0)] * (offset >= 0)  # (H, C, C), 0 above the diagonal
    scale = torch.exp((sc[..., None, :] - sc[..., :, None]).clamp_max(0.0))  # (B, H, N, C, C): e^{s_u − s_t}
    kernel_scores = (qc @ kc.transpose(-1, -2)) * scale  # φ(q_t)·φ̃(k_u) e^{s_u − s_t}
    acc = ((kernel_scores * toeplitz[None, :, None]) @ v1c).view(b, h, padded, e)  # (B, H, Lp, E)
    mass = (kernel_scores * (offset >= 0)).sum(-1).view(b, h, padded)  # (B, H, Lp)

    size = leaf
    while size < padded:  # log2(Lp / C) levels: sibling blocks (S, T) of `size` positions

        def pair(x: Tensor, size: int = size) -> Tensor:  # (B, H, Lp, ...) -> (B, H, N, 2, size, ...)
            return x.unflatten(2, (-1, 2, size))

        s_pair = pair(s)  # (B, H, N, 2, s)
        sigma = s_pair[:, :, :, 0, -1:]  # (B, H, N, 1): the stabiliser at the end of S
        phi_s = pair(phi)[:, :, :, 0] * torch.exp((s_pair[:, :, :, 0] - sigma).clamp_max(0.0))[..., None]
        q_t, v1_s = pair(q_feats)[:, :, :, 1], pair(v1)[:, :, :, 0]
        target_scale = torch.exp((sigma - s_pair[:, :, :, 1]).clamp_max(0.0))  # (B, H, N, s)
        kernel = torch.fft.rfft(F.pad(decay[:, 1 : 2 * size], (1, 0)), n=2 * size, dim=-1)  # (H, s + 1)
        level = 0
        for start in range(0, m, block):
            args = (q_t[..., start : start + block], phi_s[..., start : start + block], v1_s, kernel)
            level = level + (
                checkpoint(_sibling_block, *args, use_reentrant=False) if use_checkpoint else _sibling_block(*args)
            )
        level_mass = (q_t @ phi_s.sum(-2)[..., None]).squeeze(-1)  # (B, H, N, s)
        acc = acc + torch.stack([torch.zeros_like(level), level * target_scale[..., None]], 3).view(b, h, padded, e)
        mass = mass + torch.stack([torch.zeros_like(level_mass), level_mass * target_scale], 3).view(b, h, padded)
        size *= 2
    return normalised_rows(acc[:, :, :length], mass[:, :, :length], visible)


def causal_kernelized_rpe_reference(q_feats: Tensor, k_logits: Tensor, v: Tensor, decay: Tensor) -> Tensor:
    """The plain formula the blocked path must equal (tests, float64): explicit (L, L) matrices,
    a global stabiliser. Same shapes as ``causal_kernelized_rpe_attention``; rows with no
    visible key give 0."""
    length = q_feats.shape[-2]
    p = torch.arange(length)[:, None] - torch.arange(length)[None, :]  # i − j
    c = decay[:, p.clamp_min(0)] * (p >= 0)  # (H, L, L)
    phi = torch.exp(k_logits - k_logits.amax(dim=(-2, -1), keepdim=True).clamp_min(-1e300))
    a = (q_feats @ phi.transpose(-1, -2)) * c  # (B, H, L, L)
    den = a.sum(-1, keepdim=True)
    return torch.where(den > 0, a @ v / den.clamp_min(torch.finfo(den.dtype).tiny), torch.zeros(()))


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


@register_mechanism("kernel_rpe", KernelRPEConfig, causal=True, cross=True, key_padding=True, family="kernel")
class KernelRPEAttention(Attention):
    """Kernelized attention with RPE (Luo et al. 2021): random features, Toeplitz exp(b) by FFT."""

    def __init__(self, cfg: KernelRPEConfig, *, heads: int, dim_head: int, max_len: int):
        super().__init__(cfg, heads=heads, dim_head=dim_head, max_len=max_len)
        check_kernel_config(cfg.num_features, cfg.redraw_interval, cfg.feature_eps)
        if cfg.fft_dtype not in FFT_DTYPES:
            raise ValueError(f"fft_dtype must be one of {sorted(FFT_DTYPES)}, got '{cfg.fft_dtype}'")
        if cfg.fft_feature_block < 1:
            raise ValueError(f"fft_feature_block must be >= 1, got {cfg.fft_feature_block}")
        if cfg.causal_leaf < 1 or cfg.causal_leaf & (cfg.causal_leaf - 1):
            raise ValueError(f"causal_leaf must be a power of two >= 1 (e.g. 512), got {cfg.causal_leaf}")
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
        projection = self.projection.step(None if context is None else context.step)  # redraw by the global step
        out_dtype = output_dtype(q)
        fft_dtype = torch.promote_types(FFT_DTYPES[self.cfg.fft_dtype], work_dtype(q))
        visible = visible_rows(q.shape[0], lq, lk, kpm, causal, q.device)
        with torch.autocast(q.device.type, enabled=False):  # features and FFT in float32/float64
            q, k, v = q.to(fft_dtype), k.to(fft_dtype), v.to(fft_dtype)
            if self.cfg.normalize_qk:  # §3.3: exp(q̂·k̂) once the features' d^(-1/4) scaling is applied
                q = F.normalize(q, dim=-1) * q.shape[-1] ** 0.25
                k = F.normalize(k, dim=-1) * k.shape[-1] ** 0.25
            q_feats = softmax_kernel_features(q, projection, is_query=True, eps=self.cfg.feature_eps).to(fft_dtype)
            if causal:
                out = self._causal(q_feats, key_log_features(k, projection, kpm), v, visible)
            else:
                k_feats = softmax_kernel_features(k, projection, is_query=False, key_padding_mask=kpm).to(fft_dtype)
                coeffs = relative_coefficients(self.rel_bias, lq, lk, causal=False, dtype=fft_dtype)
                if max(lq, lk) <= self.cfg.dense_max_len:
                    out = dense_rpe_attention(q_feats, k_feats, v, coeffs, visible=visible)
                else:
                    out = kernelized_rpe_attention(
                        q_feats,
                        k_feats,
                        v,
                        coeffs,
                        visible=visible,
                        block=self.cfg.fft_feature_block,
                        use_checkpoint=self.cfg.checkpoint_fft and torch.is_grad_enabled(),
                    )
        return out.to(out_dtype)

    def _causal(self, q_feats: Tensor, k_logits: Tensor, v: Tensor, visible: Tensor | None) -> Tensor:
        """Bottom-right aligned causal attention through the square blocked path: with Lk > Lq
        the queries are left-padded (their rows dropped), with Lq > Lk the keys (as padded keys)."""
        lq, lk = q_feats.shape[-2], k_logits.shape[-2]
        length = max(lq, lk)
        q_feats = F.pad(q_feats, (0, 0, length - lq, 0))
        k_logits = F.pad(k_logits, (0, 0, length - lk, 0), value=-math.inf)
        v = F.pad(v, (0, 0, length - lk, 0))
        out = causal_kernelized_rpe_attention(
            q_feats,
            k_logits,
            v,
            causal_decay(self.rel_bias, length, dtype=q_feats.dtype),
            leaf=self.cfg.causal_leaf,
            block=self.cfg.fft_feature_block,
            use_checkpoint=self.cfg.checkpoint_fft and torch.is_grad_enabled(),
        )[:, :, length - lq :]
        return out if visible is None else out.masked_fill(~visible[..., None], 0.0)

    def metrics(self) -> dict[str, float]:
        b = self.rel_bias.detach()
        return {"feature_redraws": float(self.projection.redraws), "rpe_bias_range": float(b.max() - b.min())}
