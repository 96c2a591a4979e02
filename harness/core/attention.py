"""The attention-mechanism contract, mask helpers and the dense float64 oracle.

A mechanism *mixes*: the backbone projects the input to queries, keys and values and
projects the mixed result back; the mechanism maps

    q: (B, H, Lq, D), k: (B, H, Lk, D), v: (B, H, Lk, D)  ->  (B, H, Lq, D)

Conventions every mechanism follows:

* ``key_padding_mask`` is a bool tensor of shape (B, Lk), **True at padded keys**.
  A padded key has no influence at all on any output (linear mechanisms zero the
  padded rows of their key features; they do not just add -inf).
* ``causal=True`` means query ``i`` sees key ``j`` only when ``j <= i + (Lk - Lq)``
  (bottom-right aligned, so a decoder step with a cache of past keys works).
* A query whose every key is masked returns zeros, never NaN.
* ``self.aux_loss`` is None or a scalar tensor that the trainer adds to the task loss.
* ``metrics()`` returns floats worth logging (sparsity, gate density, learned spans).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

CAPABILITIES = ("causal", "cross", "key_padding", "relations")


@dataclass(frozen=True)
class Capabilities:
    """What a mechanism can do; callers check these before they call."""

    causal: bool = False  # honours causal=True
    cross: bool = False  # accepts Lq != Lk (keys from another sequence)
    key_padding: bool = False  # honours key_padding_mask
    relations: bool = False  # uses context.relations (B, Lq, Lk) integer ids

    def as_dict(self) -> dict[str, bool]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def missing(self, required: set[str] | frozenset[str]) -> list[str]:
        """The required capabilities this mechanism lacks, sorted."""
        unknown = set(required) - set(CAPABILITIES)
        if unknown:
            raise ValueError(f"unknown capabilities {sorted(unknown)}; valid: {list(CAPABILITIES)}")
        return sorted(c for c in required if not getattr(self, c))


class UnsupportedCapability(RuntimeError):
    """A mechanism was asked for something its capability flags do not allow."""


@dataclass
class AttentionContext:
    """What some mechanisms need besides q, k, v.

    positions: (B, L) integer positions of the query tokens (None: 0..L-1).
    relations: (B, Lq, Lk) integer relation ids (schema linking for Spider).
    step:      the global training step (for feature redraw schedules, annealing).
    """

    positions: Tensor | None = None
    relations: Tensor | None = None
    step: int = 0


class Attention(nn.Module):
    """Base class of every mechanism. Subclasses are registered with
    ``harness.core.registry.register_mechanism`` which also sets ``name``, ``capabilities``
    and ``config_class``."""

    name: ClassVar[str] = ""
    capabilities: ClassVar[Capabilities] = Capabilities()
    config_class: ClassVar[type] = object
    # Inputs the mechanism does not read by design, e.g. ("q", "k") for FNet or S4D, which mix
    # the values alone; the contract tests then expect no gradient for them (rather than a fake one).
    ignored_inputs: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self, cfg: Any = None, *, heads: int | None = None, dim_head: int | None = None, max_len: int | None = None
    ):
        super().__init__()
        if cfg is None and heads is None:  # `super().__init__()` with no arguments, the usual PyTorch way
            if not _BUILDING:
                raise TypeError(
                    f"{type(self).__name__}: build mechanisms with "
                    "harness.core.registry.create_mechanism(name, heads=, dim_head=, max_len=), "
                    "or call super().__init__(cfg, heads=heads, dim_head=dim_head, max_len=max_len)"
                )
            cfg, heads, dim_head, max_len = _BUILDING[-1]
        elif heads is None or dim_head is None or max_len is None:
            raise TypeError(
                f"{type(self).__name__}: write super().__init__(cfg, heads=heads, dim_head=dim_head, max_len=max_len) "
                "or plain super().__init__()"
            )
        self.cfg = cfg
        self.heads = heads
        self.dim_head = dim_head
        self.max_len = max_len
        self.aux_loss: Tensor | None = None
        # Every call is checked against the capability flags before forward runs, so a
        # mechanism can never silently ignore a causal flag, cross shapes or a padding mask;
        # and its output is checked against the contract's shape after.
        self.register_forward_pre_hook(_check_capabilities, with_kwargs=True)
        self.register_forward_hook(_check_output, with_kwargs=True)

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
        raise NotImplementedError

    def metrics(self) -> dict[str, float]:
        """Scalars describing the last forward pass (e.g. sparsity), for logging."""
        return {}

    def check_call(self, q: Tensor, k: Tensor, key_padding_mask: Tensor | None, causal: bool) -> None:
        """Raise UnsupportedCapability when the call needs a flag this mechanism lacks."""
        caps = self.capabilities
        if causal and not caps.causal:
            raise UnsupportedCapability(f"mechanism '{self.name}' does not support causal attention")
        if q.shape[-2] != k.shape[-2] and not caps.cross:
            raise UnsupportedCapability(
                f"mechanism '{self.name}' does not support cross attention (Lq={q.shape[-2]}, Lk={k.shape[-2]})"
            )
        # No look at the mask's values here (``.any()`` would be a device sync on every call): a
        # caller passes None for an unpadded batch (the Encoder drops all-False masks, once per forward).
        if key_padding_mask is not None and not caps.key_padding:
            raise UnsupportedCapability(
                f"mechanism '{self.name}' does not support key padding masks (pass None for a batch without padding)"
            )

    def extra_repr(self) -> str:
        return f"heads={self.heads}, dim_head={self.dim_head}, cfg={self.cfg}"


# (cfg, heads, dim_head, max_len) of the mechanism create_mechanism is building, so that a
# subclass may call the base's __init__ with no arguments.
_BUILDING: list[tuple[Any, int, int, int]] = []


@contextlib.contextmanager
def building(cfg: Any, heads: int, dim_head: int, max_len: int) -> Iterator[None]:
    """While a mechanism is built (``harness.core.registry.create_mechanism``): its settings, for
    a subclass that calls the base's ``__init__`` with no arguments."""
    _BUILDING.append((cfg, heads, dim_head, max_len))
    try:
        yield
    finally:
        _BUILDING.pop()


