"""Encoder–decoder head with a copy (pointer) distribution, for sequence-to-sequence tasks
(Spider text-to-SQL), built from the backbone's ``Encoder`` and ``MultiHeadMixing``.

    memory = Encoder(mean of word-piece embeddings of source)  (B, Ls, dim)
    y      = embed(target[:-1]) + R · mean{m_j : src_j = target[:-1]} + pos   (B, T, dim)
    y      = y + SelfMix(LN y, causal)  ;  y = y + CrossMix(LN y, memory)  ;  y = y + MLP(LN y)
    p_gen  = σ(w · h_t)                                        h_t = LN(y_t)
    P(w)   = p_gen · softmax(W h_t)_w + (1 - p_gen) · Σ_{j: src_j = w} softmax_j(h_t · U m_j / √d)

The copy term is the pointer-generator of See et al. (2017, arXiv:1704.04368), as in the
copying seq2seq baseline of Spider's authors (``baselines/seq2seq_attention_copy``): a
token outside the output vocabulary (an unseen table, column or value) is produced by
pointing at its position in the input. The forward pass returns log-probabilities over
the extended space [output vocabulary | input positions] (B, T, V + Ls).

Three additions to that baseline (ours, named here as deviations): the previous token
enters the decoder with a read of the memory at the input positions holding its string
(CopyNet's selective read, Gu et al. 2016, arXiv:1603.06393), so a copied name that is
``<unk>`` in the output vocabulary is still known to the decoder; with
``source_role_ids`` the copy may point only where the decoding state allows
(``copy_blocked``: names and numbers outside a string literal, table names after
FROM/JOIN, question words inside a literal); decoding never produces ``<pad>``,
``<unk>`` or ``<bos>``, and ``generate`` does beam search (greedy at ``beam_size=1``,
hypotheses ranked by summed log-probability, no length penalty).

``task.mechanism_scope``: ``encoder`` puts the mechanism under test in the encoder's
self-attention and softmax in the decoder; ``all`` also in the decoder's causal
self-attention and its cross-attention. Decoder mechanisms take part in the aux losses
and metrics only with ``all`` (``encoder.mechanisms`` lists them then).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from harness.core.attention import Attention, AttentionContext
from harness.core.registry import create_mechanism
from harness.train.model import Encoder, Head, ModelConfig, MultiHeadMixing, as_overrides, sinusoidal_positions

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


class Seq2SeqEncoder(Encoder):
    """The backbone's encoder; ``mechanisms`` also lists the decoder's when they are the
    mechanism under test (so the trainer adds their aux losses)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.extra_mechanisms: list[Attention] = []  # plain list: the modules are registered in the decoder

    @property
    def mechanisms(self):
        return [block.mix.mechanism for block in self.blocks] + list(self.extra_mechanisms)

    def forward(
        self,
        ids: Tensor,
        padding_mask: Tensor,
        *,
        pieces: Tensor | None = None,
        causal=False,
        relations=None,
        step: int = 0,
    ):
        """As ``Encoder.forward``; with ``pieces`` (B, L, P) word-piece ids (0 = none) a
        token's embedding is the mean of its pieces' embeddings (``total_phenols`` =
        mean(total, phenols)), so schema names share the question's words."""
        if pieces is None:
            return super().forward(ids, padding_mask, causal=causal, relations=relations, step=step)
        n = ids.shape[1]
        if n > self.max_len:
            raise ValueError(f"sequence of length {n} exceeds the model's max_len {self.max_len}")
        present = (pieces != 0).unsqueeze(-1)  # (B, L, P, 1)
        x = (self.embed(pieces) * present).sum(2) / present.sum(2).clamp_min(1)  # (B, L, dim)
        return self.transform(x, padding_mask, causal=causal, relations=relations, step=step)


