"""Self-pretraining (train.pretrain_steps): masked denoising of the task's own inputs before
fine-tuning, part of the cell's identity and recorded."""

import pytest
import torch

from harness.train.build import build_model
from harness.train.config import TrainConfig, compose
from harness.train.model import ModelConfig
from harness.train.pretrain import MaskedDenoising


class _Task:
    def __init__(self, head, use_cls=False):
        self.name, self.head, self.num_classes, self.vocab_size, self.max_len = "t", head, 3, 12, 16


def _stage(head="classifier", **model):
    net = build_model(_Task(head), ModelConfig(dim=16, depth=1, heads=2, mlp_dim=32, dropout=0.0, **model), "softmax")
    return net, MaskedDenoising(net, TrainConfig(max_steps=10, pretrain_steps=5, pretrain_mask=0.5), 12)


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_denoising_predicts_masked_tokens_only_and_trains_the_encoder(pooling):
    net, stage = _stage(pooling=pooling)
    ids = torch.randint(1, 12, (4, 10))
    pad = torch.zeros(4, 10, dtype=torch.bool)
    pad[:, 7:] = True
    ids[pad] = 0
    before = net.encoder.blocks[0].mix.to_q.weight.detach().clone()
    opt = torch.optim.SGD(stage.parameters(), lr=0.5)
    loss = stage.denoising_loss(ids, pad)
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    opt.step()
    assert not torch.equal(before, net.encoder.blocks[0].mix.to_q.weight)  # the shared encoder learned
    assert net.out.weight.grad is None  # the task head is not part of the first stage


def test_matcher_pretrains_on_both_documents():
    _, stage = _stage("matcher")
    batch = {
        "input_ids_1": torch.randint(1, 12, (2, 5)),
        "padding_mask_1": torch.zeros(2, 5, dtype=torch.bool),
        "input_ids_2": torch.randint(1, 12, (2, 7)),
        "padding_mask_2": torch.zeros(2, 7, dtype=torch.bool),
        "label": torch.tensor([0, 1]),
    }
    assert [ids.shape[1] for ids, _ in stage._documents(batch)] == [5, 7]


def test_pretraining_is_in_the_identity_and_the_record(tmp_path):
    from harness.train.run import run_cell

    result = run_cell(
        compose(
            [
                "task=listops",
                "scale=tiny",
                "train.pretrain_steps=6",
                "train.max_steps=4",
                "train.eval_every=4",
                "trainer.progress_bar=false",
                f"results_dir={tmp_path}/r",
                f"cache_dir={tmp_path}/c",
            ]
        )
    )
    assert result["status"] == "ok", result["error"]
    assert result["config"]["train"]["pretrain_steps"] == 6 and "train.pretrain_steps=6" in result["variant_label"]
    pre = result["data"]["pretrain"]
    assert pre["steps"] == 6 and pre["objective"] == "masked denoising" and pre["final_loss"] > 0
    with pytest.raises(ValueError, match=r"train.pretrain_steps=-1 must be >= 0"):
        TrainConfig(pretrain_steps=-1)
