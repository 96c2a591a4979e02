"""Performer / FAVOR+ (Choromanski, Likhosherstov, Dohan, Song, Gane, Sarlos, Hawkins, Davis,
Mohiuddin, Kaiser, Belanger, Colwell, Weller 2021, "Rethinking Attention with Performers",
arXiv:2009.14794).

The softmax kernel is an expectation over Gaussian projections w ~ N(0, I_d):

    exp(q·k) = E_w[φ(q)ᵀ φ(k)],   φ(x) = exp(Wx − |x|²/2) / √m     (W: m × d, "positive random features")
    Attention(Q, K, V)_i ≈ φ(q_i)ᵀ Σ_j φ(k_j) v_jᵀ  /  φ(q_i)ᵀ Σ_j φ(k_j)

with q, k pre-scaled by d^(-1/4) so that q·k carries softmax's 1/√d. The rows of W are
block-orthogonal (QR of Gaussian blocks) and rescaled by chi(d)-distributed norms, which keeps
each row's marginal Gaussian and lowers the estimator's variance. ``kernel="relu"`` is the
paper's generalised attention φ(x) = ReLU(Wx) + ε (not an approximation of softmax).
Stabilisers: each query's features are divided by their row maximum, the keys' by their
maximum over all valid keys; both cancel in the ratio. Causal attention uses prefix sums
over chunks: inside a chunk the C × C masked score block is formed, across chunks the
states Σ φ(k) vᵀ are summed exclusively (in float32). Causal keys are stabilised by a running
maximum s_j over keys ≤ j (``causal_key_features``); query i's sums are taken relative to
exp(s_i), so every factor is ≤ 1 and no future key enters even numerically.

Accuracy/speed: ``num_features`` (m). The estimator's error falls like 1/√m; time is
O(L·m·d), memory O(L·m) (+ O((L/C)·m·d + L·C) in causal mode, C = ``causal_chunk_size``,
i.e. O(L·m) for C ≥ d). Redrawing W every ``redraw_interval`` global training steps
(``context.step``) avoids fitting one unlucky draw; W and the step of its last redraw are
buffers, saved in checkpoints.

Stabiliser placement as the references (google-research ``fast_attention.py``
``softmax_kernel_transformation`` and performer-pytorch ``softmax_kernel``): the max is taken
of w·x' alone, then φ = (exp(w·x' − |x'|²/2 − max) + eps)/√m; tested against the installed
performer-pytorch with the same projection (``tests/mechanisms/test_performer.py``).

``kernel="relu_deterministic"`` is LRA's default Performer (google-research/long-range-arena
``lra_benchmarks/models/performer/performer.py``: ``_DEFAULT_ATTENTION_FN_CLS = 'generalized'``;
``performer_attention.py`` ``make_fast_generalized_attention``: ``features_type='deterministic'``,
so no projection, ``kernel_fn=relu``, ``kernel_epsilon=0.001``, data not rescaled): φ(x) = ReLU(x)
+ ε, ``num_features`` unused. Protocol settings under ``scale=lra`` (``PROTOCOLS`` below):

* ``protocol=lra``: that kernel with ε = 10⁻³ on Text, Retrieval, Image and Pathfinder (their
  configs set no ``model_kwargs``); on ListOps FAVOR+ with 2 features, orthogonal rows with chi
  norms, ε = 10⁻⁶ (``listops/configs/performer_base.py``: ``attention_fn_cls="softmax"``,
  ``nb_features=2``, ``ortho_scaling=0.0``, read by ``listops/train.py``;
  ``make_fast_softmax_attention`` defaults ``numerical_stabilizer=0.000001``,
  ``redraw_features=True``). LRA redraws at every call from a seed made of the batch's query sum
  (``jnp.ceil(jnp.sum(query) * 1e7)``); ours redraws every training step (``redraw_interval=1``).
* ``protocol=nystromformer``: FAVOR+ with 256 features (mlpen/Nystromformer
  ``LRA/code/lra_config.py`` ``"performer-256": {"rp_dim": 256, "kernel_type": "relu"}``;
  ``LRA/code/attention_performer.py`` builds performer-pytorch's ``FastAttention`` with
  ``kernel_fn=nn.ReLU()`` but ``generalized_attention=False``, so the ``softmax_kernel`` runs
  and the kernel_fn is unused), ε = 10⁻⁴ (its default), one draw for good (``FastAttention``
  alone never redraws).
* ``protocol=pytorch``: the same with 128 features (pkuzengqi/Skyformer ``src/config.py``
  ``"performer": {"rp_dim": 128, "kernel_type": "exp"}``; ``src/models/attention_performer.py``,
  ``src/models/performer.py``).

Both PyTorch codes divide Q and K by d^(1/4) before ``FastAttention``, which divides them by
d^(1/4) again (``normalize_data=True``): their FAVOR+ approximates softmax(q·k/d), ours
softmax(q·k/√d). Not reproduced.

Deviations from the references: the key stabiliser is a max over valid keys only (the
references take it over all keys, so padding could move it); padded key features are zeroed
(the references have no key padding in FastAttention). Causal mode adds eps to the query
features only and stabilises keys by a running (prefix) max: it cancels in the ratio only
without an additive eps (the references add eps and take one max over all keys, so their
causal outputs depend on future keys; a max over all keys also underflows the past when
future keys are large).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from harness.core import Attention, AttentionContext, register_mechanism, zero_padded

KERNELS = ("softmax", "relu", "relu_deterministic")


@dataclass
class PerformerConfig:
    num_features: int = 256  # random features m: error ~ 1/√m, cost O(L·m·d) — the accuracy/speed knob
    kernel: str = "softmax"  # "softmax" (FAVOR+), "relu" (generalised, ReLU(Wx)) or "relu_deterministic" (ReLU(x), LRA)
    orthogonal_features: bool = True  # block-orthogonal rows with chi norms (False: i.i.d. Gaussian)
    redraw_interval: int = 1000  # global training steps (context.step) between feature redraws; 0 = never
    feature_eps: float = (
        1e-4  # added to the exp (softmax) or ReLU (relu) features of queries and keys: positive denominators
    )
    causal_chunk_size: int = 128  # keys per block of the chunked causal prefix sum


# ----------------------------------------------------------------------------- feature maps


def gaussian_orthogonal_random_matrix(
    num_features: int, dim: int, *, orthogonal: bool = True, device: torch.device | None = None
) -> Tensor:
    """(m, d) projection whose rows are marginally N(0, I_d): block-orthogonal rows (QR of
    Gaussian d×d blocks, stacked and truncated) rescaled by chi(d) norms, or i.i.d. rows."""
    if not orthogonal:
        return torch.randn(num_features, dim, device=device)
    blocks = math.ceil(num_features / dim)
    q, r = torch.linalg.qr(torch.randn(blocks, dim, dim, device=device))  # (N, d, d)
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)  # Haar-uniform columns
    rows = q.transpose(-2, -1).reshape(blocks * dim, dim)[:num_features]  # (m, d), orthonormal per block
    norms = torch.randn(num_features, dim, device=device).norm(dim=-1)  # (m,) ~ chi(d)
    return rows * norms[:, None]


def softmax_kernel_features(
    x: Tensor,
    projection: Tensor,
    *,
    is_query: bool,
    key_padding_mask: Tensor | None = None,
    eps: float = 1e-4,
    eps_keys: bool = False,
) -> Tensor:
    """FAVOR+ features φ(x) = exp(w·x' − |x'|²/2 − stabiliser)/√m, x' = x·d^(-1/4).

    x: (B, H, L, D), projection: (m, D) -> (B, H, L, m) in float32 (float64 for float64 x).
    The stabiliser is a max of w·x' (not of w·x' − |x'|²/2), as both references take it:
    queries: row max; keys: max over valid keys and features (so padded keys cannot move it).
    With an additive eps the placement matters: it sets how much weight eps carries. Queries, and keys when
    ``eps_keys`` (what ``performer`` uses), then get + eps/√m,
    i.e. φ = (exp(…) + eps)/√m, as the references place it (google-research performer
    ``softmax_kernel_transformation``: ``ratio * (exp(...) + numerical_stabilizer)``;
    performer-pytorch ``softmax_kernel``: ``ratio * (exp(...) + eps)``, queries and keys alike).
    ``eps_keys=False`` (the default) keeps key features without eps for ``kernel_rpe``, whose
    causal path relies on it. Padded key rows are zeroed after the eps."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    x = x.to(dtype) * x.shape[-1] ** -0.25
    # In-place where autograd allows it (the matmul saves its inputs, not its output), and the
    # 1/√m folded into the exponent: two (B, H, L, m) tensors per call instead of five.
    dash = x @ projection.to(dtype).t()  # (B, H, L, m): w·x'
    log_scale = 0.5 * math.log(projection.shape[0])  # φ = exp(logits − stab − log √m)
    with torch.no_grad():  # the stabiliser is a max of w·x' alone, as both references take it
        if is_query:
            stab = dash.amax(-1, keepdim=True)  # (B, H, L, 1)
        else:
            valid = (
                dash if key_padding_mask is None else dash.masked_fill(key_padding_mask[:, None, :, None], -math.inf)
            )
            stab = valid.amax(dim=(-2, -1), keepdim=True)  # (B, H, 1, 1)
            stab = torch.where(torch.isfinite(stab), stab, torch.zeros_like(stab))
    # one pass over (L, m) adds −(|x'|²/2 + stab + log √m), a (B, H, L, 1) column negated before it
    # is broadcast (sub_ would negate the whole (L, m) gradient in the backward pass)
    shift = x.square().sum(-1, keepdim=True).mul(-0.5) - (stab + log_scale)  # (B, H, L, 1)
    feats = torch.exp(dash.add_(shift))  # exp saves its output: no in-place add after it
    if is_query or eps_keys:
        feats = feats + eps * projection.shape[0] ** -0.5
    return feats if is_query else zero_padded(feats, key_padding_mask)