def _qkv_of(args: tuple, kwargs: dict) -> tuple[Tensor, Tensor, Tensor]:
    names = ("q", "k", "v")
    q, k, v = (args[i] if len(args) > i else kwargs[n] for i, n in enumerate(names))
    return q, k, v


def _check_capabilities(module: Attention, args: tuple, kwargs: dict) -> None:
    q, k, _ = _qkv_of(args, kwargs)
    module.check_call(q, k, kwargs.get("key_padding_mask"), bool(kwargs.get("causal", False)))


class ContractViolation(RuntimeError):
    """A mechanism returned something the contract does not allow (e.g. the wrong shape)."""


def _check_output(module: Attention, args: tuple, kwargs: dict, out: Any) -> None:
    q, _, v = _qkv_of(args, kwargs)
    expected = (*q.shape[:-1], v.shape[-1])
    if not isinstance(out, Tensor) or tuple(out.shape) != expected:
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ContractViolation(f"mechanism '{module.name}' returned {got}; the contract is (B, H, Lq, D) = {expected}")


# ----------------------------------------------------------------------------- masks


def causal_mask(lq: int, lk: int, device: torch.device | None = None) -> Tensor:
    """(Lq, Lk) bool, True where query i may see key j: j <= i + (Lk - Lq)."""
    i = torch.arange(lq, device=device)[:, None]
    j = torch.arange(lk, device=device)[None, :]
    return j <= i + (lk - lq)


def allowed_mask(
    lq: int,
    lk: int,
    *,
    key_padding_mask: Tensor | None = None,
    causal: bool = False,
    device: torch.device | None = None,
) -> Tensor | None:
    """Combined bool mask, True = may attend, broadcastable to (B, H, Lq, Lk).

    Returns None when nothing is masked (the fast path for SDPA)."""
    mask = None
    if causal:
        mask = causal_mask(lq, lk, device)[None, None]  # (1, 1, Lq, Lk)
    if key_padding_mask is not None:
        keep = ~key_padding_mask.bool()[:, None, None, :]  # (B, 1, 1, Lk)
        mask = keep if mask is None else mask & keep
    return mask


