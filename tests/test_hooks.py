"""Each hook, tested with small test plugins; together they prove that the hook design can
express the five built-in methods: (a) batch transforms, (b) owning the model, (c) a bi-level
step with a functional virtual step, (d) owning prediction, (e) per-sample unlabeled terms
multiplied by another plugin's weights."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from ssltrain import ConfigError, LossTerm, Outputs, SSLPlugin, hookimpl
from ssltrain.loop import Trainer, train
from ssltrain.plugins import discover
from ssltrain.testing import read_scalars

from conftest import make_config


def run(tmp_path: Path, plugins: dict, steps: int = 20, resume=False, **sections):
    """Train the tiny config with extra plugin classes enabled in the given order."""
    config = make_config(f"train.steps={steps}", classes=plugins, plugins=list(plugins), **sections)
    return train(config, tmp_path / "run", resume=resume, classes={**discover(), **plugins})


def trainer_with(tmp_path, plugins: dict, **sections) -> Trainer:
    config = make_config(classes=plugins, plugins=list(plugins), **sections)
    return Trainer(config, tmp_path, {**discover(), **plugins})


def first_closure(trainer: Trainer):
    ctx = trainer.context(0)
    batch = trainer.draw(0)
    trainer.hook.ssl_modify_batch(batch=batch, ctx=ctx)
    return batch, ctx, trainer.make_closure(batch, ctx)


class Recorder(SSLPlugin):
    calls: list = []

    @hookimpl
    def ssl_modify_batch(self, batch):
        Recorder.calls.append(self.name)


def test_hook_ssl_configure(tmp_path):
    seen = {}

    class Picky(SSLPlugin):
        @hookimpl
        def ssl_configure(self, config, plugins):
            seen["plugins"] = plugins
            if config.data.num_labeled < 10:
                raise ConfigError("picky needs data.num_labeled >= 10")

    with pytest.raises(ConfigError, match="num_labeled >= 10"):
        trainer_with(tmp_path, {"picky": Picky, "rec": Recorder})
    assert seen["plugins"] == ["picky", "rec"]


class TwoHeadModel(nn.Module):
    """Owned model with batch norm whose forward returns logits plus another per-row output."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(2, 16), nn.BatchNorm1d(16), nn.ReLU())
        self.head = nn.Linear(16, 2)

    def forward(self, x):
        h = self.body(x)
        return {"logits": self.head(h), "energy": h.pow(2).sum(1)}


class OwnModel(SSLPlugin):
    """(b) owns model building and uses the extra per-row output in a loss."""

    @hookimpl
    def ssl_build_model(self, num_classes, input_shape):
        assert num_classes == 2 and input_shape == (2,)
        return TwoHeadModel()

    @hookimpl
    def ssl_unlabeled_loss(self, outputs, batch):
        assert outputs.extras_u["energy"].shape == (batch.x_u.shape[0],)
        assert outputs.extras_l["energy"].shape == (batch.x_l.shape[0],)
        return LossTerm("own/energy", 1e-3 * outputs.extras_u["energy"])


def test_hook_ssl_build_model(tmp_path):
    class Widen(SSLPlugin):
        """A wrapper edits the owner's model (as SLA widens the head)."""

        @hookimpl(wrapper=True)
        def ssl_build_model(self):
            model = yield
            model.head = nn.Linear(model.head.in_features, 2)
            model.widened = True
            return model

    trainer = trainer_with(tmp_path, {"own": OwnModel, "widen": Widen})
    assert isinstance(trainer.model, TwoHeadModel) and trainer.model.widened
    summary = run(tmp_path, {"own": OwnModel, "widen": Widen})
    assert summary["steps"] == 20


def test_hook_ssl_modify_batch(tmp_path):
    """(a) batch transforms run in `plugins:` order and the losses see the changed batch."""

    class Duplicate(SSLPlugin):
        @hookimpl
        def ssl_modify_batch(self, batch):
            batch.x_l = torch.cat([batch.x_l, batch.x_l])
            batch.y_l = torch.cat([batch.y_l, batch.y_l])

    Recorder.calls = []
    trainer = trainer_with(tmp_path, {"first": Recorder, "dup": Duplicate, "last": Recorder})
    batch, ctx, closure = first_closure(trainer)
    assert Recorder.calls == ["first", "last"]
    assert closure().supervised.shape == (2 * 16,)