def deterministic_relu_features(x: Tensor, *, key_padding_mask: Tensor | None = None, eps: float = 1e-3) -> Tensor:
    """LRA's default generalised attention (``features_type='deterministic'``): φ(x) = ReLU(x) + eps,
    no projection and no d^(-1/4) scaling: (B, H, L, D) -> (B, H, L, D)."""
    feats = F.relu(x.to(torch.promote_types(x.dtype, torch.float32))) + eps
    return zero_padded(feats, key_padding_mask)


def relu_kernel_features(
    x: Tensor, projection: Tensor, *, key_padding_mask: Tensor | None = None, eps: float = 1e-3
) -> Tensor:
    """Generalised-attention features ReLU(W x·d^(-1/4)) + eps: (B, H, L, D) -> (B, H, L, m)."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    feats = F.relu((x.to(dtype) * x.shape[-1] ** -0.25) @ projection.to(dtype).t()) + eps
    return zero_padded(feats, key_padding_mask)


# ----------------------------------------------------------------------------- linear attention


def _divide(num: Tensor, den: Tensor) -> Tensor:
    """num / den with den ≥ 0; a row with den = 0 (no visible key) has num = 0 and gives 0."""
    den = den.float() if den.dtype in (torch.float16, torch.bfloat16) else den
    return (num / den.clamp_min(torch.finfo(den.dtype).tiny)[..., None]).to(num.dtype)


def linear_attention(q_feats: Tensor, k_feats: Tensor, v: Tensor) -> Tensor:
    """Non-causal: (B, H, Lq, m), (B, H, Lk, m), (B, H, Lk, D) -> (B, H, Lq, D).

    v gets a column of ones, so one product Σ_j φ(k_j) [v_j, 1]ᵀ holds both the state Σ φ(k) vᵀ
    and the normaliser Σ φ(k), and one more gives numerator and denominator together: two
    matrix products forward and backward, no separate sums over (L, m)."""
    v1 = torch.cat([v, v.new_ones(*v.shape[:-1], 1)], -1)  # (B, H, Lk, D+1)
    kv = v1.transpose(-2, -1) @ k_feats  # (B, H, D+1, m); this way round the gradient of k_feats is contiguous
    out = q_feats @ kv.transpose(-2, -1)  # (B, H, Lq, D+1): numerator | denominator
    return _divide(out[..., :-1], out[..., -1])


def causal_key_features(
    x: Tensor, projection: Tensor, *, key_padding_mask: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Causal FAVOR+ key features with a running (prefix) stabiliser that sees the past only.

    x: (B, H, L, D) -> features (B, H, L, m) and stabiliser s (B, H, L), float32 (float64 for
    float64 x), with φ(k_j) = features_j · exp(s_j) and s_j = max_{j' ≤ j, valid} max_r log φ_r(k_{j'})
    (non-decreasing in j). No eps: the stabilisers cancel exactly in the ratio. Positions with no
    valid key up to them get s = −1e4 (their features are zero anyway); padded rows are zeroed."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    x = x.to(dtype) * x.shape[-1] ** -0.25
    logits = (x @ projection.to(dtype).t()).sub_(x.square().sum(-1, keepdim=True) / 2)  # (B, H, L, m)
    with torch.no_grad():
        row = logits.amax(-1)  # (B, H, L)
        if key_padding_mask is not None:
            row = row.masked_fill(key_padding_mask[:, None, :], -math.inf)
        stab = row.cummax(-1).values
        stab = torch.where(torch.isfinite(stab), stab, torch.full_like(stab, -1e4))
    feats = torch.exp(logits.sub_(stab[..., None] + 0.5 * math.log(projection.shape[0])))
    return zero_padded(feats, key_padding_mask), stab


def causal_linear_attention(
    q_feats: Tensor, k_feats: Tensor, v: Tensor, *, chunk_size: int = 128, k_stab: Tensor | None = None
) -> Tensor:
    """Causal (query i sees key j ≤ i + Lk − Lq) by chunked prefix sums, no O(L·m·D) tensor.

    (B, H, Lq, m), (B, H, Lk, m), (B, H, Lk, D) -> (B, H, Lq, D). ``k_stab`` (B, H, Lk),
    non-decreasing, is a per-key log-scale: the keys' features are ``k_feats · exp(k_stab)``
    (``causal_key_features``). Query i's sum is taken relative to exp(s_i), s_i the stabiliser
    of its last visible key, so every factor exp(s_j − s_i) is ≤ 1 and nothing after i enters
    (None: all zero, plain features)."""
    b, h, lq, m = q_feats.shape
    d = v.shape[-1]
    lk = k_feats.shape[-2]
    acc = torch.promote_types(v.dtype, torch.float32)  # prefix sums over chunks in float32 at least
    if k_stab is None:
        k_stab = torch.zeros(b, h, lk, dtype=acc, device=v.device)
    k_stab = k_stab.to(acc)
    offset = lk - lq
    if offset < 0:  # the first -offset queries see no key: prepend all-zero keys (they add nothing)
        k_feats, v = F.pad(k_feats, (0, 0, -offset, 0)), F.pad(v, (0, 0, -offset, 0))
        first = k_stab[..., :1] if lk > 0 else torch.zeros(b, h, 1, dtype=acc, device=v.device)
        k_stab = torch.cat([first.expand(b, h, -offset), k_stab], -1)
    elif offset > 0:  # keys before the first query's diagonal: align by prepending zero queries
        q_feats = F.pad(q_feats, (0, 0, offset, 0))
    length = k_feats.shape[-2]  # = number of (aligned) queries; query i sees keys 0..i

    c = max(1, min(chunk_size, length))
    n = math.ceil(length / c)
    pad = n * c - length
    qc = F.pad(q_feats, (0, 0, 0, pad)).reshape(b, h, n, c, m)
    kc = F.pad(k_feats, (0, 0, 0, pad)).reshape(b, h, n, c, m)
    vc = F.pad(v, (0, 0, 0, pad)).reshape(b, h, n, c, d)
    s = torch.cat([k_stab, k_stab[..., -1:].expand(b, h, pad)], -1).reshape(b, h, n, c)  # (B, H, N, C)
    sigma = s[..., -1]  # (B, H, N): the stabiliser at the end of each chunk

    # chunk state relative to its own end: Σ_{j ∈ chunk} φ(k_j) exp(s_j − σ_n) v_jᵀ
    kc_end = kc * torch.exp(s - sigma[..., None]).to(kc.dtype)[..., None]
    chunk_kv = torch.einsum("bhncm,bhncd->bhnmd", kc_end, vc).to(acc)  # (B, H, N, m, D)
    chunk_z = kc_end.sum(-2).to(acc)  # (B, H, N, m)
    # exclusive prefix relative to σ_{n−1}: state_n = Σ_{n' < n} chunk_n' · exp(σ_n' − σ_{n−1})
    prev = torch.cat([sigma[..., :1], sigma[..., :-1]], -1)  # (B, H, N): σ_{n−1}
    earlier = torch.ones(n, n, dtype=torch.bool, device=qc.device).tril(-1)
    decay = torch.exp((sigma[..., None, :] - prev[..., :, None]).clamp_max(0)) * earlier  # (B, H, N, N')
    kv_state = torch.einsum("bhnk,bhkmd->bhnmd", decay, chunk_kv).to(q_feats.dtype)
    z_state = torch.einsum("bhnk,bhkm->bhnm", decay, chunk_z).to(q_feats.dtype)

    q_scale = torch.exp((prev[..., None] - s).clamp_max(0)).to(qc.dtype)[..., None]  # (B, H, N, C, 1)
    rel = torch.exp((s[..., None, :] - s[..., :, None]).clamp_max(0))  # (B, H, N, C, C'): exp(s_j − s_i)
    scores = torch.einsum("bhncm,bhnkm->bhnck", qc, kc) * rel.to(qc.dtype)  # (B, H, N, C, C)
    tril = torch.ones(c, c, dtype=torch.bool, device=qc.device).tril()
    scores = scores.masked_fill(~tril, 0.0)
    num = (qc * q_scale) @ kv_state + scores @ vc  # (B, H, N, C, D)
    den = ((qc * q_scale) @ z_state.unsqueeze(-1)).squeeze(-1) + scores.sum(-1)  # (B, H, N, C)
    out = _divide(num, den).reshape(b, h, n * c, d)
    return out[:, :, length - lq : length]


def output_dtype(x: Tensor) -> torch.dtype:
    """What a mechanism returns: the autocast dtype under autocast, else the input's dtype."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def work_dtype(x: Tensor) -> torch.dtype:
    """Dtype of the feature products: bf16/fp32/fp64 as given; float16 is too narrow for
    stabilised exp-features, so it works in float32."""
    dtype = output_dtype(x)
    return torch.float32 if dtype == torch.float16 else dtype


