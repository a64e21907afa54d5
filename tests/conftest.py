"""Shared helpers. The fixtures `ssl_config` and `ssl_run` come from ssltrain's own pytest plugin
(`ssltrain.testing`, registered through the `pytest11` entry point), the same ones plugin authors use."""
from __future__ import annotations

from ssltrain.testing import TINY, tiny_config

make_config = tiny_config

__all__ = ["TINY", "make_config", "SMALL_IMAGES", "prepared"]

#: A tiny image setting (4 classes of 8x8 synthetic images, a width-4 small CNN with batch norm).
SMALL_IMAGES = ("data.name=synthetic", "data.options={n_train: 64, n_test: 8, shape: [1, 8, 8], num_classes: 4}",
                "model.name=small_cnn", "model.options={width: 4}")


def prepared(config, step: int = 0):
    """A Trainer on `config` (not trained), the batch of `step` after ssl_modify_batch, its ctx (a log step)
    and its closure, as the loop builds them."""
    from ssltrain.loop import Trainer
    trainer = Trainer(config, "unused")
    ctx, batch = trainer.context(step, is_log=True), trainer.draw(step)
    trainer.hook.ssl_modify_batch(batch=batch, ctx=ctx)
    return trainer, batch, ctx, trainer.make_closure(batch, ctx)
