"""FNet Fourier mixing (Lee-Thorp, Ainslie, Eckstein & Ontañón 2022, "FNet: Mixing Tokens with
Fourier Transforms", NAACL 2022, arXiv:2105.03824; reference code
google-research/google-research ``f_net/layers.py``, ``FourierTransform``).

The attention-free row: the sublayer is a parameter-free 2D discrete Fourier transform, of
which only the real part is kept, eq. (3) of the paper:

    y = Re( FFT_seq( FFT_hidden(x) ) )

Under the harness contract the mechanism receives q, k, v = Wq x, Wk x, Wv x and the
backbone applies Wo afterwards. FNet mixes **the values** v (reshaped to (B, L, H·d): the
hidden FFT runs over all heads' channels together, as over the paper's hidden dimension)
and **ignores q and k** (they get no gradient; ``ignored_inputs`` says so). Cost
O(L log L · H d + L · H d log(H d)) time, O(L · H d) memory, no parameters.

Padding: the rows of padded positions are zeroed before the FFT, so their values have no
influence. The DFT length still matters: a DFT over the tensor length would make every
output depend on how much padding the batch carries. So the sequence FFT always runs over
``max_len`` positions (zero-padded up to it), as the paper's LRA runs do with inputs padded
to the task's fixed length: an example's outputs at real positions are then the same
whatever the padded length of its batch (tested), and ``key_padding`` is flagged honestly.
``fft_length="input"`` instead uses the tensor length (faster for short inputs; the
padding-amount independence is then lost, and the padding mask is refused).

Deviations from the reference code: (1) the input is v, not the layer input x (see above);
(2) ``norm="ortho"`` by default, i.e. the transform is divided by √(L_fft · H d) — the paper's
post-norm block follows the mixing with LayerNorm, which removes any constant scale, while
the harness's pre-norm backbone adds the mixing output to the residual stream unnormalised,
where the unscaled DFT (``norm="backward"``, the reference's) is √(L_fft·Hd) times larger
than its input; (3) no causal variant (a DFT mixes every position with every other) and no
cross attention (it mixes Lk values into Lk outputs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from harness.core import Attention, AttentionContext, register_mechanism, zero_padded

NORMS = ("ortho", "backward")
FFT_LENGTHS = ("max_len", "input")


@dataclass
class FNetConfig:
    norm: str = (
        "ortho"  # "ortho": DFT/√(L·Hd) (unit scale for the pre-norm backbone); "backward": unscaled, as the reference
    )
    fft_length: str = (
        "max_len"  # "max_len": sequence DFT over max_len positions (padding-amount independent); "input": over L
    )


def fourier_mix(v: Tensor, *, fft_length: int, norm: str) -> Tensor:
    """Re(FFT_seq(FFT_hidden(v))) with the sequence DFT over fft_length ≥ L positions.

    v: (B, H, L, d) -> (B, H, L, d); the hidden DFT runs over the H·d channels together."""
    b, h, length, d = v.shape
    x = v.transpose(1, 2).reshape(b, length, h * d)  # (B, L, H·d)
    y = torch.fft.fft(torch.fft.fft(x, dim=-1, norm=norm), n=fft_length, dim=-2, norm=norm)  # (B, L_fft, H·d)
    y = y.real[:, :length]  # (B, L, H·d)
    return y.reshape(b, length, h, d).transpose(1, 2)


def fourier_mix_reference(v: Tensor, *, fft_length: int, norm: str) -> Tensor:
    """The same transform written with explicit DFT matrices in float64 (the reference the tests use)."""
    b, h, length, d = v.shape
    x = v.double().transpose(1, 2).reshape(b, length, h * d)
    hd = h * d
    f_hidden = torch.exp(-2j * torch.pi * torch.outer(torch.arange(hd), torch.arange(hd)).double() / hd)
    f_seq = torch.exp(
        -2j * torch.pi * torch.outer(torch.arange(fft_length), torch.arange(length)).double() / fft_length
    )
    scale = (hd * fft_length) ** -0.5 if norm == "ortho" else 1.0
    y = (f_seq @ (x.to(torch.complex128) @ f_hidden.T)).real * scale  # (B, L_fft, H·d)
    return y[:, :length].reshape(b, length, h, d).transpose(1, 2)


@register_mechanism("fnet", FNetConfig, key_padding=True, family="mixer")
class FNet(Attention):
    """FNet (Lee-Thorp et al. 2022): Re(FFT_seq(FFT_hidden(v))), no parameters, ignores q and k."""

    ignored_inputs: ClassVar[tuple[str, ...]] = ("q", "k")

    def __init__(self, cfg: FNetConfig, *, heads: int, dim_head: int, max_len: int):
        super().__init__(cfg, heads=heads, dim_head=dim_head, max_len=max_len)
        if cfg.norm not in NORMS or cfg.fft_length not in FFT_LENGTHS:
            raise ValueError(f"fnet needs norm in {NORMS} and fft_length in {FFT_LENGTHS}, got {cfg}")

    def check_call(self, q: Tensor, k: Tensor, key_padding_mask: Tensor | None, causal: bool) -> None:
        super().check_call(q, k, key_padding_mask, causal)
        length = k.shape[-2]
        if self.cfg.fft_length == "max_len" and length > self.max_len:
            raise ValueError(
                f"fnet: sequence length {length} exceeds max_len={self.max_len}, the length of its sequence DFT; "
                "build it with a larger max_len or set fft_length='input'"
            )
        if self.cfg.fft_length == "input" and key_padding_mask is not None and bool(key_padding_mask.any()):
            raise ValueError(
                "fnet with fft_length='input' cannot honour a padding mask (its outputs would depend on the "
                "amount of padding); use fft_length='max_len'"
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
        n = self.max_len if self.cfg.fft_length == "max_len" else v.shape[-2]
        with torch.autocast(v.device.type, enabled=False):
            v32 = zero_padded(v.to(torch.promote_types(v.dtype, torch.float32)), key_padding_mask)
            out = fourier_mix(v32, fft_length=n, norm=self.cfg.norm)
        return out.to(v.dtype)