def instance_seed(seed: int) -> int:
    """The seed of one mechanism instance's random draws: ``seed`` when ≥ 0 (shared by every
    instance built with it), else one drawn from torch's RNG when the instance is built, so the
    layers of a model differ and a run is reproducible from its seed."""
    return seed if seed >= 0 else int(torch.randint(0, 2**31 - 1, ()))


def draw_generator(seed: int, step: int = 0) -> torch.Generator:
    """A CPU generator for the draws of (instance seed, training step): the same numbers whatever
    the batch, the example's row in it, its padding or torch's global random state. Draw on the
    CPU and move the (small) result to the device, so CPU and GPU runs see the same numbers."""
    return torch.Generator().manual_seed(draw_seed(seed, step))


def draw_seed(seed: int, step: int = 0) -> int:
    """The integer seed ``draw_generator`` uses for (instance seed, step)."""
    return (int(seed) * 1_000_003 + int(step)) % 2**63


def zero_padded(x: Tensor, key_padding_mask: Tensor | None) -> Tensor:
    """Zero the rows of x (B, H, L, F) at padded positions (B, L): for linear mechanisms,
    so that padded keys contribute exactly nothing to any sum."""
    if key_padding_mask is None:
        return x
    return x.masked_fill(key_padding_mask.bool()[:, None, :, None], 0.0)


# ----------------------------------------------------------------------------- oracle


def dense_attention_oracle(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    key_padding_mask: Tensor | None = None,
    causal: bool = False,
    bias: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """Reference softmax attention in float64, written out with no shortcuts.

    out[b,h,i] = sum_j softmax_j(q_i.k_j * scale + bias_ij over allowed j) v_j, and 0 for a
    query with no allowed key. ``bias`` broadcasts to (B, H, Lq, Lk). Returns float64."""
    q, k, v = q.double(), k.double(), v.double()
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.einsum("bhid,bhjd->bhij", q, k) * scale
    if bias is not None:
        scores = scores + bias.double()
    allowed = allowed_mask(q.shape[-2], k.shape[-2], key_padding_mask=key_padding_mask, causal=causal, device=q.device)
    if allowed is None:
        allowed = torch.ones_like(scores, dtype=torch.bool)
    allowed = allowed.expand_as(scores)
    scores = scores.masked_fill(~allowed, float("-inf"))
    row_max = scores.amax(-1, keepdim=True).clamp_min(-1e300)  # finite even for empty rows
    weights = torch.exp(scores - row_max) * allowed
    denom = weights.sum(-1, keepdim=True)
    weights = torch.where(denom > 0, weights / denom.clamp_min(1e-300), torch.zeros_like(weights))
    return torch.einsum("bhij,bhjd->bhid", weights, v)


EQUIVALENCE_MAX_LEN = 4096  # above this the (L, L) float64 oracle is not worth building for the check


@torch.no_grad()
def computes_softmax(mechanism: Attention, length: int, *, causal: bool = False, seed: int = 0) -> bool | None:
    """Does ``mechanism`` compute exactly softmax attention at ``length`` tokens (e.g. a local
    window or BigBird's blocks that cover the whole sequence)? Measured, not declared: one
    float64 draw of q, k, v (std 2, so the weights are far from uniform) against the dense
    oracle, to 1e-9. A row that is softmax in disguise is not independent evidence about the
    mechanism; the report marks it. None above ``EQUIVALENCE_MAX_LEN``. The mechanism is
    checked on a float64 copy in eval mode; the original is untouched."""
    import copy

    if length > EQUIVALENCE_MAX_LEN:
        return None
    probe = copy.deepcopy(mechanism).double().eval()
    heads, dim_head = getattr(probe, "heads", None) or 2, getattr(probe, "dim_head", None) or 16
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (2.0 * torch.randn(1, heads, length, dim_head, generator=gen, dtype=torch.float64) for _ in range(3))
    try:
        out = probe(q, k, v, causal=causal)
    except Exception:  # a mechanism that cannot run this probe (shape limits, capabilities) is not softmax
        return False
    expected = dense_attention_oracle(q, k, v, causal=causal)
    return bool(out.shape == expected.shape and torch.allclose(out.double(), expected, rtol=1e-9, atol=1e-9))