def test_hook_ssl_forward(tmp_path):
    class SeparateForwards(SSLPlugin):
        @hookimpl
        def ssl_forward(self, batch, forward):
            out_l, out_u = forward(batch.x_l), forward(batch.x_u, update_bn=False)
            return Outputs(logits_l=out_l["logits"], logits_u=out_u["logits"])

    class Uses(SSLPlugin):
        @hookimpl
        def ssl_unlabeled_loss(self, outputs):
            return LossTerm("uses/zero", outputs.logits_u.sum(1) * 0)

    trainer = trainer_with(tmp_path, {"fwd": SeparateForwards, "uses": Uses})
    batch, ctx, closure = first_closure(trainer)
    loss = closure()
    expect = trainer.model(batch.x_l)
    torch.testing.assert_close(loss.outputs.logits_l, expect)


def test_hook_ssl_supervised_loss(tmp_path):
    class Halved(SSLPlugin):
        @hookimpl
        def ssl_supervised_loss(self, outputs, batch):
            return 0.5 * torch.nn.functional.cross_entropy(outputs.logits_l, batch.y_l, reduction="none")

    trainer = trainer_with(tmp_path, {"half": Halved})
    batch, ctx, closure = first_closure(trainer)
    logits = trainer.model(batch.x_l)
    expect = 0.5 * torch.nn.functional.cross_entropy(logits, batch.y_l)
    torch.testing.assert_close(closure().total, expect)


class ConstTerm(SSLPlugin):
    """(e) a per-sample term: row i has loss i."""

    @hookimpl
    def ssl_unlabeled_loss(self, batch):
        n = batch.x_u.shape[0]
        return [LossTerm("const/rows", torch.arange(n, dtype=torch.float32), weight=2.0),
                LossTerm("const/views", torch.ones(n, 3))]


class Weights(SSLPlugin):
    @hookimpl
    def ssl_unlabeled_weights(self, batch):
        n = batch.x_u.shape[0]
        return (torch.arange(n) % 2).float()  # odd rows only


def test_hook_ssl_unlabeled_loss(tmp_path):
    trainer = trainer_with(tmp_path, {"const": ConstTerm})
    batch, ctx, closure = first_closure(trainer)
    loss = closure()
    n = batch.x_u.shape[0]
    assert [t.name for t in loss.terms] == ["const/rows", "const/views"]
    torch.testing.assert_close(loss.reduced["const/rows"], torch.tensor(2.0 * (n - 1) / 2))
    torch.testing.assert_close(loss.total, loss.reduced["supervised"] + loss.reduced["const/rows"] + 1.0)


def test_hook_ssl_unlabeled_weights(tmp_path):
    """(e) one plugin's weights multiply another plugin's per-sample terms, views broadcast."""
    trainer = trainer_with(tmp_path, {"const": ConstTerm, "w": Weights})
    batch, ctx, closure = first_closure(trainer)
    loss = closure()
    n = batch.x_u.shape[0]
    odd = torch.arange(n)[torch.arange(n) % 2 == 1].float()
    torch.testing.assert_close(loss.reduced["const/rows"], 2.0 * odd.sum() / n)
    torch.testing.assert_close(loss.reduced["const/views"], torch.tensor(0.5))


def test_unweighted_term_and_contract_errors(tmp_path):
    from ssltrain import PluginContractError
    from ssltrain.loop import reduce_term

    w = torch.ones(4)
    assert reduce_term(LossTerm("a/b", torch.ones(7), weighted=False), w, 4) == 1.0
    with pytest.raises(PluginContractError, match="'a/b'.*shape"):
        reduce_term(LossTerm("a/b", torch.ones(7)), w, 4)
    with pytest.raises(PluginContractError, match="<plugin>/<term>"):
        reduce_term(LossTerm("nameless", torch.ones(4)), w, 4)
    with pytest.raises(PluginContractError, match="floating"):
        reduce_term(LossTerm("a/b", torch.ones(4, dtype=torch.long)), w, 4)


class MetaWeights(SSLPlugin):
    """(c) a bi-level step in the style of DS3L: a meta-parameter sets the unlabeled weights and
    is trained through a functional virtual step of the model (learning to reweight)."""

    def __init__(self, config=None):
        super().__init__(config)
        self.alpha = torch.zeros(1, requires_grad=True)
        self.meta_grads = []

    @hookimpl
    def ssl_unlabeled_weights(self, batch):
        return torch.sigmoid(self.alpha).expand(batch.x_u.shape[0])

    @hookimpl(wrapper=True)
    def ssl_optimizer_step(self, closure, model):
        params = dict(model.named_parameters())
        before = {k: v.detach().clone() for k, v in model.state_dict().items()}
        loss = closure(params=params)
        grads = torch.autograd.grad(loss.total, list(params.values()), create_graph=True)
        fast = {n: p - 0.1 * g for (n, p), g in zip(params.items(), grads)}
        meta_loss = closure(params=fast, labeled_only=True).total
        (meta_grad,) = torch.autograd.grad(meta_loss, self.alpha)
        self.meta_grads.append(meta_grad)
        for k, v in model.state_dict().items():  # the virtual step changed nothing real
            assert torch.equal(v, before[k]), k
        return (yield)


