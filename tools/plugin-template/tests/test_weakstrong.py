"""The plugin's math on hand-made tensors, then end to end with ssltrain's pytest fixtures
(`ssl_run`, `ssl_config`: available once ssltrain is installed)."""
import pytest
import torch

from ssltrain_weakstrong import masked_cross_entropy, pseudo_labels, split_views


def test_pseudo_labels_are_the_weak_argmax_kept_where_confident_without_gradient():
    logits = torch.tensor([[3.0, 0.0], [0.2, 0.0], [0.0, 5.0]], requires_grad=True)
    labels, mask = pseudo_labels(logits, threshold=0.9)
    assert labels.tolist() == [0, 0, 1] and mask.tolist() == [1.0, 0.0, 1.0]  # softmax max: 0.95, 0.55, 0.99
    assert not labels.requires_grad and not mask.requires_grad
    strong = torch.zeros(3, 2, requires_grad=True)
    loss = masked_cross_entropy(strong, labels, mask)
    torch.testing.assert_close(loss, torch.log(torch.tensor(2.0)) * mask)
    loss.sum().backward()
    assert strong.grad[1].abs().sum() == 0 and logits.grad is None  # masked row and weak logits: no gradient


def test_one_forward_is_split_into_labeled_weak_and_strong_rows():
    out = {"logits": torch.arange(6.0)[:, None].expand(6, 2), "z": torch.arange(6.0)}  # 2 labeled, 2 weak, 2 strong
    outputs = split_views(out, n_l=2, n_u=2, prefix="weakstrong")
    assert outputs.logits_l[:, 0].tolist() == [0, 1] and outputs.logits_u[:, 0].tolist() == [2, 3]
    assert outputs.extras_l["z"].tolist() == [0, 1] and outputs.extras_u["z"].tolist() == [2, 3]
    assert outputs.extras_u["weakstrong/logits_strong"][:, 0].tolist() == [4, 5]
    assert outputs.extras_u["weakstrong/z_strong"].tolist() == [4, 5]


def test_config_defaults_are_the_official_ones(ssl_config):
    section = ssl_config(plugins=["weakstrong"]).plugin("weakstrong")
    assert section.threshold == 0.95 and section.weight == 1.0  # fixmatch.py: confidence 0.95, wu 1


def test_trains_logs_and_resumes_exactly(ssl_run):
    run = ssl_run(plugins=["weakstrong"], steps=20, overrides=["weakstrong.threshold=0.6"])
    assert run.summary["steps"] == 20
    assert [step for step, _ in run.scalars("weakstrong/consistency")] == [5, 10, 15, 20]
    mask_rate = [value for _, value in run.scalars("weakstrong/mask_rate")]
    assert len(mask_rate) == 4 and all(0 <= v <= 1 for v in mask_rate) and mask_rate[-1] > 0
    assert float(run.checkpoint()["plugins"]["weakstrong"]["kept_per_class"].sum()) > 0
    run.assert_resumes_exactly(at=10)


def test_composes_with_per_sample_weights(ssl_run):
    """DS3L's meta-learned weights multiply this plugin's per-row term; its labeled-only virtual
    forwards fall back to the core's forward."""
    run = ssl_run(plugins=["weakstrong", "ds3l"], steps=5, overrides=["weakstrong.threshold=0.6"])
    assert run.scalars("weakstrong/consistency") and run.scalars("ds3l/meta_loss")


def test_rejects_a_batch_changed_after_it(ssl_run):
    from ssltrain import PluginContractError, SSLPlugin, hookimpl

    class Halve(SSLPlugin):
        @hookimpl
        def ssl_modify_batch(self, batch):
            batch.x_u = batch.x_u[: batch.x_u.shape[0] // 2]

    with pytest.raises(PluginContractError, match="strong views"):
        ssl_run(plugins=["weakstrong", "halve"], classes={"halve": Halve}, steps=1)
