"""Skyformer (Chen, Zeng, Ji & Yang 2021, "Skyformer: Remodel Self-Attention with Gaussian
Kernel and Nyström Method", NeurIPS 2021, arXiv:2111.00035; reference code
pkuzengqi/Skyformer ``src/models/attention_skyformer.py``).

Softmax is replaced by the (unnormalised) Gaussian kernel, "Kernelized Attention":

    κ(q, k) = exp(−‖q − k‖² / (2√d)),     out = C V,   C_ij = κ(q_i, k_j)

and C is approximated by the Nyström method applied to the positive semi-definite
*symmetrised* matrix of all 2L points X = [Q; K]:  B = κ(X, X) = [[κ(Q,Q), C], [Cᵀ, κ(K,K)]].
With m landmark points S ⊂ X (m/2 sampled among the queries, m/2 among the keys),

    C V ≈ κ(Q, S) (κ(S, S) + λI)⁻¹ κ(S, K) V          (L × m)(m × m)(m × L)(L × d)

taken right to left: O(L·m·d + m³) time, O(L·m) memory. q, k are scaled by d^(-1/4) so the
exponent is −‖q − k‖²/(2√d), computed as q·k − ‖q‖²/2 − ‖k‖²/2.

Exactness: when every point of X is a landmark (num_landmarks ≥ Lq + Lk), λ = 0 and the
inverse exact (``pinv_iterations = 0``), the approximation is C itself (Nyström is exact on
the landmarks' span); the tests check this against C V written out in float64.

Deviations from the reference code: (1) landmarks are drawn uniformly *without*
replacement among the valid (unpadded) queries and keys of each example (the reference
draws with replacement, so duplicates waste landmarks), anew at every call as in the
reference; with ``num_landmarks ≥ Lq + Lk`` every point is used, deterministically;
(2) the scale is d^(-1/4) of the actual head size (the reference hard-codes 32^(-1/4));
(3) the inverse: the reference symmetrically normalises κ(S,S) + 0.1·I by its row sums and
runs 6 Newton–Schulz iterations initialised with a maximum pooled over the whole batch; we
normalise the same way but initialise per (example, head) matrix, so examples do not
couple; ``pinv_iterations = 0`` uses an exact pseudo-inverse (torch.linalg.pinv) instead;
(4) padded keys are zeroed in κ(S, K) and in V and never chosen as landmarks (a padded
landmark slot, when too few valid points exist, is a zero row and column, the ridge
included), so they have no influence; a query whose keys are all padded gets 0. When Lq = Lk
(self-attention) a padded position is taken to be a padded query as well and is never
sampled as a landmark; (5) padding amount: the landmark draw is one priority per real-token rank over a fixed width
(max_len), so an example alone and the same example padded in a batch choose the same real
tokens and give the same outputs (tested in float64 to 1e-10 in
``tests/mechanisms/test_padding_invariance.py``); an example with 2ℓ ≤ m (self-attention) uses
all its points, as it does alone; (6) random draws: the priorities come from a generator seeded
by (the layer's ``seed``, the training step ``context.step``), drawn on the CPU, and are shared
by the rows of the batch: new landmarks every training step (the reference draws anew at every
call, and per row), the same for every forward pass of one step and for an example at any row
of any batch, whatever torch's global random state (tested registry-wide in
``tests/test_batch_rows.py``). The price: the examples of one batch sample the same real-token
ranks (each its own tokens at those ranks), where the reference draws each row independently.
``seed = -1`` (default): each instance (layer) draws its own seed from torch's RNG when built.

Protocol settings under ``scale=lra`` (``PROTOCOLS`` below): ``protocol=pytorch`` runs
Skyformer's own configuration (pkuzengqi/Skyformer ``src/config.py``, every task:
``"skyformer": {"nb_features": 128, ...}``, the number of sampled points of
``src/models/attention_skyformer.py``): 128 landmarks, the default here. LRA and
mlpen/Nystromformer ran no Skyformer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from harness.core import Attention, AttentionContext, draw_generator, instance_seed, register_mechanism, zero_padded


@dataclass
class SkyformerConfig:
    num_landmarks: int = 128  # m sampled points of [Q; K] (half each): the accuracy/speed knob; exact at m ≥ Lq + Lk
    ridge: float = 0.1  # λ added to the landmark kernel matrix before inverting (the reference's 1e-1)
    pinv_iterations: int = 6  # Newton–Schulz iterations of the inverse; 0 = exact torch.linalg.pinv
    seed: int = -1  # landmark-draw seed; -1 = each instance (layer) draws its own from torch's RNG when built


def gaussian_kernel(x: Tensor, y: Tensor) -> Tensor:
    """x: (..., N, d), y: (..., M, d), already scaled by d^(-1/4) -> (..., N, M) exp(−‖x − y‖²/2)."""
    sq = x.square().sum(-1, keepdim=True) / 2 + y.square().sum(-1).unsqueeze(-2) / 2
    return torch.exp((x @ y.transpose(-1, -2) - sq).clamp_max(0.0))


def gaussian_attention_reference(q: Tensor, k: Tensor, v: Tensor, *, key_padding_mask=None) -> Tensor:
    """Kernelized attention C V with C_ij = exp(−‖q_i − k_j‖²/(2√d)), written out in float64."""
    q, k, v = q.double(), k.double(), v.double()
    dist = (q[..., :, None, :] - k[..., None, :, :]).square().sum(-1)  # (B, H, Lq, Lk)
    c = torch.exp(-dist / (2 * q.shape[-1] ** 0.5))
    if key_padding_mask is not None:
        c = c.masked_fill(key_padding_mask[:, None, None, :], 0.0)
    return c @ v


def sample_landmarks(valid: Tensor, count: int, priority: Tensor | None = None) -> Tensor:
    """valid: (B, N) bool -> (B, min(count, N)) indices, uniformly without replacement among the
    valid positions first (the invalid ones only fill slots when too few are valid).

    priority: (B, W ≥ N) uniform draws, one per *real-token rank* (default: drawn here, W = N):
    the r-th valid position of an example takes priority r, so with a draw of fixed width (the
    module's max_len) the chosen real tokens do not depend on how much padding the batch has."""
    if priority is None:
        priority = torch.rand(valid.shape, device=valid.device)
    rank = (valid.cumsum(-1) - 1).clamp_min(0)  # (B, N) place among the valid positions
    keys = priority.gather(1, rank) + (~valid).float() * 2  # invalid sort last
    return keys.argsort(-1)[:, : min(count, valid.shape[1])]


def newton_schulz_inverse(a: Tensor, iterations: int) -> Tensor:
    """Inverse of each symmetric positive matrix a (..., m, m) by Newton–Schulz (as Nyströmformer
    and Skyformer), initialised per matrix with Z₀ = aᵀ/(‖a‖₁‖a‖∞)."""
    norm = a.abs().sum(-2).amax(-1) * a.abs().sum(-1).amax(-1)  # (...,)
    z = a.transpose(-1, -2) / norm.clamp_min(torch.finfo(a.dtype).tiny)[..., None, None]
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    for _ in range(iterations):
        az = a @ z
        z = 0.25 * z @ (13 * eye - az @ (15 * eye - az @ (7 * eye - az)))
    return z


def skyformer_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    num_landmarks: int,
    ridge: float,
    pinv_iterations: int,
    key_padding_mask: Tensor | None,
    draw_length: int = 0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """q: (B, H, Lq, d), k, v: (B, H, Lk, d) -> (B, H, Lq, d) in at least float32. draw_length:
    the width of the landmark draw (``sample_landmarks``), the module's max_len; generator: the
    CPU generator of the draw, one draw shared by the rows (None: torch's global RNG, per row)."""
    b, h, lq, d = q.shape
    lk = k.shape[-2]
    dtype = torch.promote_types(q.dtype, torch.float32)
    scale = d**-0.25
    q, k = q.to(dtype) * scale, k.to(dtype) * scale
    v = zero_padded(v.to(dtype), key_padding_mask)
    valid_k = torch.ones(b, lk, dtype=torch.bool, device=q.device) if key_padding_mask is None else ~key_padding_mask
    # Self-attention (Lq = Lk): a padded position is a padded query too, never a landmark.
    valid_q = valid_k if lq == lk else torch.ones(b, lq, dtype=torch.bool, device=q.device)
    if num_landmarks >= lq + lk:  # every point of [Q; K] is a landmark: deterministic, exact
        idx_q = torch.arange(lq, device=q.device).expand(b, lq)
        idx_k = torch.arange(lk, device=q.device).expand(b, lk)
    else:
        # one draw for both sides: (1, 2, W) from the generator, shared by the rows; (B, 2, W) without
        width = max(draw_length, lq, lk)
        if generator is not None:
            priority = torch.rand(1, 2, width, generator=generator).to(q.device).expand(b, -1, -1)
        else:
            priority = torch.rand(b, 2, width, device=q.device)
        idx_q = sample_landmarks(valid_q, num_landmarks - num_landmarks // 2, priority[:, 0])  # (B, mq)
        idx_k = sample_landmarks(valid_k, num_landmarks // 2, priority[:, 1])  # (B, mk)
    gather = lambda x, idx: x.gather(2, idx[:, None, :, None].expand(-1, h, -1, d))  # noqa: E731
    landmarks = torch.cat([gather(q, idx_q), gather(k, idx_k)], dim=2)  # (B, H, m, d)
    land_valid = torch.cat([valid_q.gather(1, idx_q), valid_k.gather(1, idx_k)], dim=1)  # (B, m)
    lv = land_valid[:, None, :].to(dtype)  # (B, 1, m)
    kernel_qs = gaussian_kernel(q, landmarks) * lv[:, :, None, :]  # (B, H, Lq, m)
    kernel_sk = zero_padded(gaussian_kernel(k, landmarks), key_padding_mask) * lv[:, :, None, :]  # (B, H, Lk, m)
    kernel_ss = gaussian_kernel(landmarks, landmarks) * lv[..., :, None] * lv[..., None, :]  # (B, H, m, m)
    # ridge on the real landmarks only: a masked slot stays an all-zero row and column, whose
    # (pseudo-)inverse is zero and which changes no norm of the Newton–Schulz start
    kernel_ss = kernel_ss + torch.diag_embed(ridge * lv.expand(-1, h, -1))
    if pinv_iterations > 0:
        # symmetric row-sum normalisation D^(-1/2) W D^(-1/2) before Newton–Schulz, as the reference
        d_inv_sqrt = kernel_ss.sum(-1).clamp_min(torch.finfo(dtype).tiny).rsqrt()  # (B, H, m)
        normed = d_inv_sqrt[..., :, None] * kernel_ss * d_inv_sqrt[..., None, :]
        inverse = d_inv_sqrt[..., :, None] * newton_schulz_inverse(normed, pinv_iterations) * d_inv_sqrt[..., None, :]
    else:
        inverse = torch.linalg.pinv(kernel_ss, hermitian=True)
    context = kernel_sk.transpose(-1, -2) @ v  # (B, H, m, d)
    return kernel_qs @ (inverse @ context)  # (B, H, Lq, d)


# The authors' settings per scale=lra protocol (sources: the module docstring).
PROTOCOLS = {"pytorch": {"*": {"num_landmarks": 128}}}  # Skyformer src/config.py "skyformer": nb_features 128


@register_mechanism("skyformer", SkyformerConfig, cross=True, key_padding=True, family="low_rank", protocols=PROTOCOLS)
class Skyformer(Attention):
    """Skyformer (Chen et al. 2021): Gaussian-kernel attention, Nyström on the symmetrised kernel."""

    def __init__(self, cfg: SkyformerConfig, *, heads: int, dim_head: int, max_len: int):
        super().__init__(cfg, heads=heads, dim_head=dim_head, max_len=max_len)
        if cfg.num_landmarks < 2 or cfg.ridge < 0 or cfg.pinv_iterations < 0:
            raise ValueError(f"skyformer needs num_landmarks >= 2, ridge >= 0 and pinv_iterations >= 0, got {cfg}")
        if cfg.seed < -1:
            raise ValueError(f"skyformer needs seed >= -1 (-1: drawn per instance), got {cfg.seed}")
        self.seed = instance_seed(cfg.seed)

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
            out = skyformer_attention(
                q,
                k,
                v,
                num_landmarks=self.cfg.num_landmarks,
                ridge=self.cfg.ridge,
                pinv_iterations=self.cfg.pinv_iterations,
                key_padding_mask=key_padding_mask,
                draw_length=self.max_len,
                generator=draw_generator(self.seed, 0 if context is None else int(context.step)),
            )
        return out.to(q.dtype)
