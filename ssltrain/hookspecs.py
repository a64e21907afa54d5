"""Every hook a plugin can implement. The docstring of each spec is its contract.

Three kinds of hook:
- collected: every active plugin's implementation runs; the caller gets all results.
- modify: implementations change an object in place, in the order of the YAML `plugins:` list.
- one owner: at most one active plugin may implement it (a second one is a startup error);
  the core provides the default, and any plugin may wrap it with `@hookimpl(wrapper=True)`.

An implementation may accept any subset of a spec's arguments. Hooks run in `plugins:` order.
"""
from __future__ import annotations

import pluggy

PROJECT = "ssltrain"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

#: Hooks that at most one active plugin may implement (wrappers do not count).
ONE_OWNER = (
    "ssl_build_model",
    "ssl_forward",
    "ssl_supervised_loss",
    "ssl_unlabeled_weights",
    "ssl_optimizer_step",
    "ssl_predict",
)


# --- setup ---------------------------------------------------------------------------------

@hookspec
def ssl_configure(config, plugins):
    """Validate this plugin's settings against the whole run. Collected; runs once at startup.

    config: the resolved `RunConfig` (core sections plus every plugin's section).
    plugins: the names of the active plugins, in order.
    Raise `ssltrain.ConfigError` naming the problem and the fix (e.g. an incompatible plugin).
    """


@hookspec(firstresult=True)
def ssl_build_model(config, num_classes, input_shape):
    """Build the model. One owner; the core default builds `config.model` as a backbone.

    Returns an `nn.Module` whose forward returns logits [N, C] or a dict with "logits" and
    other per-row tensors. Wrappers receive the built model (`model = yield`) and may return
    a changed one (e.g. a wider head).
    """


# --- every step, in this order ----------------------------------------------------------------

@hookspec
def ssl_modify_batch(batch, ctx):
    """Change the `SSLBatch` in place before the forward (label guessing, mixing, extra views).

    Modify hook: runs in `plugins:` order, each plugin seeing the previous one's changes.
    Store plugin values in `batch.extras["<plugin>/<name>"]`. Return nothing.
    """


@hookspec(firstresult=True)
def ssl_forward(model, batch, ctx, forward):
    """Run the model on the batch and return `Outputs`. One owner.

    forward(x, update_bn=True): the model call to use (functional during a virtual step);
    it returns a dict with "logits" and any other per-row outputs.
    Core default: one forward over cat(x_l, x_u), split back into labeled and unlabeled rows.
    """


@hookspec(firstresult=True)
def ssl_supervised_loss(outputs, batch, ctx, forward):
    """Return the supervised loss per labeled row, a tensor [B_l'] (not reduced). One owner.

    Core default: cross-entropy of `outputs.logits_l` against `batch.y_l`, int or soft targets.
    """


@hookspec
def ssl_unlabeled_loss(outputs, batch, ctx, forward):
    """Return this plugin's unlabeled loss terms: a `LossTerm`, a list of them, or None. Collected.

    Terms stay per sample ([B_u] or [B_u, V]); the core multiplies them by the unlabeled
    weights and reduces them. Extra forwards go through `forward(x, update_bn=False)`.
    """


@hookspec(firstresult=True)
def ssl_unlabeled_weights(outputs, batch, ctx):
    """Return weights [B_u], one per row of `batch.x_u`, for every weighted unlabeled term, or None.
    One owner.

    Core default: None (uniform weights). A term reduces to weight * mean(w * per_sample).
    """


@hookspec(firstresult=True)
def ssl_optimizer_step(closure, model, optimizer, scaler, ctx):
    """Compute the loss, update the parameters, and return a `StepResult`. One owner.

    closure(params=None, labeled_only=False) -> LossResult reruns forward and losses on the
    already modified batch; with `params` (a dict name -> tensor) the model is called
    functionally on those tensors and its buffers are copies, so a virtual step leaves the real
    model untouched. Core default: closure(), backward (through the grad scaler), optional
    gradient clipping, optimizer step, zero grads. Plugins normally wrap it (bi-level steps).
    """


@hookspec
def ssl_step_end(result, batch, ctx):
    """Notification after the optimizer step: plugin bookkeeping. Collected; return nothing.

    Runs every step: do no host syncs here (keep statistics as tensors).
    """


@hookspec(firstresult=True)
def ssl_predict(model, x):
    """Return class scores [N, C] (logits or log-probabilities) for inputs x. One owner.

    Used for evaluation (with the EMA model when EMA is on) and through `ctx.predict` for
    label guessing. Core default: the model's logits.
    """


# --- logging, evaluation, checkpoints ----------------------------------------------------------

@hookspec
def ssl_metrics(result, ctx):
    """Return a dict of diagnostics "<plugin>/<name>" -> float or 0-dim tensor. Collected.

    Called only at log steps: the one place where reading tensors to the host is fine.
    """


@hookspec
def ssl_evaluate_end(model, data, prepare, metrics, step, logger):
    """Notification after each evaluation of `model` (the evaluated model, EMA when on).

    data: the run's `SSLData` (streamed image files: `data.train_x[idx]` and `data.test_x[idx]` decode
    those rows on access, see `SSLData`); prepare(x): raw dataset rows (e.g. `data.test_x[i]`) -> model inputs,
    un-augmented and normalised as the evaluation feeds them (the run's memory format); metrics: the
    evaluation metrics dict, to which a plugin may add its own evaluation scalars as
    `metrics["<plugin>/<name>"] = float` (logged as `eval/<key>`, written to metrics.jsonl and, from the
    last evaluation, to summary.json's `final_eval`); logger: the run's `RunLogger` for pictures (e.g.
    `logger.figure(tag, fig, step)`). Collected; return nothing.
    """


@hookspec
def ssl_state_dict(state):
    """Save plugin state for checkpoints: set `state["<plugin name>"]` to a dict of tensors,
    numbers, strings and lists. Modify hook; plugins without state do not implement it."""


@hookspec
def ssl_load_state_dict(state):
    """Restore plugin state from a checkpoint: read `state["<plugin name>"]`. Modify hook."""