class DecoderBlock(nn.Module):
    """Pre-norm decoder block: causal self-mixing, cross-mixing over the memory, MLP."""

    def __init__(self, cfg: ModelConfig, self_mechanism, cross_mechanism):
        super().__init__()
        self.norm_self, self.norm_cross, self.norm_mlp = (
            nn.LayerNorm(cfg.dim),
            nn.LayerNorm(cfg.dim),
            nn.LayerNorm(cfg.dim),
        )
        self.self_mix = MultiHeadMixing(cfg.dim, cfg.heads, self_mechanism)
        self.cross_mix = MultiHeadMixing(cfg.dim, cfg.heads, cross_mechanism)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.dim, cfg.mlp_dim), nn.GELU(), nn.Dropout(cfg.dropout), nn.Linear(cfg.mlp_dim, cfg.dim)
        )
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, y, memory, memory_mask, context) -> Tensor:
        # Targets are right-padded, so with causal masking no real query sees a padded key.
        y = y + self.drop(self.self_mix(self.norm_self(y), causal=True, context=context))
        y = y + self.drop(self.cross_mix(self.norm_cross(y), memory=memory, key_padding_mask=memory_mask))
        return y + self.drop(self.mlp(self.norm_mlp(y)))


def copy_generate_log_probs(
    h: Tensor, memory: Tensor, memory_mask: Tensor | None, vocab_logits: Tensor, copy_query: Tensor, gate_logit: Tensor
) -> Tensor:
    """log P over [vocabulary | input positions].

    h: (B, T, dim), memory: (B, Ls, dim), memory_mask: (B, Ls) or (B, T, Ls) True where no
    copy may point (padding; positions the decoding state rules out), vocab_logits: (B, T, V),
    copy_query: (B, T, dim), gate_logit: (B, T, 1) -> (B, T, V + Ls). A step with no
    position to copy from puts all its mass on the vocabulary."""
    copy_scores = torch.einsum("btd,bsd->bts", copy_query, memory).float() / math.sqrt(h.shape[-1])  # (B, T, Ls)
    gate = gate_logit.float()
    if memory_mask is not None:
        blocked = memory_mask if memory_mask.dim() == 3 else memory_mask[:, None, :].expand_as(copy_scores)
        none_left = blocked.all(-1, keepdim=True)  # (B, T, 1)
        copy_scores = copy_scores.masked_fill(blocked | none_left, 0.0).masked_fill(blocked, float("-inf"))
        gate = gate.masked_fill(none_left, float("inf"))
    log_vocab = F.logsigmoid(gate) + torch.log_softmax(vocab_logits.float(), dim=-1)  # (B, T, V)
    log_copy = F.logsigmoid(-gate) + torch.log_softmax(copy_scores, dim=-1)  # (B, T, Ls)
    if memory_mask is not None:
        log_copy = log_copy.masked_fill(none_left, float("-inf"))
    return torch.cat([log_vocab, log_copy], dim=-1)


# Roles of input tokens (``source_role_ids``) for the copy constraint: outside a string
# literal a copy points at a schema name or a number of the question, inside one at a
# word or number of the question; right after FROM or JOIN, at a table name.
ROLE_COLUMN, ROLE_QUESTION_WORD, ROLE_QUESTION_NUMBER, ROLE_OTHER, ROLE_TABLE = 1, 2, 3, 4, 5


def copy_blocked(target_in: Tensor, roles: Tensor, quote_id: int, table_slot_ids: tuple[int, ...] = ()) -> Tensor:
    """(B, T, Ls) True where step t may not copy from input position s: the state after
    ``target_in`` (B, T) is inside a literal iff it holds an odd number of quotes so far,
    and in a table slot iff its last token is one of ``table_slot_ids`` (FROM, JOIN);
    roles (B, Ls) as ``ROLE_*`` (0 = padding, always blocked)."""
    inside = (torch.cumsum((target_in == quote_id).long(), dim=1) % 2 == 1)[..., None]  # (B, T, 1)
    table_slot = torch.zeros_like(target_in, dtype=torch.bool)
    for slot in table_slot_ids:
        table_slot = table_slot | (target_in == slot)
    r = roles[:, None, :]
    outside_ok = torch.where(
        table_slot[..., None], r == ROLE_TABLE, (r == ROLE_COLUMN) | (r == ROLE_TABLE) | (r == ROLE_QUESTION_NUMBER)
    )
    inside_ok = (r == ROLE_QUESTION_WORD) | (r == ROLE_QUESTION_NUMBER)
    return ~torch.where(inside, inside_ok, outside_ok)


