import math

import pytest
import torch
from mechanism_checks import (
    assert_causal,
    assert_fully_padded_row_finite,
    assert_gradients_finite,
    assert_padding_invariant,
    build,
    call,
    dense_attention_oracle,
    largest_intermediate,
    padding_mask,
    qkv,
)

from harness.core.attention import AttentionContext


def shaw_reference(q, k, v, ids, table_k, table_v, *, key_padding_mask=None, causal=False, detach=True):
    """Shaw et al. written out in float64 with the full (B, Lq, Lk, D) relation tensors."""
    q, k, v = q.double(), k.double(), v.double()
    if detach:
        table_k, table_v = table_k.detach(), table_v.detach()
    a_k, a_v = table_k.double()[ids], table_v.double()[ids]  # (B, Lq, Lk, D)
    e = torch.einsum("bhid,bhijd->bhij", q, k[:, :, None] + a_k[:, None]) / math.sqrt(q.shape[-1])
    b, h, lq, lk = e.shape
    allowed = torch.ones(b, 1, lq, lk, dtype=torch.bool)
    if key_padding_mask is not None:
        allowed &= ~key_padding_mask[:, None, None, :]
    if causal:
        allowed &= torch.tensor([[j <= i + lk - lq for j in range(lk)] for i in range(lq)])
    e = e.masked_fill(~allowed, float("-inf"))
    alpha = torch.softmax(e, -1).nan_to_num(0.0)  # empty rows -> 0
    return torch.einsum("bhij,bhijd->bhid", alpha, v[:, :, None] + a_v[:, None])


def python_relative_ids(lq, lk, max_distance, batch):
    rows = [
        [min(max(j - (i + lk - lq), -max_distance), max_distance) + max_distance for j in range(lk)] for i in range(lq)
    ]
    return torch.tensor(rows)[None].expand(batch, -1, -1)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lq,lk", [(9, 9), (5, 11), (11, 5)])
def test_relative_position_mode_matches_reference(causal, lq, lk):
    mech = build("relation_aware", max_distance=2, num_relations=5)
    q, k, v = qkv(lq=lq, lk=lk)
    kpm = padding_mask(2, lk, [lk, max(lk - 3, 1)])
    ids = python_relative_ids(lq, lk, 2, 2) + 5  # distance rows follow the num_relations relation rows
    for mask in (None, kpm):
        out = call(mech, q, k, v, key_padding_mask=mask, causal=causal)
        ref = shaw_reference(
            q, k, v, ids, mech.relation_keys, mech.relation_values, key_padding_mask=mask, causal=causal
        )
        torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("max_distance", [0, 1, 3, 20])
@pytest.mark.parametrize("block", [1, 3, 64])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lq,lk", [(13, 13), (5, 14), (14, 5)])
def test_blocked_fast_path_matches_reference_forward_and_backward(max_distance, block, causal, lq, lk):
    """The blocked relative-position path against Shaw et al. written out with the full
    (B, Lq, Lk, D) relation tensors, in float64: outputs and the gradients of q, k, v and
    both embedding tables, with key padding (a fully padded row included) and cross shapes."""
    mech = build("relation_aware", max_distance=max_distance, num_relations=3, query_block=block).double()
    q, k, v = (x.requires_grad_() for x in qkv(batch=3, lq=lq, lk=lk, dtype=torch.float64, seed=block))
    kpm = padding_mask(3, lk, [lk, max(lk - 4, 1), 0])
    ids = python_relative_ids(lq, lk, max_distance, 3) + 3
    grad = torch.randn(3, 2, lq, 8, dtype=torch.float64)
    for mask in (None, kpm):
        tables = [t.detach().clone().requires_grad_() for t in (mech.relation_keys, mech.relation_values)]
        ref = shaw_reference(q, k, v, ids, *tables, key_padding_mask=mask, causal=causal, detach=False)
        ref_grads = torch.autograd.grad(ref, [q, k, v, *tables], grad)
        mech.zero_grad()
        out = mech(q, k, v, key_padding_mask=mask, causal=causal)
        grads = torch.autograd.grad(out, [q, k, v, mech.relation_keys, mech.relation_values], grad)
        torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-10)
        for got, want in zip(grads, ref_grads):
            torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)


def test_fast_path_keeps_no_quadratic_tensor_for_backward():
    """Only O(L·D) tensors are saved for backward (the recomputation), and no block builds more
    than block·Lk elements: at L = 2048 nothing reaches L²/16."""
    mech = build("relation_aware", heads=1, dim_head=16, max_len=2048, query_block=64)
    largest, op = largest_intermediate(mech, length=2048, causal=True, key_padding=True)
    assert largest <= 64 * 2048 * 2, (largest, op)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lq,lk", [(9, 9), (5, 11), (11, 5)])
