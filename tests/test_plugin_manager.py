"""Plugin wiring errors fail at startup with the names of the plugins and hooks involved."""
from __future__ import annotations

import pytest

from conftest import make_config
from ssltrain import ConfigError, PluginConflictError, PluginError, SSLPlugin, hookimpl
from ssltrain.defaults import CoreDefaults
from ssltrain.plugins import build_manager, discover, hooks_of


def manager(classes: dict):
    config = make_config(classes=classes, plugins=list(classes))
    return build_manager(config, {**discover(), **classes}, CoreDefaults(config))


class PredictA(SSLPlugin):
    @hookimpl
    def ssl_predict(self, model, x):
        return model(x)


class PredictB(PredictA):
    pass


def test_two_owners_of_a_one_owner_hook_conflict():
    with pytest.raises(PluginConflictError) as info:
        manager({"alpha": PredictA, "beta": PredictB})
    assert "'ssl_predict'" in str(info.value) and "'alpha'" in str(info.value) and "'beta'" in str(info.value)


def test_declared_incompatible_plugins_stop_the_run_with_the_reason():
    class Heads(SSLPlugin):
        incompatible = {"tails": "both flip the same coin"}

    class Tails(SSLPlugin):
        pass

    with pytest.raises(ConfigError, match="plugins 'heads' and 'tails' cannot run together: both flip the same coin; "
                                          "remove one of them"):
        manager({"tails": Tails, "heads": Heads})  # either order, declared on one side
    assert manager({"heads": Heads}) is not None


def test_a_wrapper_does_not_claim_ownership():
    class Wrap(SSLPlugin):
        @hookimpl(wrapper=True)
        def ssl_predict(self):
            return (yield)

    manager({"alpha": PredictA, "wrap": Wrap})


def test_misspelled_hook_name_fails_with_suggestion():
    class Typo(SSLPlugin):
        @hookimpl
        def ssl_unlabelled_loss(self, batch):
            return None

    with pytest.raises(PluginError, match="'typo' implements unknown hook 'ssl_unlabelled_loss'.*'ssl_unlabeled_loss'"):
        manager({"typo": Typo})


def test_misspelled_argument_fails_at_registration():
    class BadArg(SSLPlugin):
        @hookimpl
        def ssl_unlabeled_loss(self, outputs, labels):
            return None

    with pytest.raises(PluginError, match=r"'badarg': ssl_unlabeled_loss takes unknown argument\(s\) \['labels'\]"):
        manager({"badarg": BadArg})


def test_hooks_run_in_yaml_order_and_defaults_last():
    class A(SSLPlugin):
        @hookimpl
        def ssl_modify_batch(self):
            pass

    pm = manager({"a1": A, "a2": A})
    order = [i.plugin_name for i in reversed(pm.hook.ssl_modify_batch.get_hookimpls())]
    assert order == ["a1", "a2"]
    owners = [i.plugin_name for i in reversed(pm.hook.ssl_predict.get_hookimpls())]
    assert owners[-1] == "ssltrain.defaults"


def test_builtin_plugins_are_entry_points():
    classes = discover()
    assert "pi_model" in classes
    assert hooks_of(classes["pi_model"]) == ["ssl_modify_batch", "ssl_unlabeled_loss"]


def test_trace_prints_every_hook_call(tmp_path, monkeypatch, capsys):
    from ssltrain.loop import train
    monkeypatch.setenv("SSLTRAIN_TRACE_HOOKS", "1")
    train(make_config("train.steps=1", "train.eval_every=1", plugins=["pi_model"]), tmp_path)
    err = capsys.readouterr().err
    assert "[ssltrain hook] ssl_modify_batch -> pi_model" in err
    assert "[ssltrain hook] ssl_optimizer_step -> ssltrain.defaults" in err
