"""S4D, a diagonal state-space layer (Gu, Gupta, Goel & Ré 2022, "On the Parameterization and
Initialization of Diagonal State Space Models", NeurIPS 2022, arXiv:2206.11893; reference code
state-spaces/s4 ``models/s4/s4d.py`` (the minimal S4D) and, for the bidirectional kernel,
``src/models/sequence/modules/fftconv.py``).

Not attention: the row that tells a user when no attention at all is the answer. Every
channel c (one per head-channel, c = h·d + i: H·d independent SSMs) runs the linear
recurrence of N/2 complex diagonal modes, discretised by zero-order hold with step Δ:

    x_t = Ā x_{t−1} + B̄ u_t,    y_t = 2·Re(C x_t) + D u_t,    Ā = exp(ΔA),  B̄ = (exp(ΔA) − 1)/A · B

(B = 1 folded into C, as s4d.py), which is the convolution y = K ∗ u + D u with the kernel

    K[l] = 2·Re( Σ_n C_n B̄_n Ā_n^l ),  l = 0 … L−1         (a Vandermonde product)

computed by FFT (sequence zero-padded to 2L): O(L log L) per channel, plus the Vandermonde
product O(N·L) per channel, taken as one batched matmul of √L-sized factors (no (N, L) matrix). Bidirectional
(encoders): a second kernel K' with its own C' (same A and
Δ, the reference's ``channels=2``) runs backwards, y_t += Σ_{s>t} K'[s−t−1] u_s, i.e. the
2L-periodic kernel [K, flip(K')] of fftconv.py. Causal calls use K alone, by a float64 FFT (a
float32 FFT's round-off is relative to the whole sequence, so a huge future value leaked about
2.5e-3 into past outputs; the reference's fftconv has the same property). Then GELU, as the
S4D block before its output linear (here the backbone's Wo).

Under the harness contract the layer mixes **the values** v and **ignores q and k**
(``ignored_inputs``). Initialisation (``init``): S4D-Lin A_n = −½ + iπn, S4D-Inv
A_n = −½ + i(N/π)(N/(2n+1) − 1); log Δ ~ U[log Δ_min, log Δ_max]; C ~ CN(0, 1); D ~ N(0, 1).

Padding: the values at padded positions are zeroed before the convolution, so they
contribute nothing. Unlike a DFT mixer the kernel K[l] does not depend on L, so outputs at
real positions do not depend on the amount of padding either (tested).

Deviations from the reference: (1) input v, not the block input; (2) no GLU output linear
(the backbone's Wo is the output projection) and no dropout; (3) the reference gives the
SSM parameters (Δ, A) their own learning rate (0.001) and no weight decay; the harness's
optimizer treats them like any weight; (4) kernel and FFT in at least float32 under autocast.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from harness.core import Attention, AttentionContext, register_mechanism, zero_padded

INITS = ("lin", "inv")


@dataclass
class S4DConfig:
    d_state: int = 64  # N: state size per channel (N/2 complex modes), as s4d.py
    init: str = "lin"  # "lin" (S4D-Lin: imag πn) or "inv" (S4D-Inv: imag (N/π)(N/(2n+1) − 1))
    dt_min: float = 0.001  # log Δ is drawn uniformly in [log dt_min, log dt_max]
    dt_max: float = 0.1
    bidirectional: bool = True  # encoders: a forward and a backward kernel; causal calls use the forward one
    activation: str = "gelu"  # "gelu" (the S4D block) or "none" (the bare SSM, y = K ∗ u + D u)


def s4d_kernel(log_dt: Tensor, log_a_real: Tensor, a_imag: Tensor, c: Tensor, length: int) -> Tensor:
    """K[s, ch, l] = 2·Re(Σ_n C[s,ch,n] (exp(ΔA)−1)/A · exp(ΔA·l)).

    log_dt: (Ch,), log_a_real, a_imag: (Ch, N/2), c: (S, Ch, N/2) complex -> (S, Ch, L) real.
    The Vandermonde matrix is never built whole: with l = a·w + r (w = ⌈√L⌉),
    exp(ΔA·l) = exp(ΔA·a·w) · exp(ΔA·r), so K is one batched complex matmul of an
    (L/w × N/2) and an (N/2 × w) factor per channel — O(Ch·N·√L) exponentials and memory
    instead of O(Ch·N·L) (``s4d_kernel_reference`` is the direct form the tests compare to)."""
    dt = log_dt.exp()  # (Ch,)
    a = torch.complex(-log_a_real.exp(), a_imag)  # (Ch, N/2)
    dta = a * dt[:, None]  # (Ch, N/2)
    c_bar = c * (dta.exp() - 1.0) / a  # (S, Ch, N/2): C · B̄
    width = math.isqrt(max(length - 1, 0)) + 1  # w = ⌈√L⌉ (at least 1)
    rows = -(-length // width)
    steps = torch.arange(width, device=a.device, dtype=dt.dtype)
    low = (dta[..., None] * steps).exp()  # (Ch, N/2, w): exp(ΔA·r)
    high = (dta[..., None] * (steps[:rows] * width)).exp()  # (Ch, N/2, rows): exp(ΔA·a·w), rows ≤ w
    left = (c_bar[..., None] * high).transpose(-1, -2)  # (S, Ch, rows, N/2): C B̄ exp(ΔA·a·w)
    k = (left @ low).real.reshape(c.shape[0], c.shape[1], rows * width)  # (S, Ch, rows·w)
    return 2 * k[..., :length]


def s4d_kernel_reference(log_dt: Tensor, log_a_real: Tensor, a_imag: Tensor, c: Tensor, length: int) -> Tensor:
    """The same kernel with the whole (Ch, N/2, L) Vandermonde matrix, as s4d.py computes it."""
    dt = log_dt.exp()
    a = torch.complex(-log_a_real.exp(), a_imag)
    dta = a * dt[:, None]
    c_bar = c * (dta.exp() - 1.0) / a
    vandermonde = (dta[..., None] * torch.arange(length, device=a.device, dtype=dt.dtype)).exp()  # (Ch, N/2, L)
    return 2 * torch.einsum("scn,cnl->scl", c_bar, vandermonde).real


def fft_convolution(u: Tensor, kernel: Tensor, backward_kernel: Tensor | None) -> Tensor:
    """y_t = Σ_{s≤t} K[t−s] u_s (+ Σ_{s>t} K'[s−t−1] u_s) by FFT of length 2L.

    u: (B, Ch, L), kernel, backward_kernel: (Ch, L) -> (B, Ch, L)."""
    length = u.shape[-1]
    k = F.pad(kernel, (0, length))  # (Ch, 2L): lags 0 … L−1
    if backward_kernel is not None:
        k = k + F.pad(backward_kernel.flip(-1), (length, 0))  # lags −L … −1 (indices 2L−1 … L)
    y = torch.fft.irfft(torch.fft.rfft(u, n=2 * length) * torch.fft.rfft(k, n=2 * length), n=2 * length)
    return y[..., :length]


@register_mechanism("s4d", S4DConfig, causal=True, key_padding=True, family="mixer")
class S4D(Attention):
    """S4D (Gu et al. 2022): a diagonal SSM per head-channel over the values, FFT convolution."""

    ignored_inputs: ClassVar[tuple[str, ...]] = ("q", "k")

    def __init__(self, cfg: S4DConfig, *, heads: int, dim_head: int, max_len: int):
        super().__init__(cfg, heads=heads, dim_head=dim_head, max_len=max_len)
        if cfg.init not in INITS or cfg.activation not in ("gelu", "none"):
            raise ValueError(f"s4d needs init in {INITS} and activation in ('gelu', 'none'), got {cfg}")
        if cfg.d_state < 2 or cfg.d_state % 2 or not 0 < cfg.dt_min <= cfg.dt_max:
            raise ValueError(f"s4d needs an even d_state >= 2 and 0 < dt_min <= dt_max, got {cfg}")
        channels, modes = heads * dim_head, cfg.d_state // 2
        n = torch.arange(modes, dtype=torch.float32)
        if cfg.init == "lin":
            imag = math.pi * n
        else:
            imag = cfg.d_state / math.pi * (cfg.d_state / (2 * n + 1) - 1)
        self.log_dt = nn.Parameter(
            torch.rand(channels) * (math.log(cfg.dt_max) - math.log(cfg.dt_min)) + math.log(cfg.dt_min)
        )
        self.log_a_real = nn.Parameter(torch.log(0.5 * torch.ones(channels, modes)))
        self.a_imag = nn.Parameter(imag.expand(channels, modes).clone())
        sides = 2 if cfg.bidirectional else 1
        self.c = nn.Parameter(torch.view_as_real(torch.randn(sides, channels, modes, dtype=torch.cfloat)))
        self.d = nn.Parameter(torch.randn(channels))

    def kernels(self, length: int, dtype: torch.dtype = torch.float32) -> Tensor:
        """(S, Ch, L) convolution kernels (S = 2 when bidirectional: forward, backward)."""
        c = torch.view_as_complex(self.c.to(dtype).contiguous())
        return s4d_kernel(self.log_dt.to(dtype), self.log_a_real.to(dtype), self.a_imag.to(dtype), c, length)

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
        b, h, length, d = v.shape
        dtype = torch.promote_types(v.dtype, torch.float32)
        with torch.autocast(v.device.type, enabled=False):
            u = zero_padded(v.to(dtype), key_padding_mask).transpose(2, 3).reshape(b, h * d, length)  # (B, Ch, L)
            kernel = self.kernels(length, dtype)  # (S, Ch, L)
            backward = kernel[1] if self.cfg.bidirectional and not causal else None
            if causal:  # float64 FFT: its round-off is relative to the whole sequence, future included
                conv = fft_convolution(u.double(), kernel[0].double(), None).to(dtype)
            else:
                conv = fft_convolution(u, kernel[0], backward)
            y = conv + u * self.d.to(dtype)[:, None]  # (B, Ch, L)
            if self.cfg.activation == "gelu":
                y = F.gelu(y)
        return y.reshape(b, h, d, length).transpose(2, 3).to(v.dtype)