def test_hook_ssl_optimizer_step(tmp_path):
    plugins = {"own": OwnModel, "pi_model": discover()["pi_model"], "meta": MetaWeights}
    trainer = trainer_with(tmp_path, plugins)
    meta = trainer.pm.get_plugin("meta")
    for step in range(3):
        batch, ctx, closure = first_closure(trainer)
        trainer.hook.ssl_optimizer_step(closure=closure, model=trainer.model, optimizer=trainer.optimizer,
                                        scaler=trainer.scaler, ctx=ctx)
    assert len(meta.meta_grads) == 3
    assert any(g.abs().item() > 0 for g in meta.meta_grads)


def test_hook_ssl_step_end(tmp_path):
    seen = []

    class Count(SSLPlugin):
        @hookimpl
        def ssl_step_end(self, result, ctx):
            seen.append((ctx.step, result.loss.total.shape))

    run(tmp_path, {"count": Count}, steps=7)
    assert [s for s, _ in seen] == list(range(7)) and seen[0][1] == ()


class Flip(SSLPlugin):
    """(d) owns prediction: swaps the two classes (so accuracy becomes 100 - accuracy)."""

    guesses = 0

    @hookimpl
    def ssl_predict(self, model, x):
        return model(x).flip(-1)

    @hookimpl
    def ssl_modify_batch(self, batch, ctx):
        with torch.no_grad():
            assert ctx.predict(batch.x_u).shape == (batch.x_u.shape[0], 2)
        Flip.guesses += 1


def test_hook_ssl_predict(tmp_path):
    normal = run(tmp_path / "a", {}, steps=10)
    flipped = run(tmp_path / "b", {"flip": Flip}, steps=10)
    assert Flip.guesses == 10
    assert flipped["test_top1"] == pytest.approx(100 - normal["test_top1"])


def test_hook_ssl_metrics(tmp_path):
    from ssltrain.tblog import read_tensorboard, scalar_values

    class Diag(SSLPlugin):
        @hookimpl
        def ssl_metrics(self, result, ctx):
            assert ctx.is_log_step
            return {"diag/batch_u": result.loss.outputs.logits_u.shape[0], "diag/loss": result.loss.total}

    run(tmp_path, {"diag": Diag, "pi_model": discover()["pi_model"]}, steps=10)
    events = read_tensorboard(tmp_path / "run" / "tb")
    tags = events.PluginTagToContent("scalars")
    assert {"diag/batch_u", "diag/loss", "loss/pi_model/consistency", "loss/supervised", "loss/total",
            "train/lr", "accuracy/top1"} <= set(tags)
    assert scalar_values(events, "diag/batch_u") == [(5, 32.0), (10, 32.0)]


def test_hook_ssl_evaluate_end(tmp_path):
    seen = []

    class Watch(SSLPlugin):
        @hookimpl
        def ssl_evaluate_end(self, model, data, prepare, metrics, step, logger):
            assert not model.training and data.num_classes == 2
            torch.testing.assert_close(prepare(data.test_x[:3]), data.test_x[:3])  # two moons: no normalisation
            logger.image("watch/picture", torch.zeros(3, 4, 4), step)
            metrics["watch/double_top1"] = 2 * metrics["top1"]
            seen.append(step)

    summary = run(tmp_path, {"watch": Watch}, steps=20)
    assert seen == [10, 20]
    assert summary["final_eval"]["watch/double_top1"] == 2 * summary["test_top1"]  # the last evaluation's
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [line["watch/double_top1"] for line in lines] == [2 * line["top1"] for line in lines]


class Counter(SSLPlugin):
    """Plugin state in checkpoints: counts its steps."""

    def __init__(self, config=None):
        super().__init__(config)
        self.count = torch.zeros((), dtype=torch.long)

    @hookimpl
    def ssl_step_end(self):
        self.count += 1

    @hookimpl
    def ssl_state_dict(self, state):
        state[self.name] = {"count": self.count}

    @hookimpl
    def ssl_load_state_dict(self, state):
        self.count = state[self.name]["count"]


