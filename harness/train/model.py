"""The backbone: embeddings + positions, pre-norm Transformer blocks with a pluggable
mechanism, and the task heads (classifier, two-tower matcher, causal LM).

    x = embed(ids) + pos                       (B, L, dim)
    x = x + Wo · mechanism(Wq x, Wk x, Wv x)   per block, on LayerNorm(x)
    x = x + MLP(LayerNorm(x))
    head(LayerNorm(x))

Heads take a batch dict (see ``harness.data.task``) and return logits; ``Head.loss`` turns
logits into the loss and summable statistics (``correct``, ``count``, ``nll``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from harness.core.attention import Attention, AttentionContext
from harness.core.registry import create_mechanism
from harness.data.task import PAD_ID

POSITIONS = ("sinusoidal", "learned", "none")
POOLINGS = ("mean", "cls", "first", "padded_mean")
FEEDFORWARDS = ("mlp", "none")
INTERACTIONS = ("nli", "concat")


@dataclass
class ModelConfig:
    dim: int = 64  # embedding / residual width
    depth: int = 2  # number of blocks
    heads: int = 4  # dim must be divisible by heads
    mlp_dim: int = 128  # hidden width of each block's MLP
    dropout: float = 0.1
    positions: str = "sinusoidal"  # sinusoidal | learned | none
    pooling: str = "mean"  # mean (over non-pad tokens) | cls | first (no CLS token) | padded_mean (sum / max_len)
    feedforward: str = "mlp"  # mlp | none (all-attention blocks, e.g. persistent memory replacing the MLP)
    short_conv: int = 0  # kernel of a causal depthwise convolution over the embeddings (0: none); see Encoder
    # -- the reference protocols' options (harness/conf/protocol/, docs/protocols.md); the defaults are the
    # harness's own model
    qkv_dim: int = 0  # total width of Q/K/V over all heads (LRA's qkv_dim); 0 = dim
    attention_dropout: float = 0.0  # dropout on attention weights, for mechanisms with a `dropout` setting left at 0
    head_mlp: int = 0  # hidden width of the head's ReLU MLP (LRA: Dense(mlp_dim) -> ReLU -> Dense); 0 = one Linear
    interaction: str = "nli"  # matcher: nli = [X1, X2, X1*X2, X1-X2] -> MLP | concat = LRA's [X1, X2] -> 2-layer MLP

    def __post_init__(self):
        if self.dim % self.heads:
            raise ValueError(f"model.dim={self.dim} is not divisible by model.heads={self.heads}")
        if self.qkv_dim < 0 or (self.qkv_dim or self.dim) % self.heads:
            raise ValueError(f"model.qkv_dim={self.qkv_dim} must be >= 0 and divisible by model.heads={self.heads}")
        if not 0 <= self.attention_dropout < 1:
            raise ValueError(f"model.attention_dropout={self.attention_dropout} must be in [0, 1)")
        if self.head_mlp < 0:
            raise ValueError(f"model.head_mlp={self.head_mlp} must be >= 0")
        if self.interaction not in INTERACTIONS:
            raise ValueError(f"model.interaction='{self.interaction}'; valid: {', '.join(INTERACTIONS)}")
        if self.positions not in POSITIONS:
            raise ValueError(f"model.positions='{self.positions}'; valid: {', '.join(POSITIONS)}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"model.pooling='{self.pooling}'; valid: {', '.join(POOLINGS)}")
        if self.feedforward not in FEEDFORWARDS:
            raise ValueError(f"model.feedforward='{self.feedforward}'; valid: {', '.join(FEEDFORWARDS)}")
        if self.short_conv < 0:
            raise ValueError(f"model.short_conv={self.short_conv}: a kernel size >= 1, or 0 for none")


def sinusoidal_positions(length: int, dim: int, device=None) -> Tensor:
    """(L, dim) table of "Attention Is All You Need": sin on even, cos on odd channels."""
    pos = torch.arange(length, device=device, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim, device=device)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq[: dim // 2])
    return table


class MultiHeadMixing(nn.Module):
    """Q/K/V projections, the mechanism, the output projection."""

    def __init__(self, dim: int, heads: int, mechanism: Attention, *, inner: int = 0):
        """``inner``: the Q/K/V width over all heads (0 = dim), as LRA's ``qkv_dim``."""
        super().__init__()
        inner = inner or dim
        self.heads, self.dim_head = heads, inner // heads
        self.to_q = nn.Linear(dim, inner)
        self.to_kv = nn.Linear(dim, 2 * inner)
        self.to_out = nn.Linear(inner, dim)
        self.mechanism = mechanism

    def split(self, x: Tensor) -> Tensor:  # (B, L, H·D) -> (B, H, L, D)
        b, n, _ = x.shape
        return x.view(b, n, self.heads, self.dim_head).transpose(1, 2)

    def forward(self, x, *, memory=None, key_padding_mask=None, causal=False, context=None) -> Tensor:
        source = x if memory is None else memory
        q = self.split(self.to_q(x))
        k, v = (self.split(t) for t in self.to_kv(source).chunk(2, dim=-1))
        out = self.mechanism(q, k, v, key_padding_mask=key_padding_mask, causal=causal, context=context)
        b, _, n, _ = out.shape
        return self.to_out(out.transpose(1, 2).reshape(b, n, self.heads * self.dim_head))