def test_relation_mode_matches_reference(causal, lq, lk):
    mech = build("relation_aware", num_relations=6)
    q, k, v = qkv(lq=lq, lk=lk)
    relations = torch.randint(0, 6, (2, lq, lk), generator=torch.Generator().manual_seed(3))
    ctx = AttentionContext(relations=relations)
    kpm = padding_mask(2, lk, [lk, max(lk - 3, 1)])
    for mask in (None, kpm):
        out = call(mech, q, k, v, key_padding_mask=mask, causal=causal, context=ctx)
        ref = shaw_reference(
            q, k, v, relations, mech.relation_keys, mech.relation_values, key_padding_mask=mask, causal=causal
        )
        torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def test_zero_relation_embeddings_give_softmax():
    mech = build("relation_aware")
    with torch.no_grad():
        mech.relation_keys.zero_()
        mech.relation_values.zero_()
    q, k, v = qkv(lq=7, lk=10)
    kpm = padding_mask(2, 10, [10, 6])
    out = call(mech, q, k, v, key_padding_mask=kpm, causal=True)
    ref = dense_attention_oracle(q, k, v, key_padding_mask=kpm, causal=True)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def test_relations_change_the_output_and_train_only_their_rows():
    mech = build("relation_aware", num_relations=4, max_distance=3)
    q, k, v = qkv(lq=6)
    rel = torch.zeros(2, 6, 6, dtype=torch.long)
    rel[:, :, 3:] = 2
    out_rel = mech(q, k, v, context=AttentionContext(relations=rel))
    out_pos = mech(q, k, v)
    assert (out_rel - out_pos).abs().max() > 1e-3
    out_rel.square().sum().backward()
    grad_rows = mech.relation_keys.grad.abs().sum(-1) + mech.relation_values.grad.abs().sum(-1)
    assert (grad_rows[[0, 2]] > 0).all()
    assert (grad_rows[[1, 3]] == 0).all() and (grad_rows[4:] == 0).all()


def test_relations_may_be_shared_across_the_batch():
    mech = build("relation_aware", num_relations=3)
    q, k, v = qkv(lq=5)
    rel = torch.randint(0, 3, (1, 5, 5))
    a = call(mech, q, k, v, context=AttentionContext(relations=rel))
    b = call(mech, q, k, v, context=AttentionContext(relations=rel.expand(2, -1, -1)))
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("bad", [-1, 8])
def test_out_of_range_relation_ids_raise(bad):
    mech = build("relation_aware", num_relations=8)
    q, k, v = qkv(lq=4)
    rel = torch.zeros(2, 4, 4, dtype=torch.long)
    rel[1, 2, 3] = bad
    with pytest.raises(ValueError, match="num_relations"):
        mech(q, k, v, context=AttentionContext(relations=rel))


def test_wrong_relation_shape_or_dtype_raises():
    mech = build("relation_aware")
    q, k, v = qkv(lq=4)
    with pytest.raises(ValueError, match="shape"):
        mech(q, k, v, context=AttentionContext(relations=torch.zeros(2, 4, 5, dtype=torch.long)))
    with pytest.raises(TypeError, match="integer"):
        mech(q, k, v, context=AttentionContext(relations=torch.zeros(2, 4, 4)))


def test_fully_padded_row_is_zero_in_both_modes():
    mech = build("relation_aware", num_relations=4)
    q, k, v = qkv(lq=6)
    kpm = padding_mask(2, 6, [6, 0])
    for ctx in (None, AttentionContext(relations=torch.randint(0, 4, (2, 6, 6)))):
        out = call(mech, q, k, v, key_padding_mask=kpm, causal=True, context=ctx)
        assert torch.isfinite(out).all() and out[1].abs().max() == 0


def test_relation_mode_padding_invariant():
    mech = build("relation_aware", num_relations=4)
    q, k, v = qkv(lq=9)
    kpm = padding_mask(2, 9, [9, 5])
    rel = torch.randint(0, 4, (2, 9, 9))
    out = call(mech, q, k, v, key_padding_mask=kpm, context=AttentionContext(relations=rel))
    k2, v2, rel2 = k.clone(), v.clone(), rel.clone()
    k2[1, :, 5:] += 7.0
    v2[1, :, 5:] -= 7.0
    rel2[1, :, 5:] = (rel2[1, :, 5:] + 1) % 4  # relations to padded keys are irrelevant too
    out2 = call(mech, q, k2, v2, key_padding_mask=kpm, context=AttentionContext(relations=rel2))
    torch.testing.assert_close(out, out2)


def test_bf16_autocast_close_to_fp32():
    mech = build("relation_aware")
    q, k, v = qkv(lq=13)
    ref = call(mech, q, k, v, causal=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = call(mech, q, k, v, causal=True)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=5e-2, rtol=5e-2)


def test_contract_checks():
    mech = build("relation_aware")
    for causal in (False, True):
        assert_padding_invariant(mech, causal=causal)
        assert_fully_padded_row_finite(mech, causal=causal)
        assert_gradients_finite(mech, causal=causal, key_padding=True)
    assert_causal(mech)
    assert_causal(mech, length=13, t=12)
