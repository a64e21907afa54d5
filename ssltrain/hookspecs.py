"""Every hook a plugin can implement. The docstring of each spec is its contract.

Three kinds of hook:
- collected: every active plugin's implementation runs; the caller gets all results.
- modify: implementations change an object in place, in the order of the YAML `plugins:` list.
- one owner: at most one active plugin may implement it (a second one is a startup error);
  the core provides the default, and any plugin may wrap it with `@hookimpl(wrapper=True)`.

An implementation may accept any subset of a spec's arguments. Hooks run in `plugins:` order.
Under torchrun every hook runs on every process (docs/plugins.md, "Several processes").
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
    """Validate this plugin's settings against the whole run, once at startup.

    Collected. config: the resolved `RunConfig` (core sections, and every plugin's section as
    `config.plugin(name)`); plugins: the names of the active plugins, in order. Raise
    `ssltrain.ConfigError` naming the problem and the fix (e.g. an incompatible plugin).
    """


@hookspec(firstresult=True)
def ssl_build_model(config, num_classes, input_shape):
    """Build the model (the core default builds `config.model` as a backbone).

    One owner. Returns an `nn.Module` whose forward returns logits [N, C] or a dict with "logits"
    and other per-row tensors. Wrappers receive the built model (`model = yield`) and may return a
    changed one (e.g. a wider head). Every process builds it, the same way.
    """


# --- every step, in this order ----------------------------------------------------------------

@hookspec
def ssl_modify_batch(batch, ctx):
    """Change the `SSLBatch` in place before the forward (label guessing, mixing, extra views).

    Modify hook: runs in `plugins:` order, each plugin seeing the previous one's changes. Keep the
    rows of x_l, y_l, idx_l (and of x_u, y_u, y_u_hidden, idx_u) aligned. Store plugin values in
    `batch.extras["<plugin>/<name>"]`. Return nothing.
    """


@hookspec(firstresult=True)
def ssl_forward(model, batch, ctx, forward):
    """Run the model on the batch and return `Outputs`, every model output split into its rows.

    One owner. forward(x, update_bn=True, autocast=True) is the model call to use (a functional call
    during a virtual step, the DDP model under torchrun); it always returns a dict: "logits" and the
    model's other per-row outputs; autocast=False runs the call in float32 even under `train.amp` (for
    numerically delicate forwards, e.g. VAT's finite differences). Return `logits_l` row-aligned with
    `batch.x_l`, `logits_u` with `batch.x_u`, and every other key of the model's output split the same
    way into `extras_l` / `extras_u` (other plugins read them); add your own entries as
    "<plugin>/<name>". Returning None defers to the core default: one forward over cat(x_l, x_u),
    split by `ssltrain.split_rows`.
    """


@hookspec(firstresult=True)
def ssl_supervised_loss(outputs, batch, ctx, forward):
    """Return the supervised loss per labeled row, a tensor [B_l'] (not reduced).

    One owner. Core default: cross-entropy of `outputs.logits_l` against `batch.y_l` (int labels
    or soft targets [B_l', C]).
    """


@hookspec
def ssl_unlabeled_loss(outputs, batch, ctx, forward):
    """Return this plugin's unlabeled loss terms: a `LossTerm`, a list of them, or None.

    Collected. Terms stay per sample ([B_u] or [B_u, V]); the core multiplies them by the unlabeled
    weights and reduces them. Extra forwards go through `forward(x, update_bn=False)`. Implementing
    it makes the run draw unlabeled rows (unless the plugin's `uses_unlabeled` is False).
    """


@hookspec(firstresult=True)
def ssl_unlabeled_weights(outputs, batch, ctx):
    """Return weights [B_u], one per row of `batch.x_u`, for every weighted unlabeled term, or None.

    One owner. The weights multiply the weighted terms of every plugin: a term reduces to
    weight * mean(w * per_sample). Core default: None (uniform).
    """


@hookspec(firstresult=True)
def ssl_optimizer_step(closure, model, optimizer, scaler, ctx):
    """Compute the loss, update the parameters, and return a `StepResult`.

    One owner, normally wrapped (bi-level steps). closure(params=None, labeled_only=False) ->
    LossResult reruns forward and losses on the already modified batch; with `params` (a dict
    name -> tensor) the model is called functionally on those tensors with copied buffers, so a
    virtual step leaves the real model untouched. Core default: closure(), backward (through the
    grad scaler), optional gradient clipping, optimizer step, zero grads.
    """


@hookspec
def ssl_step_end(result, batch, ctx):
    """Do plugin bookkeeping after the optimizer step, every step; return nothing.

    Collected. Runs every step on every process: keep statistics as device tensors (no `.item()`,
    no printing). Collectives (`ssltrain.all_reduce_mean`) are allowed if every process makes the
    same calls: decided by the step number or the config, never by this process's data.
    """


@hookspec(firstresult=True)
def ssl_predict(model, x):
    """Return class scores [N, C] (logits or log-probabilities) for inputs x.

    One owner. Used for evaluation (the EMA model when EMA is on) and through `ctx.predict` for
    label guessing. No collectives: each process scores its own shard of the test set, and the
    shards may need different numbers of calls. Core default: the model's logits.
    """


# --- logging, evaluation, checkpoints ----------------------------------------------------------

@hookspec
def ssl_metrics(result, ctx):
    """Return diagnostics to log, a dict "<plugin>/<name>" -> float or 0-dim tensor, at log steps.

    Collected. Runs at the log steps only: every `train.log_every` steps and the last, the steps
    where `ctx.is_log_step` is True; logged at TensorBoard step `ctx.step + 1`. It runs on every
    process at once, so reading tensors to the host and averaging with `ssltrain.all_reduce_mean`
    are fine here; only process 0's values are logged.
    """


@hookspec
def ssl_evaluate_end(model, data, prepare, metrics, step, logger):
    """Notify after each evaluation of `model` (the evaluated model: the EMA model when EMA is on).

    Collected; runs on every process; return nothing. data: the run's `SSLData` (streamed image files:
    `data.train_x[idx]` and `data.test_x[idx]` decode those rows on access); prepare(x): raw
    dataset rows (e.g. `data.test_x[i]`) -> model inputs, un-augmented and normalised as the
    evaluation feeds them (the run's memory format); metrics: the evaluation's dict (summed over
    processes), to which a plugin may add evaluation scalars `metrics["<plugin>/<name>"] = float`
    (logged as `eval/<key>`, written to metrics.jsonl and, from the last evaluation, to
    summary.json's `final_eval`); step: the number of finished steps; logger: the run's
    `RunLogger` for pictures (`logger.figure(tag, fig, step)`; a no-op on processes other than 0).
    """


@hookspec
def ssl_state_dict(state):
    """Save this plugin's state for checkpoints into `state["<plugin name>"]`.

    Modify hook. Set `state[self.name]` to a dict of tensors, numbers, strings, lists and dicts
    (checkpoints load with `weights_only=True`). Runs on every process; process 0's state is
    written, and on resume every process loads it. Plugins without state do not implement it.
    """


@hookspec
def ssl_load_state_dict(state):
    """Restore this plugin's state from a checkpoint's `state["<plugin name>"]`.

    Modify hook. Runs on resume, before the first step, on every process. The run must then
    continue exactly as the uninterrupted one (`TinyRun.assert_resumes_exactly` checks it).
    """