# ----------------------------------------------------------------------------- module


class RandomFeatureProjection(nn.Module):
    """The (m, d) random projection, redrawn every ``redraw_interval`` global training steps
    (never in eval): steps 0..n-1 use draw 0, n..2n-1 draw 1, ... The projection, the step of
    the last redraw and the redraw count are buffers, so a checkpoint restores them and a
    resumed run continues with the same features and schedule.

    ``step(global_step)`` with the trainer's step (``context.step``); several forward passes
    in one step (accumulation, two towers) share one draw. Without a step (callers with no
    context) training forward passes are counted instead."""

    def __init__(self, num_features: int, dim: int, *, orthogonal: bool, redraw_interval: int):
        super().__init__()
        self.num_features, self.dim, self.orthogonal = num_features, dim, orthogonal
        self.redraw_interval = redraw_interval
        self.register_buffer("weight", gaussian_orthogonal_random_matrix(num_features, dim, orthogonal=orthogonal))
        self.register_buffer("drawn_at_step", torch.zeros((), dtype=torch.long))  # step of the last redraw
        self.register_buffer("redraws", torch.zeros((), dtype=torch.long))
        self.training_passes = 0  # only for callers without a global step

    @torch.no_grad()
    def redraw(self) -> None:
        new = gaussian_orthogonal_random_matrix(
            self.num_features, self.dim, orthogonal=self.orthogonal, device=self.weight.device
        )
        self.weight.copy_(new)
        self.redraws += 1

    def step(self, global_step: int | None = None) -> Tensor:
        """Redraw when the schedule says so (training only), return the projection."""
        if not (self.training and self.redraw_interval > 0):
            return self.weight
        if global_step is None:
            global_step = self.training_passes
            self.training_passes += 1
        due = (int(global_step) // self.redraw_interval) * self.redraw_interval  # start of this step's draw
        if due > int(self.drawn_at_step):
            self.redraw()
            self.drawn_at_step.fill_(due)
        return self.weight


def check_kernel_config(num_features: int, redraw_interval: int, feature_eps: float) -> None:
    if num_features < 1:
        raise ValueError(f"num_features must be >= 1, got {num_features}")
    if redraw_interval < 0:
        raise ValueError(f"redraw_interval must be >= 0 (0 = never redraw), got {redraw_interval}")
    if feature_eps < 0:
        raise ValueError(f"feature_eps must be >= 0, got {feature_eps}")


# The authors' settings per scale=lra protocol (sources: the module docstring).
PROTOCOLS = {
    "lra": {
        # performer.py _DEFAULT_ATTENTION_FN_CLS='generalized': performer_attention.py
        # make_fast_generalized_attention features_type='deterministic', kernel_fn=relu, kernel_epsilon=0.001
        "*": {"kernel": "relu_deterministic", "feature_eps": 1e-3},
        # listops/configs/performer_base.py model_kwargs: attention_fn_cls="softmax", nb_features=2,
        # ortho_scaling=0.0; make_fast_softmax_attention numerical_stabilizer=1e-6, redraw_features=True
        "listops": {
            "kernel": "softmax",
            "num_features": 2,
            "orthogonal_features": True,
            "feature_eps": 1e-6,
            "redraw_interval": 1,
        },
    },
    # lra_config.py "performer-256": rp_dim 256 (performer-pytorch FastAttention, softmax_kernel eps 1e-4, no redraw)
    "nystromformer": {"*": {"kernel": "softmax", "num_features": 256, "feature_eps": 1e-4, "redraw_interval": 0}},
    # Skyformer src/config.py "performer": rp_dim 128 (its copy of performer-pytorch, as above)
    "pytorch": {"*": {"kernel": "softmax", "num_features": 128, "feature_eps": 1e-4, "redraw_interval": 0}},
}


@register_mechanism(
    "performer", PerformerConfig, causal=True, cross=True, key_padding=True, family="kernel", protocols=PROTOCOLS
)
class PerformerAttention(Attention):
    """Performer / FAVOR+ (Choromanski et al. 2021): positive orthogonal random features, O(L·m·d)."""

    def __init__(self, cfg: PerformerConfig, *, heads: int, dim_head: int, max_len: int):
        super().__init__(cfg, heads=heads, dim_head=dim_head, max_len=max_len)
        check_kernel_config(cfg.num_features, cfg.redraw_interval, cfg.feature_eps)
        if cfg.kernel not in KERNELS:
            raise ValueError(f"performer kernel must be one of {KERNELS}, got '{cfg.kernel}'")
        if cfg.causal_chunk_size < 1:
            raise ValueError(f"causal_chunk_size must be >= 1, got {cfg.causal_chunk_size}")
        self.projection = RandomFeatureProjection(
            cfg.num_features, dim_head, orthogonal=cfg.orthogonal_features, redraw_interval=cfg.redraw_interval
        )

    def features(
        self, x: Tensor, projection: Tensor, *, is_query: bool, key_padding_mask: Tensor | None, causal: bool = False
    ) -> Tensor:
        if self.cfg.kernel == "relu":
            return relu_kernel_features(x, projection, key_padding_mask=key_padding_mask, eps=self.cfg.feature_eps)
        if self.cfg.kernel == "relu_deterministic":
            return deterministic_relu_features(x, key_padding_mask=key_padding_mask, eps=self.cfg.feature_eps)
        return softmax_kernel_features(
            x,
            projection,
            is_query=is_query,
            key_padding_mask=key_padding_mask,
            eps=self.cfg.feature_eps,
            eps_keys=not causal,
        )

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
        kpm = None if key_padding_mask is None else key_padding_mask.bool()
        projection = self.projection.step(None if context is None else context.step)
        out_dtype, dtype = output_dtype(q), work_dtype(q)
        with torch.autocast(q.device.type, enabled=False):  # exp features in float32, products in `dtype`
            q_feats = self.features(q, projection, is_query=True, key_padding_mask=None).to(dtype)
            v = v.to(dtype)
            if causal and self.cfg.kernel == "softmax":  # running key stabiliser: the past only
                k_feats, k_stab = causal_key_features(k, projection, key_padding_mask=kpm)
                out = causal_linear_attention(
                    q_feats, k_feats.to(dtype), v, chunk_size=self.cfg.causal_chunk_size, k_stab=k_stab
                )
            elif causal:
                k_feats = self.features(k, projection, is_query=False, key_padding_mask=kpm).to(dtype)
                out = causal_linear_attention(q_feats, k_feats, v, chunk_size=self.cfg.causal_chunk_size)
            else:
                k_feats = self.features(k, projection, is_query=False, key_padding_mask=kpm).to(dtype)
                out = linear_attention(q_feats, k_feats, v)
        return out.to(out_dtype)

    def metrics(self) -> dict[str, float]:
        return {"feature_redraws": float(self.projection.redraws)}
