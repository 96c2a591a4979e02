"""The backbone: positions, pooling, heads, and the aux-loss path into training."""

import math
from types import SimpleNamespace

import pytest
import torch

from harness.train.build import build_model
from harness.train.config import TrainConfig
from harness.train.model import ModelConfig, count_parameters, sinusoidal_positions
from harness.train.training import TaskModule


def task(head="classifier", vocab_size=12, num_classes=3, max_len=32):
    return SimpleNamespace(name="toy", head=head, vocab_size=vocab_size, num_classes=num_classes, max_len=max_len)


def model(head="classifier", mechanism="softmax", **cfg):
    torch.manual_seed(0)
    cfg = {"dim": 16, "depth": 2, "heads": 2, "mlp_dim": 32, "dropout": 0.0, **cfg}
    return build_model(task(head), ModelConfig(**cfg), mechanism).eval()


def batch(ids, pad_from=None):
    ids = torch.as_tensor(ids)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    if pad_from is not None:
        for row, start in enumerate(pad_from):
            mask[row, start:] = True
    return {"input_ids": ids, "padding_mask": mask, "label": torch.zeros(len(ids), dtype=torch.long)}


def test_sinusoidal_table_is_the_transformer_formula():
    table = sinusoidal_positions(7, 8)
    for pos in (0, 3, 6):
        for i in range(4):
            angle = pos / 10000 ** (2 * i / 8)
            assert table[pos, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-6)
            assert table[pos, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)


@pytest.mark.parametrize("positions", ["sinusoidal", "learned"])
def test_positions_make_the_model_order_aware(positions):
    m = model(positions=positions)
    if positions == "learned":
        torch.nn.init.normal_(m.encoder.pos.weight)
    a = m(batch([[1, 2, 3, 4, 5, 6]]))
    b = m(batch([[6, 5, 4, 3, 2, 1]]))
    assert not torch.allclose(a, b)


def test_without_positions_mean_pooling_is_permutation_invariant():
    m = model(positions="none")
    torch.testing.assert_close(m(batch([[1, 2, 3, 4, 5, 6]])), m(batch([[6, 5, 4, 3, 2, 1]])))


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_pads_change_nothing(pooling):
    """Appending padding (any ids) to a sequence leaves its logits unchanged."""
    m = model(pooling=pooling)
    alone = m(batch([[3, 1, 4, 1, 5]]))
    padded = m(batch([[3, 1, 4, 1, 5, 9, 2, 6], [2, 7, 1, 8, 2, 8, 1, 8]], pad_from=[5, 8]))
    torch.testing.assert_close(padded[:1], alone, atol=1e-5, rtol=1e-5)


def test_cls_pooling_reads_the_prepended_token():
    m = model(pooling="cls")
    states, mask = m.encoder(torch.tensor([[1, 2, 3]]), torch.zeros(1, 3, dtype=torch.bool))
    assert states.shape[1] == 4 and not mask[0, 0]
    torch.testing.assert_close(m.encoder.pool(states, mask), states[:, 0])


def test_too_long_sequence_is_a_clear_error():
    m = model()
    with pytest.raises(ValueError, match="max_len"):
        m(batch([list(range(1, 12)) * 4]))


def test_matcher_sees_both_documents():
    m = model(head="matcher")
    base = {
        "input_ids_1": torch.tensor([[1, 2, 3, 4]]),
        "padding_mask_1": torch.zeros(1, 4, dtype=torch.bool),
        "input_ids_2": torch.tensor([[5, 6, 7, 0, 0, 0]]),
        "padding_mask_2": torch.tensor([[False, False, False, True, True, True]]),
    }
    out = m(base)
    assert out.shape == (1, 3)
    for key, ids in (("input_ids_1", [[1, 2, 3, 9]]), ("input_ids_2", [[5, 6, 8, 0, 0, 0]])):
        assert not torch.allclose(m({**base, key: torch.tensor(ids)}), out), f"{key} is ignored"
    # padding of the second document (longer than the first) changes nothing
    trimmed = {**base, "input_ids_2": torch.tensor([[5, 6, 7]]), "padding_mask_2": torch.zeros(1, 3, dtype=torch.bool)}
    torch.testing.assert_close(m(trimmed), out, atol=1e-5, rtol=1e-5)


def test_language_model_is_causal_and_counts_only_real_targets():
    m = model(head="lm")
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    logits = m(batch(ids))
    changed = ids.clone()
    changed[0, 4] = 9
    logits2 = m(batch(changed))
    torch.testing.assert_close(logits[:, :4], logits2[:, :4])
    assert not torch.allclose(logits[:, 4:], logits2[:, 4:])
    _, stats = m.loss(logits, batch(ids, pad_from=[4]))
    assert int(stats["count"]) == 3  # targets at positions 1..3; padded targets are not scored


def test_lm_refuses_cls_pooling():
    with pytest.raises(ValueError, match="CLS"):
        model(head="lm", pooling="cls")


def test_bad_model_config_names_the_valid_values():
    with pytest.raises(ValueError, match="sinusoidal, learned, none"):
        ModelConfig(positions="rotary")
    with pytest.raises(ValueError, match="divisible"):
        ModelConfig(dim=10, heads=4)


def test_training_loss_includes_the_mechanisms_aux_loss():
    m = model(mechanism="bam").train()
    module = TaskModule(m, TrainConfig())
    b = batch([[1, 2, 3, 4], [4, 3, 2, 1]])
    torch.manual_seed(0)
    total = module.training_step(b, 0)
    aux = m.encoder.aux_loss()
    assert aux is not None and aux.item() > 0
    torch.manual_seed(0)
    task_loss, _ = m.loss(m(b), b)
    torch.testing.assert_close(total, task_loss + m.encoder.aux_loss())


def test_parameter_count_grows_with_depth():
    assert count_parameters(model(depth=3)) > count_parameters(model(depth=2)) > 0


def test_short_conv_sees_the_previous_token_only():
    """model.short_conv=2: a position's state depends on its own and the previous token, and
    (causal) never on a later one; without attention mixing (positions none, one token changed)."""
    m = model(positions="none", short_conv=2, depth=0)
    x = m.encoder.embed(torch.tensor([[1, 2, 3, 4, 5]]))
    y = m.encoder.short_conv(x)
    x2 = x.clone()
    x2[0, 2] += 1.0  # change token 2
    y2 = m.encoder.short_conv(x2)
    changed = (y2 - y).abs().sum(-1)[0]
    assert changed[:2].max() == 0  # earlier positions never see a later token
    assert changed[2] > 0 and changed[3] > 0  # the token itself and the one after it
    assert changed[4] == 0  # kernel 2: two tokens on
    torch.testing.assert_close(y[:, 0], x[:, 0] + m.encoder.short_conv.conv.weight[:, 0, 1] * x[0, 0])


def test_short_conv_keeps_padding_invariance():
    m = model(short_conv=3)
    alone = m(batch([[3, 1, 4, 1, 5]]))
    padded = m(batch([[3, 1, 4, 1, 5, 9, 2, 6], [2, 7, 1, 8, 2, 8, 1, 8]], pad_from=[5, 8]))
    torch.testing.assert_close(padded[:1], alone, atol=1e-5, rtol=1e-5)


def test_short_conv_must_be_a_kernel_size():
    with pytest.raises(ValueError, match="short_conv=-1"):
        ModelConfig(short_conv=-1)