class Block(nn.Module):
    """Pre-norm Transformer block: x + mix(LN x), then x + MLP(LN x).

    With ``model.feedforward=none`` the block is attention only (the all-attention layer of
    Sukhbaatar et al. 2019, where persistent memory vectors take the MLP's place)."""

    def __init__(self, cfg: ModelConfig, mechanism: Attention):
        super().__init__()
        self.norm_mix = nn.LayerNorm(cfg.dim)
        self.mix = MultiHeadMixing(cfg.dim, cfg.heads, mechanism, inner=cfg.qkv_dim)
        self.norm_mlp: nn.LayerNorm | None = None
        self.mlp: nn.Sequential | None = None
        if cfg.feedforward == "mlp":
            self.norm_mlp = nn.LayerNorm(cfg.dim)
            self.mlp = nn.Sequential(
                nn.Linear(cfg.dim, cfg.mlp_dim), nn.GELU(), nn.Dropout(cfg.dropout), nn.Linear(cfg.mlp_dim, cfg.dim)
            )
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, *, key_padding_mask=None, causal=False, context=None) -> Tensor:
        x = x + self.drop(self.mix(self.norm_mix(x), key_padding_mask=key_padding_mask, causal=causal, context=context))
        if self.mlp is None or self.norm_mlp is None:
            return x
        return x + self.drop(self.mlp(self.norm_mlp(x)))


