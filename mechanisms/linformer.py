"""Linformer (Wang, Li, Khabsa, Fang, Ma 2020, "Linformer: Self-Attention with Linear
Complexity", arXiv:2006.04768), eq. 7: keys and values are projected along the sequence to
k rows by learned E, F ∈ R^{n×k} before softmax attention,

    out = softmax(Q (Eᵀ K)ᵀ / √d) (Fᵀ V),      Eᵀ K, Fᵀ V ∈ R^{k×d}

with E, F of shape (max_len, k); an input of Lk < max_len keys uses their first Lk rows
(as lucidrains' ``linformer`` does, ``linformer/linformer.py``: ``proj_k[:kv_len]``).
Padded keys and values are zeroed before projecting, so they add exactly nothing to Eᵀ K
and Fᵀ V. One (E, F) pair per layer shared by the heads (the paper's "headwise sharing";
``share_kv`` = its "key-value sharing", E = F). Cost O(L·k·d) time, O(L·k) memory.

Not causal (the projection mixes all positions; the capability flag is off). ``cross``:
yes, any Lk ≤ max_len. Deviations: the authors' fairseq code
(``examples/linformer/linformer_src/modules/multihead_linear_attention.py``) holds E, F as
``nn.Linear(max_seq_len, k)`` layers and pads inputs to the maximum length; here they are
(max_len, k) matrices sliced to Lk, initialised uniform in ±1/√k as lucidrains does (the
fairseq ``compress_k`` uses Xavier-uniform). No layerwise sharing across layers (each
mechanism instance owns its projections).

Defaults: k = 256 as the paper's main runs and lucidrains'. Under ``scale=lra`` each protocol
gets its authors' settings (``PROTOCOLS`` below, composed into the preset cells):

* ``protocol=lra``: k = 16, one projection for keys and values (google-research/long-range-arena
  ``lra_benchmarks/models/linformer/linformer_attention.py``: ``low_rank_features=16``, one
  ``lr_kernel`` of shape (max_len, k) for both, per layer, shared by the heads, as here). Every
  task: the text config's ``config.low_rank_features = 32``
  (``text_classification/configs/linformer_base.py``) is a top-level key that
  ``text_classification/train.py`` never passes to the model (it builds ``model_kwargs`` from
  named fields and ``config.model``), so LRA's text runs use 16 too. Outside scale=lra the same
  settings: ``+preset=lra_linformer`` (``harness/conf/preset/lra_linformer.yaml``).
* ``protocol=nystromformer``: k = 256, keys and values through one E (mlpen/Nystromformer
  ``LRA/code/lra_config.py`` ``"linformer-256": {"linformer_k": 256}``,
  ``LRA/code/attention_linformer.py``: ``K = E K``, ``V = E V``). Deviation: their E is one
  (heads, k, L) parameter per head, shared by every layer (a class attribute), ours one per
  layer shared by the heads.
* ``protocol=pytorch``: k = 128, one E for both (pkuzengqi/Skyformer ``src/config.py``
  ``"linformer": {"linformer_k": 128}``, ``src/models/attention_linformer.py``). Deviation: their
  E is per head and per layer (initialised N(0, 0.02)), ours per layer shared by the heads.

When k ≥ Lk nothing is compressed (the projection is
then a learned mixing of at most as many rows as there are keys): the mechanism warns once
per instance and ``metrics()['k_over_length']`` (k / Lk of the last call, in the result's
``mech/`` metrics) records it.

Implementation (speed only, the same function): Eᵀ K and Fᵀ V are each one (k, Lk) @ (Lk, B·H·D)
product with the heads side by side; for float32/float64 inputs outside autocast the softmax
attention runs in ``F.scaled_dot_product_attention`` (fused: the (Lq, k) weights are never
stored for backward; rounding differs from the written-out form at the last bits); other dtypes
and autocast use the written-out form with the softmax in at least float32.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from harness.core import Attention, AttentionContext, register_mechanism, zero_padded


@dataclass
class LinformerConfig:
    k: int = 256  # projected length: keys/values are compressed to k rows; cost O(L·k) — the accuracy/speed knob
    share_kv: bool = False  # one projection for keys and values (E = F)


def linformer_attention(
    q: Tensor, k: Tensor, v: Tensor, proj_k: Tensor, proj_v: Tensor, *, key_padding_mask: Tensor | None = None
) -> Tensor:
    """q: (B, H, Lq, D), k/v: (B, H, Lk, D), proj_k/proj_v: (≥Lk, k) -> (B, H, Lq, D)."""
    lk = k.shape[-2]
    e, f = proj_k[:lk].to(k.dtype), proj_v[:lk].to(v.dtype)  # (Lk, k)
    k = zero_padded(k, key_padding_mask)
    v = zero_padded(v, key_padding_mask)
    b, h, _, d = k.shape

    # Eᵀ K as one (k, Lk) @ (Lk, B·H·D) product (the heads side by side) rather than a matmul per head
    def project(x: Tensor, p: Tensor) -> Tensor:  # (B, H, Lk, D), (Lk, k) -> (B, H, k, D)
        return (p.T @ x.permute(2, 0, 1, 3).reshape(lk, b * h * d)).view(-1, b, h, d).permute(1, 2, 0, 3)

    k_low = project(k, e)  # (B, H, k, D) = Eᵀ K
    v_low = project(v, f)  # (B, H, k, D) = Fᵀ V
    if (
        q.dtype in (torch.float32, torch.float64)
        and q.dtype == k_low.dtype == v_low.dtype
        and not torch.is_autocast_enabled(q.device.type)
    ):
        # softmax(Q (EᵀK)ᵀ/√d) (FᵀV) in torch's fused kernel: no (Lq, k) weights stored for backward
        return F.scaled_dot_product_attention(q, k_low, v_low)
    scores = torch.einsum("bhid,bhrd->bhir", q, k_low) / math.sqrt(q.shape[-1])  # (B, H, Lq, k)
    weights = torch.softmax(scores.to(torch.promote_types(scores.dtype, torch.float32)), dim=-1).to(v_low.dtype)
    return weights @ v_low


# The authors' settings per scale=lra protocol (sources: the module docstring).
PROTOCOLS = {
    "lra": {"*": {"k": 16, "share_kv": True}},  # linformer_attention.py low_rank_features=16, one lr_kernel
    "nystromformer": {"*": {"k": 256, "share_kv": True}},  # lra_config.py "linformer-256"
    "pytorch": {"*": {"k": 128, "share_kv": True}},  # Skyformer src/config.py "linformer"
}


@register_mechanism("linformer", LinformerConfig, cross=True, key_padding=True, family="low_rank", protocols=PROTOCOLS)
class Linformer(Attention):
    """Linformer (Wang et al. 2020): learned sequence projections of K and V to k rows, O(L·k)."""

    def __init__(self, cfg: LinformerConfig, *, heads: int, dim_head: int, max_len: int):
        super().__init__(cfg, heads=heads, dim_head=dim_head, max_len=max_len)
        if cfg.k < 1:
            raise ValueError(f"linformer.k (projected length) must be >= 1, got {cfg.k}")
        bound = 1.0 / math.sqrt(cfg.k)
        self.proj_k = nn.Parameter(torch.empty(max_len, cfg.k).uniform_(-bound, bound))  # E: (max_len, k)
        self.proj_v = None if cfg.share_kv else nn.Parameter(torch.empty(max_len, cfg.k).uniform_(-bound, bound))
        self._k_over_length = 0.0
        self._warned = False

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
        if k.shape[-2] > self.max_len:
            raise ValueError(
                f"linformer was built for at most max_len={self.max_len} keys, got {k.shape[-2]}; "
                f"build it with max_len >= {k.shape[-2]}"
            )
        lk = k.shape[-2]
        self._k_over_length = self.cfg.k / lk
        if self.cfg.k >= lk and not self._warned:
            self._warned = True
            warnings.warn(
                f"linformer: k={self.cfg.k} >= {lk} keys, so nothing is compressed; set mechanism.k below the "
                f"length (LRA uses 16, +preset=lra_linformer)",
                stacklevel=2,
            )
        proj_v = self.proj_k if self.proj_v is None else self.proj_v
        return linformer_attention(q, k, v, self.proj_k, proj_v, key_padding_mask=key_padding_mask)

    def metrics(self) -> dict[str, float]:
        """k_over_length: k / Lk of the last call (≥ 1: nothing compressed)."""
        return {"k_over_length": self._k_over_length}