def test_hook_ssl_state_dict(tmp_path):
    from ssltrain import checkpoint
    run(tmp_path, {"counter": Counter}, steps=10)
    state = checkpoint.load(tmp_path / "run" / "checkpoints" / "last.pt")
    assert int(state["plugins"]["counter"]["count"]) == 10


def test_hook_ssl_load_state_dict(tmp_path):
    run(tmp_path, {"counter": Counter}, steps=10)
    config = make_config("train.steps=15", classes={"counter": Counter}, plugins=["counter"])
    trainer = Trainer(config, tmp_path / "run", {**discover(), "counter": Counter})
    from ssltrain import checkpoint
    trainer.load_state_dict(checkpoint.load(tmp_path / "run" / "checkpoints" / "last.pt"))
    assert int(trainer.pm.get_plugin("counter").count) == 10
    assert trainer.fit()["steps"] == 15
    assert int(trainer.pm.get_plugin("counter").count) == 15
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 15


def test_every_hook_is_documented_and_tested():
    from ssltrain import hookspecs
    names = [n for n in dir(hookspecs) if n.startswith("ssl_")]
    source = "\n".join(p.read_text() for p in Path(__file__).parent.glob("test_*.py"))
    for name in names:
        assert len((getattr(hookspecs, name).__doc__ or "").split()) >= 10, f"{name} has no contract"
        assert f"def test_hook_{name}(" in source, f"hook {name} has no test_hook_{name}"


def test_every_hook_has_a_docs_section_titled_with_its_signature():
    import inspect

    from ssltrain import hookspecs
    docs = (Path(__file__).parent.parent / "docs" / "plugins.md").read_text()
    for name in (n for n in dir(hookspecs) if n.startswith("ssl_")):
        signature = f"{name}({', '.join(inspect.signature(getattr(hookspecs, name)).parameters)})"
        assert f"### `{signature}`" in docs, f"docs/plugins.md has no section for {signature}"


def test_label_guessing_can_leave_batch_norm_statistics_alone(tmp_path):
    class Guess(SSLPlugin):
        @hookimpl
        def ssl_modify_batch(self, batch, ctx):
            with torch.no_grad():
                ctx.predict(batch.x_u, update_bn=False)

    config = make_config("data.name=synthetic", "data.options={n_train: 64, n_test: 8, shape: [1, 8, 8], num_classes: 2}",
                         "model.name=small_cnn", "model.options={width: 4}", classes={"guess": Guess},
                         plugins=["guess", "pi_model"])
    trainer = Trainer(config, tmp_path, {**discover(), "guess": Guess})
    batch, ctx, closure = first_closure(trainer)  # runs ssl_modify_batch: the guess only
    assert all(int(m.num_batches_tracked) == 0 for m in trainer.model.modules() if isinstance(m, nn.BatchNorm2d))
    closure()  # the training forward updates them
    assert all(int(m.num_batches_tracked) == 1 for m in trainer.model.modules() if isinstance(m, nn.BatchNorm2d))


def test_ssl_metrics_runs_exactly_at_log_steps_and_steps_are_zero_based(tmp_path):
    """ssl_metrics runs at the log steps (every train.log_every and the last), the only steps with
    ctx.is_log_step; evaluation and checkpoint steps in between log the losses but call no ssl_metrics.
    ctx.step counts from 0; TensorBoard steps count finished steps (ctx.step + 1)."""
    log_steps, metric_calls = [], []

    class When(SSLPlugin):
        @hookimpl
        def ssl_modify_batch(self, ctx):
            if ctx.is_log_step:
                log_steps.append(ctx.step)

        @hookimpl
        def ssl_metrics(self, ctx):
            metric_calls.append((ctx.step, ctx.is_log_step))
            return {"when/ctx_step": ctx.step}

    config = make_config("train.steps=10", "train.log_every=5", "train.eval_every=3", classes={"when": When},
                         plugins=["when", "pi_model"])
    train(config, tmp_path, classes={**discover(), "when": When})
    assert log_steps == [4, 9] and metric_calls == [(4, True), (9, True)]
    scalars = read_scalars(tmp_path)
    assert scalars["when/ctx_step"] == [(5, 4.0), (10, 9.0)]
    assert [step for step, _ in scalars["loss/total"]] == [3, 5, 6, 9, 10]  # evaluation/checkpoint steps too