class Seq2SeqHead(Head):
    """Encoder–decoder with copying. Batch columns: ``input_ids``/``padding_mask`` (source),
    ``source_copy_ids`` and ``target_copy_ids`` (string identity, for copying),
    ``source_target_ids`` (each source token's output-vocabulary id), ``target_ids``
    (``<bos> … <eos>``), optionally ``schema_links`` for relations."""

    def __init__(
        self,
        encoder: Seq2SeqEncoder,
        blocks: list[DecoderBlock],
        *,
        target_vocab_size: int,
        max_target_len: int,
        relations_fn: Callable[[dict], Tensor] | None = None,
        quote_id: int | None = None,
        table_slot_ids: tuple[int, ...] = (),
    ):
        super().__init__(encoder)
        # Output ids of the string-literal quote and of FROM/JOIN; with source_role_ids, copies are constrained.
        self.quote_id, self.table_slot_ids = quote_id, tuple(table_slot_ids)
        dim = encoder.cfg.dim
        self.target_vocab_size, self.max_target_len = target_vocab_size, max_target_len
        self.embed = nn.Embedding(target_vocab_size, dim)
        self.pos = nn.Embedding(max_target_len, dim) if encoder.cfg.positions == "learned" else None
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, target_vocab_size)
        self.copy = nn.Linear(dim, dim)
        self.gate = nn.Linear(dim, 1)
        self.read = nn.Linear(dim, dim)  # selective read of the copied input (CopyNet)
        self.drop = nn.Dropout(encoder.cfg.dropout)
        self.relations_fn = relations_fn
        self.uses_relations = relations_fn is not None and all(
            m.capabilities.relations for m in encoder.mechanisms[: len(encoder.blocks)]
        )

    def encode(self, batch: dict[str, Any], step: int = 0) -> tuple[Tensor, Tensor | None]:
        relations = self.relations_fn(batch) if self.uses_relations and self.relations_fn is not None else None
        memory, mask = self.encoder(
            batch["input_ids"],
            batch["padding_mask"],
            pieces=batch.get("source_piece_ids"),
            relations=relations,
            step=step,
        )
        return memory, (mask if bool(mask.any()) else None)

    def decode(
        self,
        target_in: Tensor,
        memory: Tensor,
        memory_mask: Tensor | None,
        step: int = 0,
        sources: Tensor | None = None,
        roles: Tensor | None = None,
    ) -> Tensor:
        """target_in (B, T) -> log P (B, T, V + Ls). ``sources`` (B, T, Ls) bool marks the input
        positions holding each target token's string: its input embedding adds a read of
        their memory (CopyNet's selective read, Gu et al. 2016, arXiv:1603.06393), so a
        copied name that is ``<unk>`` in the output vocabulary is still known downstream.
        ``roles`` (B, Ls) constrain where a copy may point (``copy_blocked``)."""
        b, t = target_in.shape
        if t > self.max_target_len:
            raise ValueError(f"target of length {t} exceeds max_target_len {self.max_target_len}")
        y = self.embed(target_in)
        if sources is not None:
            weights = sources.to(memory.dtype)
            weights = weights / weights.sum(-1, keepdim=True).clamp_min(1.0)  # (B, T, Ls)
            y = y + self.read(torch.einsum("bts,bsd->btd", weights, memory))
        if self.pos is not None:
            y = y + self.pos.weight[:t]
        elif self.encoder.cfg.positions == "sinusoidal":
            y = y + sinusoidal_positions(t, y.shape[-1], y.device).to(y.dtype)
        y = self.drop(y)
        context = AttentionContext(positions=torch.arange(t, device=y.device).expand(b, t), step=step)
        for block in self.blocks:
            y = block(y, memory, memory_mask, context)
        h = self.norm(y)
        blocked = memory_mask
        if roles is not None and self.quote_id is not None:
            blocked = copy_blocked(target_in, roles, self.quote_id, self.table_slot_ids)
            if memory_mask is not None:
                blocked = blocked | memory_mask[:, None, :]
        return copy_generate_log_probs(h, memory, blocked, self.out(h), self.copy(h), self.gate(h))

    def forward(self, batch: dict[str, Any], step: int = 0) -> Tensor:
        memory, mask = self.encode(batch, step)
        return self.decode(
            batch["target_ids"][:, :-1],
            memory,
            mask,
            step,
            self.sources(batch["target_copy_ids"][:, :-1], batch),
            batch.get("source_role_ids"),
        )

    @staticmethod
    def sources(copy_ids: Tensor, batch: dict[str, Any]) -> Tensor:
        """(B, T, Ls) bool: input positions whose string is that of each target token."""
        source = batch["source_copy_ids"]
        return (
            (source[:, None, :] == copy_ids[..., None])
            & (source[:, None, :] != PAD_ID)
            & (copy_ids[..., None] != PAD_ID)
        )

    def loss(self, logits: Tensor, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        """NLL per token of the mixture; stats per query: ``correct`` = all its tokens right."""
        target = batch["target_ids"][:, 1:]  # (B, T)
        target_str = batch["target_copy_ids"][:, 1:]
        source_str = batch["source_copy_ids"]  # (B, Ls)
        valid = target != PAD_ID
        v = self.target_vocab_size
        vocab_lp = logits[..., :v].gather(-1, target[..., None]).squeeze(-1)  # (B, T)
        matches = (source_str[:, None, :] == target_str[..., None]) & (source_str[:, None, :] != PAD_ID)  # (B, T, Ls)
        matches = matches & torch.isfinite(logits[..., v:])  # positions the copy constraint rules out do not count
        copy_lp = logits[..., v:].masked_fill(~matches, float("-inf")).logsumexp(-1)  # (B, T)
        # An out-of-vocabulary target counts only through copying (See et al.); with no
        # source position to copy from, <unk> is the target.
        vocab_lp = vocab_lp.masked_fill((target == UNK_ID) & matches.any(-1), float("-inf"))
        nll = -torch.logaddexp(vocab_lp, copy_lp)
        nll = nll.masked_fill(~valid, 0.0)
        tokens = valid.sum().clamp_min(1)
        loss = nll.sum() / tokens
        pred = logits.argmax(-1)  # (B, T)
        copied = pred >= v
        copy_str = source_str.gather(1, (pred - v).clamp_min(0))
        right = torch.where(copied, copy_str == target_str, (pred == target) & ((target != UNK_ID) | ~matches.any(-1)))
        correct = (right | ~valid).all(-1).sum()
        count = torch.tensor(target.shape[0], device=target.device)
        return loss, {"correct": correct, "count": count, "nll": nll.detach().sum()}

    @torch.no_grad()
    def generate(
        self, batch: dict[str, Any], max_len: int | None = None, beam_size: int = 1, return_scores: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Beam search (greedy at ``beam_size=1``): (B, steps) indices into [vocabulary |
        input positions] of each row's best hypothesis by summed log-probability; a
        finished hypothesis is <eos> to the end. ``return_scores`` adds (B,) log P of it.
        <pad>, <unk> and <bos> are never produced; copies obey the roles' constraint."""
        max_len = min(max_len or self.max_target_len, self.max_target_len)
        k = max(1, int(beam_size))
        memory, mask = self.encode(batch)
        b, v = memory.shape[0], self.target_vocab_size

        def grow(t: Tensor) -> Tensor:  # (B, ...) -> (B*K, ...)
            return t.repeat_interleave(k, dim=0)

        memory = grow(memory)
        mask = grow(mask) if mask is not None else None
        source_str, source_tgt = grow(batch["source_copy_ids"]), grow(batch["source_target_ids"])
        roles = batch.get("source_role_ids")
        roles = grow(roles) if roles is not None else None
        n = v + source_str.shape[1]
        device = memory.device
        never = torch.zeros(n, dtype=torch.bool, device=device)
        never[[PAD_ID, UNK_ID, BOS_ID]] = True  # an answer never contains these
        stay = torch.full((n,), float("-inf"), device=device)
        stay[EOS_ID] = 0.0  # a finished hypothesis only continues with <eos>, at no cost
        scores = torch.zeros(b, k, device=device)
        scores[:, 1:] = float("-inf")  # all beams start as one hypothesis
        inputs = torch.full((b * k, 1), BOS_ID, dtype=torch.long, device=device)
        sources = torch.zeros(b * k, 1, source_str.shape[1], dtype=torch.bool, device=device)  # <bos> reads nothing
        outputs = torch.zeros(b * k, 0, dtype=torch.long, device=device)
        done = torch.zeros(b * k, dtype=torch.bool, device=device)
        for _ in range(max_len - 1):
            log_probs = self.decode(inputs, memory, mask, sources=sources, roles=roles)[:, -1]  # (B*K, N)
            log_probs = torch.where(done[:, None], stay, log_probs.masked_fill(never, float("-inf")))
            total = (scores.reshape(-1, 1) + log_probs).reshape(b, k * n)
            scores, index = total.topk(k, dim=-1)  # (B, K)
            parent = (torch.arange(b, device=device)[:, None] * k + index // n).reshape(-1)  # (B*K,)
            choice = (index % n).reshape(-1)
            inputs, sources, outputs, done = inputs[parent], sources[parent], outputs[parent], done[parent]
            outputs = torch.cat([outputs, choice[:, None]], dim=1)
            done = done | (choice == EOS_ID)
            copied = choice >= v
            at = (choice - v).clamp_min(0)[:, None]
            as_input = torch.where(copied, source_tgt.gather(1, at)[:, 0], choice)
            # The chosen string's input positions, as in training (string identity).
            read = torch.where(
                copied[:, None],
                source_str == source_str.gather(1, at),
                (source_tgt == choice[:, None]) & (choice[:, None] != UNK_ID),
            )
            sources = torch.cat([sources, (read & (source_str != PAD_ID))[:, None]], dim=1)
            inputs = torch.cat([inputs, as_input[:, None]], dim=1)
            if bool(done.all()):
                break
        best = scores.argmax(-1)  # (B,)
        rows = torch.arange(b, device=device) * k + best
        out = outputs[rows]
        return (out, scores.gather(1, best[:, None])[:, 0]) if return_scores else out


def build_seq2seq(task, model_cfg: ModelConfig, mechanism: str, mechanism_cfg: Any = None) -> Seq2SeqHead:
    """The encoder–decoder for a task with ``head = "seq2seq"``: the task supplies
    ``vocab_size``, ``target_vocab_size``, ``max_len``, ``max_target_len``,
    ``mechanism_scope`` (encoder | all) and optionally ``batch_relations(batch)``."""
    scope = getattr(task, "mechanism_scope", "encoder")
    if scope not in ("encoder", "all"):
        raise ValueError(f"mechanism_scope='{scope}'; valid: encoder, all")
    enc_cfg = dataclasses.replace(model_cfg, pooling="mean")  # no CLS token in front of the source
    encoder = Seq2SeqEncoder(
        enc_cfg, vocab_size=task.vocab_size, max_len=task.max_len, mechanism=mechanism, mechanism_cfg=mechanism_cfg
    )
    dec_name, dec_overrides = (mechanism, as_overrides(mechanism_cfg)) if scope == "all" else ("softmax", {})
    heads, dim_head = model_cfg.heads, model_cfg.dim // model_cfg.heads
    cross_len = max(task.max_len, task.max_target_len)
    blocks = [
        DecoderBlock(
            model_cfg,
            create_mechanism(dec_name, heads=heads, dim_head=dim_head, max_len=task.max_target_len, **dec_overrides),
            create_mechanism(dec_name, heads=heads, dim_head=dim_head, max_len=cross_len, **dec_overrides),
        )
        for _ in range(model_cfg.depth)
    ]
    head = Seq2SeqHead(
        encoder,
        blocks,
        target_vocab_size=task.target_vocab_size,
        max_target_len=task.max_target_len,
        relations_fn=getattr(task, "batch_relations", None),
        quote_id=getattr(task, "target_quote_id", None),
        table_slot_ids=getattr(task, "target_table_slot_ids", ()),
    )
    if scope == "all":
        encoder.extra_mechanisms = [m for blk in blocks for m in (blk.self_mix.mechanism, blk.cross_mix.mechanism)]
    return head
