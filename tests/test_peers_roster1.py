"""Peers of the roster part 1 against ours at equal settings, with the same weights:
local-attention's LocalAttention vs ``local`` and linformer's LinformerSelfAttention vs
``linformer``. Both are deterministic, so they must agree to float rounding."""

import pytest
import torch
from mechanism_checks import build, call, padding_mask, qkv

from harness.bench.speed import resolve_mechanism_config
from harness.core.registry import discover, get_mechanism

discover()
pytest.importorskip("local_attention")
pytest.importorskip("linformer")


def test_peers_are_registered_with_their_counterparts():
    assert get_mechanism("local_attention_peer").cls.peer_of == "local"
    assert get_mechanism("linformer_peer").cls.peer_of == "linformer"
    assert get_mechanism("local_attention_peer").capabilities.as_dict() == dict(
        causal=True, cross=False, key_padding=True, relations=False
    )
    assert get_mechanism("linformer_peer").capabilities.as_dict() == dict(
        causal=False, cross=True, key_padding=False, relations=False
    )


def test_speed_gives_the_peers_our_settings():
    cfg, peer_of = resolve_mechanism_config("local_attention_peer", {"local": {"window": 32, "exact_window": True}})
    assert peer_of == "local" and cfg["window"] == 32 and cfg["exact_window"] is True
    cfg, _ = resolve_mechanism_config("linformer_peer", {"linformer": {"k": 64}})
    assert cfg["k"] == 64


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("back,fwd", [(1, 1), (2, 0)])
def test_local_agrees_with_local_attention(dtype, exact, causal, back, fwd):
    settings = dict(window=5, look_backward=back, look_forward=fwd, exact_window=exact)
    ours, peer = build("local", **settings), build("local_attention_peer", **settings)
    q, k, v = qkv(lq=23, dtype=dtype)  # 23: not a multiple of the window (the library autopads)
    kpm = padding_mask(2, 23, [23, 16])
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    for mask in (None, kpm):
        a = call(ours, q, k, v, key_padding_mask=mask, causal=causal)
        b = call(peer, q, k, v, key_padding_mask=mask, causal=causal)
        # every non-padded query agrees; a padded query whose whole window is padded gets our
        # zeros but the library's uniform average (it masks with -finfo.max, not -inf)
        valid = slice(None) if mask is None else ~mask
        torch.testing.assert_close(a.transpose(1, 2)[valid], b.transpose(1, 2)[valid], rtol=0, atol=tol)


def load_projections(ours, peer):
    with torch.no_grad():
        peer.peer.proj_k.copy_(ours.proj_k)
        peer.peer.proj_v.copy_(ours.proj_v)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("lq,lk", [(24, 24), (9, 24), (24, 13)])
def test_linformer_agrees_with_lucidrains_linformer(dtype, lq, lk):
    ours, peer = build("linformer", k=8, max_len=24).to(dtype), build("linformer_peer", k=8, max_len=24).to(dtype)
    load_projections(ours, peer)
    q, k, v = qkv(lq=lq, lk=lk, dtype=dtype)
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    torch.testing.assert_close(call(ours, q, k, v), call(peer, q, k, v), rtol=0, atol=tol)


def test_linformer_peer_differs_where_it_ignores_padding():
    """The library takes no mask: padded keys still enter Eᵀ K (why the peer has no key_padding)."""
    ours, peer = build("linformer", k=8, max_len=24), build("linformer_peer", k=8, max_len=24)
    load_projections(ours, peer)
    q, k, v = qkv(lq=24)
    kpm = padding_mask(2, 24, [24, 16])
    with pytest.raises(Exception, match="padding"):
        peer(q, k, v, key_padding_mask=kpm)
    masked = call(ours, q, k, v, key_padding_mask=kpm)
    assert not torch.allclose(masked[1], call(peer, q, k, v)[1])
    torch.testing.assert_close(masked[0], call(peer, q, k, v)[0], rtol=0, atol=2e-6)


def test_linformer_peer_refuses_share_kv():
    with pytest.raises(ValueError, match="share_kv"):
        build("linformer_peer", share_kv=True)