def test_hook_docstrings_open_with_a_complete_sentence():
    """`ssltrain hooks` prints each docstring's first line: it must be the whole first sentence."""
    from ssltrain import hookspecs
    for name in (n for n in dir(hookspecs) if n.startswith("ssl_")):
        first = getattr(hookspecs, name).__doc__.strip().splitlines()[0]
        assert first.endswith("."), f"{name}: first docstring line is not a complete sentence: {first!r}"


def test_forward_returns_a_dict_and_update_bn_false_uses_batch_statistics_without_updating(tmp_path):
    seen = {}

    class Probe(SSLPlugin):
        @hookimpl
        def ssl_forward(self, model, batch, forward):
            frozen = forward(batch.x_u, update_bn=False)
            seen["tracked_after_frozen"] = [int(m.num_batches_tracked) for m in model.modules()
                                            if isinstance(m, nn.BatchNorm2d)]
            seen["training"] = model.training
            seen["dict"] = isinstance(frozen, dict) and set(frozen) == {"logits"}  # a tensor model, wrapped
            updating = forward(batch.x_u)
            seen["same_logits"] = torch.equal(frozen["logits"], updating["logits"])  # both batch statistics
            return None  # defer to the core's forward

    config = make_config("data.name=synthetic", "data.options={n_train: 64, n_test: 8, shape: [1, 8, 8], num_classes: 2}",
                         "model.name=small_cnn", "model.options={width: 4}", classes={"probe": Probe},
                         plugins=["probe", "pi_model"])
    trainer = Trainer(config, tmp_path, {**discover(), "probe": Probe})
    batch, ctx, closure = first_closure(trainer)
    closure()
    assert seen["training"] and seen["dict"] and seen["same_logits"]
    assert set(seen["tracked_after_frozen"]) == {0}
    assert {int(m.num_batches_tracked) for m in trainer.model.modules() if isinstance(m, nn.BatchNorm2d)} == {2}


def test_batch_fields_hold_what_the_docs_say(tmp_path):
    """SSLBatch as drawn: raw rows in [0, 1], views of them, dataset indices, true labels with -1 for
    unseen classes, no soft targets, no extras; a run without unlabeled terms draws no unlabeled rows."""
    images = ["data.name=synthetic", "data.options={n_train: 120, n_test: 12, shape: [1, 8, 8], num_classes: 3}",
              "data.num_labeled=8", "data.class_mismatch={seen_classes: [0, 1], unseen_ratio: 0.5}",
              "model.name=small_cnn", "model.options={width: 4}"]
    trainer = Trainer(make_config(*images, plugins=["pi_model"]), tmp_path)
    batch, data = trainer.draw(0), trainer.data
    assert batch.x_u.shape[0] == batch.raw_u.shape[0] == batch.idx_u.shape[0] == batch.y_u_hidden.shape[0] == 32
    torch.testing.assert_close(batch.raw_u, data.train_x[batch.idx_u].float() / 255)
    torch.testing.assert_close(batch.raw_l, data.train_x[batch.idx_l].float() / 255)
    assert torch.equal(batch.y_u_hidden, data.y_hidden[batch.idx_u]) and torch.equal(batch.y_l, data.y_hidden[batch.idx_l])
    assert bool((batch.y_u_hidden == -1).any()) and bool((batch.y_l >= 0).all())
    assert set(batch.idx_l.tolist()) <= set(data.labeled_idx.tolist())
    assert batch.y_u is None and batch.extras == {}
    supervised = Trainer(make_config(*images, plugins=[]), tmp_path).draw(0)
    assert supervised.x_u.shape[0] == supervised.raw_u.shape[0] == supervised.idx_u.shape[0] == 0


def test_a_plugin_is_built_with_its_section_and_named_before_the_first_hook(tmp_path):
    from ssltrain import Section
    seen = {}

    class Named(SSLPlugin):
        class Config(Section):
            weight: float = 1.0

        def __init__(self, config=None):
            super().__init__(config)
            seen["init"] = (self.name, config)

        @hookimpl
        def ssl_configure(self):
            seen["configure"] = self.name

    class Bare:  # no base class: any class built as cls(config) with hookimpl methods works
        def __init__(self, config):
            self.config = config

        @hookimpl
        def ssl_step_end(self):
            pass

    trainer = trainer_with(tmp_path, {"named": Named, "bare": Bare}, named={"weight": 2.0})
    assert seen["init"][0] == "" and seen["init"][1].weight == 2.0 and seen["configure"] == "named"
    assert trainer.pm.get_plugin("bare").config is None