class ShortConv(nn.Module):
    """x + depthwise causal convolution of x over the sequence, kernel ``k`` (B, L, dim) -> (B, L, dim).

    The short convolution of H3 / Zoology's Based (Arora et al. 2023, arXiv:2312.04927): each
    position also sees the ``k - 1`` tokens before it, so one attention layer can match a query
    against "the token after key k" (associative recall) instead of needing a first layer to
    build that induction feature. Causal (it looks back only), so right padding never reaches a
    real token, and it mixes nothing over long distances: the attention still does all of that.
    """

    def __init__(self, dim: int, kernel: int):
        super().__init__()
        self.kernel = kernel
        self.conv = nn.Conv1d(dim, dim, kernel, groups=dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        y = F.pad(x.transpose(1, 2), (self.kernel - 1, 0))  # (B, dim, L + k - 1), left-padded
        return x + self.conv(y).transpose(1, 2)


class Encoder(nn.Module):
    """Token ids (B, L) -> states (B, L', dim); L' = L + 1 with a CLS token in front."""

    def __init__(self, cfg: ModelConfig, *, vocab_size: int, max_len: int, mechanism: str, mechanism_cfg: Any = None):
        super().__init__()
        self.cfg = cfg
        self.use_cls = cfg.pooling == "cls"
        self.fixed_len = max_len  # padded_mean divides by it
        self.max_len = max_len + int(self.use_cls)
        self.embed = nn.Embedding(vocab_size + int(self.use_cls), cfg.dim)  # last id = CLS
        self.cls_id = vocab_size
        self.pos = nn.Embedding(self.max_len, cfg.dim) if cfg.positions == "learned" else None
        self.short_conv = ShortConv(cfg.dim, cfg.short_conv) if cfg.short_conv else None
        overrides = _with_attention_dropout(mechanism, as_overrides(mechanism_cfg), cfg.attention_dropout)
        self.blocks = nn.ModuleList(
            Block(
                cfg,
                create_mechanism(
                    mechanism,
                    heads=cfg.heads,
                    dim_head=(cfg.qkv_dim or cfg.dim) // cfg.heads,
                    max_len=self.max_len,
                    **overrides,
                ),
            )
            for _ in range(cfg.depth)
        )
        self.drop = nn.Dropout(cfg.dropout)
        self.norm = nn.LayerNorm(cfg.dim)

    @property
    def mechanisms(self) -> list[Attention]:
        return [_block(block).mix.mechanism for block in self.blocks]

    def aux_loss(self) -> Tensor | None:
        """The sum of its mechanisms' auxiliary losses (``Attention.aux_loss`` of the last forward,
        in float32), or None when none has one: what training adds to the task loss."""
        terms = [m.aux_loss.float() for m in self.mechanisms if m.aux_loss is not None]
        return torch.stack(terms).sum() if terms else None

    def forward(self, ids: Tensor, padding_mask: Tensor, *, causal=False, relations=None, step: int = 0):
        """Returns (states (B, L', dim), padding_mask (B, L'))."""
        if self.use_cls:
            cls = torch.full_like(ids[:, :1], self.cls_id)
            ids = torch.cat([cls, ids], dim=1)
            padding_mask = torch.cat([torch.zeros_like(padding_mask[:, :1]), padding_mask], dim=1)
        b, n = ids.shape
        if n > self.max_len:
            raise ValueError(f"sequence of length {n} exceeds the model's max_len {self.max_len}")
        return self.transform(self.embed(ids), padding_mask, causal=causal, relations=relations, step=step)

    def transform(self, x: Tensor, padding_mask: Tensor, *, causal=False, relations=None, step: int = 0):
        """Token embeddings (B, L, dim) -> (states, padding_mask): positions, dropout, the
        blocks, the final norm (for heads that embed tokens their own way, e.g. Spider's)."""
        b, n, _ = x.shape
        if self.short_conv is not None:
            x = self.short_conv(x)
        if self.cfg.positions == "sinusoidal":
            x = x + sinusoidal_positions(n, self.cfg.dim, x.device).to(x.dtype)
        elif self.pos is not None:
            x = x + self.pos.weight[:n]
        x = self.drop(x)
        context = AttentionContext(
            positions=torch.arange(n, device=x.device).expand(b, n), relations=relations, step=step
        )
        # All-False masks are dropped so mechanisms without key_padding run unpadded batches.
        kpm = padding_mask if bool(padding_mask.any()) else None
        for block in self.blocks:
            x = block(x, key_padding_mask=kpm, causal=causal, context=context)
        return self.norm(x), padding_mask

    def pool(self, states: Tensor, padding_mask: Tensor) -> Tensor:
        """(B, dim): the CLS state (``cls``), the first token's state without a CLS token
        (``first``: LRA's dual encoder, whose "CLS" pooling reads position 0 of an encoder built
        without one), the mean over non-pad tokens (``mean``), or the sum over non-pad tokens
        divided by the task's fixed length (``padded_mean``: the PyTorch re-implementations zero
        the padded states and average over the whole padded sequence)."""
        if self.use_cls or self.cfg.pooling == "first":
            return states[:, 0]
        keep = (~padding_mask).unsqueeze(-1).to(states.dtype)
        if self.cfg.pooling == "padded_mean":
            return (states * keep).sum(1) / self.fixed_len
        return (states * keep).sum(1) / keep.sum(1).clamp_min(1.0)


def _block(module: nn.Module) -> Block:
    """An ``Encoder.blocks`` entry as the ``Block`` it is (a ModuleList yields plain Modules)."""
    if not isinstance(module, Block):
        raise TypeError(f"an encoder block is a Block, not {type(module).__name__}")
    return module


def as_overrides(mechanism_cfg: Any) -> dict[str, Any]:
    import dataclasses

    from omegaconf import DictConfig, OmegaConf

    if mechanism_cfg is None:
        return {}
    if isinstance(mechanism_cfg, DictConfig):
        mechanism_cfg = OmegaConf.to_container(mechanism_cfg, resolve=True)
    elif dataclasses.is_dataclass(mechanism_cfg) and not isinstance(mechanism_cfg, type):
        mechanism_cfg = dataclasses.asdict(mechanism_cfg)
    return {k: v for k, v in dict(mechanism_cfg).items() if k != "name"}


def _with_attention_dropout(mechanism: str, overrides: dict[str, Any], rate: float) -> dict[str, Any]:
    """``model.attention_dropout`` goes to mechanisms that have attention weights to drop (a
    ``dropout`` setting: softmax, persistent_memory, relation_aware) unless the mechanism's own
    ``dropout`` is set; mechanisms without weights (linear, FNet, ...) have nothing to drop."""
    if not rate or overrides.get("dropout"):
        return overrides
    import dataclasses

    from harness.core.registry import get_mechanism

    if "dropout" not in {f.name for f in dataclasses.fields(get_mechanism(mechanism).config_class)}:
        return overrides
    return {**overrides, "dropout": rate}


def _head_mlp(dim_in: int, hidden: int, num_classes: int) -> nn.Module:
    """One Linear (hidden = 0), or the reference heads' Dense(hidden) -> ReLU -> Dense."""
    if not hidden:
        return nn.Linear(dim_in, num_classes)
    return nn.Sequential(nn.Linear(dim_in, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))


# ----------------------------------------------------------------------------- heads


class Head(nn.Module):
    """Maps a batch to logits and logits to (loss, stats)."""

    causal = False

    def __init__(self, encoder: Encoder):
        super().__init__()
        self.encoder = encoder

    def loss(self, logits: Tensor, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        labels = batch["label"]
        loss = F.cross_entropy(logits.float(), labels)
        hits = logits.argmax(-1) == labels
        return loss, {
            "correct": hits.sum(),
            "count": torch.tensor(labels.numel()),
            "nll": loss.detach() * labels.numel(),
            "item_correct": hits.long(),
            "item_count": torch.ones_like(labels),
        }


class ClassifierHead(Head):
    """Pooled encoder state -> class logits."""

    def __init__(self, encoder: Encoder, num_classes: int):
        super().__init__(encoder)
        self.out = _head_mlp(encoder.cfg.dim, encoder.cfg.head_mlp, num_classes)

    def forward(self, batch: dict[str, Tensor], step: int = 0) -> Tensor:
        states, mask = self.encoder(
            batch["input_ids"], batch["padding_mask"], relations=batch.get("relations"), step=step
        )
        return self.out(self.encoder.pool(states, mask))


class MatcherHead(Head):
    """The two-tower matcher of the AAN retrieval task (Tay et al. 2021): one shared encoder,
    pooled X1, X2, then ``model.interaction``:

    * ``nli``: an MLP on [X1, X2, X1*X2, X1-X2]: Linear(4·dim, dim) -> GELU -> Linear, or with
      ``model.head_mlp`` = h the PyTorch re-implementations' Linear(4·dim, h) -> ReLU -> Linear;
    * ``concat``: LRA's dual encoder with ``interaction=None``: [X1, X2] -> Dense(h) -> ReLU ->
      Dense(h/2) -> ReLU -> Dense, h = ``model.head_mlp`` (LRA: mlp_dim)."""

    def __init__(self, encoder: Encoder, num_classes: int):
        super().__init__(encoder)
        cfg = encoder.cfg
        self.interaction = cfg.interaction
        if cfg.interaction == "concat":
            if cfg.head_mlp < 2:
                raise ValueError("model.interaction=concat needs model.head_mlp >= 2 (LRA: the model's mlp_dim)")
            h = cfg.head_mlp
            self.out: nn.Module = nn.Sequential(
                nn.Linear(2 * cfg.dim, h), nn.ReLU(), nn.Linear(h, h // 2), nn.ReLU(), nn.Linear(h // 2, num_classes)
            )
        elif cfg.head_mlp:
            self.out = _head_mlp(4 * cfg.dim, cfg.head_mlp, num_classes)
        else:
            self.out = nn.Sequential(nn.Linear(4 * cfg.dim, cfg.dim), nn.GELU(), nn.Linear(cfg.dim, num_classes))

    def forward(self, batch: dict[str, Tensor], step: int = 0) -> Tensor:
        # Both towers in one encoder pass (stacked along the batch), so the mechanisms'
        # aux losses and metrics cover both documents.
        ids, mask = _stack_padded(
            [batch["input_ids_1"], batch["input_ids_2"]], [batch["padding_mask_1"], batch["padding_mask_2"]]
        )
        x1, x2 = self.encoder.pool(*self.encoder(ids, mask, step=step)).chunk(2, dim=0)
        if self.interaction == "concat":
            return self.out(torch.cat([x1, x2], dim=-1))
        return self.out(torch.cat([x1, x2, x1 * x2, x1 - x2], dim=-1))


def _stack_padded(ids: list[Tensor], masks: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Concatenate (B, L_i) id/mask pairs along the batch, right-padding to the longest L_i."""
    length = max(x.shape[1] for x in ids)
    ids = [F.pad(x, (0, length - x.shape[1]), value=PAD_ID) for x in ids]
    masks = [F.pad(m, (0, length - m.shape[1]), value=True) for m in masks]
    return torch.cat(ids), torch.cat(masks)


class LanguageModelHead(Head):
    """Causal next-token prediction; logits (B, L, vocab), loss over non-pad targets.
    Stats: ``nll`` in nats summed over predicted tokens (bits/token = nll / count / ln 2)."""

    causal = True

    def __init__(self, encoder: Encoder, vocab_size: int):
        super().__init__(encoder)
        if encoder.use_cls:
            raise ValueError("a language model cannot use CLS pooling; set model.pooling=mean")
        self.out = nn.Linear(encoder.cfg.dim, vocab_size)

    def forward(self, batch: dict[str, Tensor], step: int = 0) -> Tensor:
        states, _ = self.encoder(batch["input_ids"], batch["padding_mask"], causal=True, step=step)
        return self.out(states)

    def loss(self, logits: Tensor, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        targets = batch["input_ids"][:, 1:]
        valid = ~batch["padding_mask"][:, 1:]
        pred = logits[:, :-1].float()
        nll = F.cross_entropy(pred.transpose(1, 2), targets, reduction="none")[valid]
        count = valid.sum()
        loss = nll.sum() / count.clamp_min(1)
        correct = (pred.argmax(-1) == targets)[valid].sum()
        return loss, {"correct": correct, "count": count, "nll": nll.detach().sum()}


class TaggerHead(Head):
    """Per-position classification over the whole (bidirectional) sequence: logits (B, L, C);
    loss and accuracy over the positions whose ``targets`` are not -100 (e.g. MQAR's queries).
    Stats count those positions; ``item_correct``/``item_count`` are per sequence (for paired tests)."""

    def __init__(self, encoder: Encoder, num_classes: int):
        super().__init__(encoder)
        if encoder.use_cls:
            raise ValueError("a per-position head cannot use CLS pooling; set model.pooling=mean")
        self.out = nn.Linear(encoder.cfg.dim, num_classes)

    def forward(self, batch: dict[str, Tensor], step: int = 0) -> Tensor:
        states, _ = self.encoder(batch["input_ids"], batch["padding_mask"], step=step)
        return self.out(states)

    def loss(self, logits: Tensor, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        targets = batch["targets"][:, : logits.shape[1]]
        valid = targets != -100
        nll = F.cross_entropy(logits.float().transpose(1, 2), targets.clamp_min(0), reduction="none")[valid]
        count = valid.sum()
        loss = nll.sum() / count.clamp_min(1)
        hits = (logits.argmax(-1) == targets) & valid
        return loss, {
            "correct": hits.sum(),
            "count": count,
            "nll": nll.detach().sum(),
            "item_correct": hits.sum(1),
            "item_count": valid.sum(1),
        }


HEADS = {"classifier": ClassifierHead, "matcher": MatcherHead, "lm": LanguageModelHead, "tagger": TaggerHead}


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
