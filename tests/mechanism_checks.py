"""Reusable checks of the mechanism contract (used by the registry-wide tests and by each
mechanism's own test file). Every check builds mechanisms only through create_mechanism."""

from __future__ import annotations

import torch
from torch import Tensor

from harness.core.attention import Attention, dense_attention_oracle  # noqa: F401  (re-exported for tests)
from harness.core.registry import create_mechanism


def qkv(batch=2, heads=2, lq=12, lk=None, dim=8, *, seed=0, dtype=torch.float32, scale=1.0):
    """Random (q, k, v) of shape (B, H, L, D) from a fixed seed."""
    g = torch.Generator().manual_seed(seed)
    lk = lq if lk is None else lk
    q = torch.randn(batch, heads, lq, dim, generator=g, dtype=dtype) * scale
    k = torch.randn(batch, heads, lk, dim, generator=g, dtype=dtype) * scale
    v = torch.randn(batch, heads, lk, dim, generator=g, dtype=dtype)
    return q, k, v


def padding_mask(batch: int, length: int, valid: list[int]) -> Tensor:
    """(B, L) bool, True at padded keys: row b keeps its first valid[b] positions."""
    pos = torch.arange(length)[None, :]
    return pos >= torch.tensor(valid)[:, None]


def build(name: str, *, heads=2, dim_head=8, max_len=64, **overrides) -> Attention:
    torch.manual_seed(0)
    mech = create_mechanism(name, heads=heads, dim_head=dim_head, max_len=max_len, **overrides)
    return mech.eval()


def call(mech: Attention, q, k, v, **kwargs) -> Tensor:
    """One forward pass with the random state pinned, so stochastic mechanisms (feature
    redraws, sampled gates) see the same draws in the two calls a check compares."""
    torch.manual_seed(1234)
    return mech(q, k, v, **kwargs)


def assert_padding_invariant(mech: Attention, *, lq=12, dim=8, causal=False, atol=1e-5) -> None:
    """Changing the q/k/v of padded positions changes no output at non-padded positions."""
    q, k, v = qkv(lq=lq, heads=mech.heads, dim=dim)
    kpm = padding_mask(2, lq, [lq, lq - 5])
    out = call(mech, q, k, v, key_padding_mask=kpm, causal=causal)
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    pad = kpm[:, None, :, None].expand_as(k)
    k2[pad] = torch.randn(int(pad.sum())) * 5
    v2[pad] = torch.randn(int(pad.sum())) * 5
    q2[pad] = torch.randn(int(pad.sum())) * 5
    out2 = call(mech, q2, k2, v2, key_padding_mask=kpm, causal=causal)
    keep = ~kpm[:, None, :, None].expand_as(out)
    assert torch.isfinite(out).all() and torch.isfinite(out2).all()
    torch.testing.assert_close(out[keep], out2[keep], atol=atol, rtol=1e-4)


def assert_causal(mech: Attention, *, length=12, dim=8, t=7, atol=1e-5) -> None:
    """Changing token t (its q, k and v) changes no output before t."""
    q, k, v = qkv(lq=length, heads=mech.heads, dim=dim)
    out = call(mech, q, k, v, causal=True)
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    for x in (q2, k2, v2):
        x[:, :, t:] = torch.randn_like(x[:, :, t:]) * 3
    out2 = call(mech, q2, k2, v2, causal=True)
    torch.testing.assert_close(out[:, :, :t], out2[:, :, :t], atol=atol, rtol=1e-4)
    assert not torch.allclose(out[:, :, t:], out2[:, :, t:]), "future tokens should change later outputs"


def assert_fully_padded_row_finite(mech: Attention, *, length=10, dim=8, causal=False) -> None:
    """A batch row whose every key is padded gives finite outputs (no NaN)."""
    q, k, v = qkv(lq=length, heads=mech.heads, dim=dim)
    kpm = padding_mask(2, length, [length, 0])
    out = call(mech, q, k, v, key_padding_mask=kpm, causal=causal)
    assert out.shape == q.shape
    assert torch.isfinite(out).all()


def assert_gradients_finite(mech: Attention, *, length=12, dim=8, causal=False, key_padding=False) -> None:
    """Backward through the mechanism gives finite gradients for q, k, v and parameters."""
    mech.train()
    q, k, v = (x.requires_grad_() for x in qkv(lq=length, heads=mech.heads, dim=dim))
    kpm = padding_mask(2, length, [length, length - 3]) if key_padding else None
    out = mech(q, k, v, key_padding_mask=kpm, causal=causal)
    loss = out.square().mean()
    if mech.aux_loss is not None:
        loss = loss + mech.aux_loss
    loss.backward()
    for label, x in zip("qkv", (q, k, v)):
        if label in mech.ignored_inputs:  # e.g. fnet and s4d mix v alone
            assert x.grad is None or not x.grad.any(), f"{label} is declared ignored but gets a gradient"
            continue
        assert x.grad is not None and torch.isfinite(x.grad).all()
    for name, p in mech.named_parameters():
        if p.requires_grad and p.grad is not None:
            assert torch.isfinite(p.grad).all(), f"non-finite gradient in {name}"
    mech.eval()


class _LargestTensor(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the largest tensor (in elements) that any op produces while active."""

    def __init__(self):
        super().__init__()
        self.largest = 0
        self.op = ""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, Tensor) and t.numel() > self.largest:
                self.largest, self.op = t.numel(), str(func)
        return out


def largest_intermediate(
    mech: Attention,
    *,
    length: int,
    heads: int = 1,
    dim: int = 16,
    causal: bool = False,
    key_padding: bool = False,
    backward: bool = True,
) -> tuple[int, str]:
    """(elements, op) of the largest tensor built by one forward (and backward) call at
    ``length`` with batch 1: a mechanism that claims sub-quadratic cost must stay far below
    length², the size of the (L, L) score matrix it claims never to build."""
    q, k, v = qkv(batch=1, heads=heads, lq=length, dim=dim)
    kpm = padding_mask(1, length, [length - 3]) if key_padding else None
    if backward:
        for x in (q, k, v):
            x.requires_grad_()
    with _LargestTensor() as mode:
        out = call(mech, q, k, v, key_padding_mask=kpm, causal=causal)
        if backward:
            out.square().mean().backward()
    return mode.largest, mode.op


def assert_subquadratic(mech: Attention, *, length: int = 8192, fraction: float = 1 / 16, **kwargs) -> None:
    """No tensor of one forward+backward at ``length`` reaches ``fraction`` · length² elements."""
    largest, op = largest_intermediate(mech, length=length, **kwargs)
    assert largest < fraction * length**2, (
        f"{mech.name}: a tensor of {largest} elements ({op}) at L={length} is quadratic-sized "
        f"(limit {fraction} · L² = {int(fraction * length**2)})"
    )
