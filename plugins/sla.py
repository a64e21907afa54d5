"""SLA: self-supervised label augmentation (Lee, Hwang & Shin, ICML 2020; methods.md section 5).

Each class i is split into M joint classes (i, j), one per transformation t_j (t_0 = identity), and
one softmax over the N*M joint labels is trained on all M transformed copies of every labeled image.
Prediction reads the identity slot of the identity copy (SI), averages the class logits over the M
copies (AG), or uses a separate N-way head trained to imitate AG (SD, self-distillation).

Layout (as in the official code): copy j of image b is row b*M + j, joint label idx(i, j) = i*M + j.

The unlabeled extension (`unlabeled: true`, methods.md 5h) is a PROJECT DESIGN, NOT part of the
paper (which has no semi-supervised experiments): on unlabeled images it trains the transformation
index marginalised from the joint head, L_rot(u) = -(1/M) sum_j log p(j | t_j(u)), and with `sd: true`
the label-free distillation term T^2 KL(softmax(sg(AG(u))/T) || softmax(v(u)/T)).
"""
from __future__ import annotations

from typing import Callable, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from ssltrain import ConfigError, LossTerm, Section, SSLPlugin, hookimpl

Transform = Callable[[Tensor], Tensor]

# Colour permutations in the order of the official `augmentations.py` (copy 0 is the identity).
_PERM6 = ((0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0))
_PERM3 = ((0, 1, 2), (1, 2, 0), (2, 0, 1))


def _rotate(k: int, perm: tuple[int, ...] | None = None) -> Transform:
    """x [B, C, H, W] -> rotated by k*90 degrees in the (H, W) plane, then channels permuted."""
    def t(x: Tensor) -> Tensor:
        x = torch.rot90(x, k, (2, 3))
        return x if perm is None else x[:, list(perm)]
    return t


#: name -> the M transformations, in joint-index order j = 0..M-1 (rotation-major for the products).
TRANSFORMS: dict[str, list[Transform]] = {
    "rotation": [_rotate(k) for k in range(4)],
    "rotation2": [_rotate(k) for k in (0, 2)],
    "color_perm": [_rotate(0, p) for p in _PERM6],
    "color_perm3": [_rotate(0, p) for p in _PERM3],
    "rot_color_perm6": [_rotate(k, p) for k in (0, 2) for p in _PERM3],
    "rot_color_perm12": [_rotate(k, p) for k in range(4) for p in _PERM3],
    "rot_color_perm24": [_rotate(k, p) for k in range(4) for p in _PERM6],
}


# --- the math: pure functions -------------------------------------------------------------------

def transform_copies(x: Tensor, transforms: list[Transform]) -> Tensor:
    """[B, ...] -> [B*M, ...]: copy j of row b at row b*M + j."""
    return torch.stack([t(x) for t in transforms], 1).flatten(0, 1)


def joint_labels(y: Tensor, m: int) -> Tensor:
    """Int labels [B] -> joint labels [B*M] in the copy layout: row b*M + j holds y_b*M + j."""
    return (y[:, None] * m + torch.arange(m, device=y.device)).flatten()


def single_logits(joint_logits: Tensor, m: int) -> Tensor:
    """SI: [B*M, N*M] (copy layout) -> [B, N], the identity slot of the identity copy: [0::M, 0::M]."""
    return joint_logits[0::m, 0::m]


def aggregated_logits(joint_logits: Tensor, m: int) -> Tensor:
    """AG: [B*M, N*M] (copy layout) -> [B, N], s_i = (1/M) sum_j logits[b*M + j, i*M + j].

    Averages logits, not probabilities (equal to (1/M) sum_j logits[j::M, j::M]).
    """
    b, nm = joint_logits.shape[0] // m, joint_logits.shape[1]
    return joint_logits.view(b, m, nm // m, m).diagonal(dim1=1, dim2=3).mean(-1)


def distillation_kl(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """Per row T^2 KL(softmax(sg(teacher)/T) || softmax(student/T)), shape [B]; no gradient to teacher."""
    t = temperature
    log_q = (student.float() / t).log_softmax(-1)
    log_p = (teacher.detach().float() / t).log_softmax(-1)
    return t * t * (log_p.exp() * (log_p - log_q)).sum(-1)


def transformation_nll(joint_logits: Tensor, m: int) -> Tensor:
    """5h (project design): -log p(j | t_j(u)) per copy, [B*M, N*M] (copy layout) -> [B, M].

    log p(j | x) = logsumexp_i logits[i*M + j] - logsumexp over all N*M joint logits.
    """
    b, nm = joint_logits.shape[0] // m, joint_logits.shape[1]
    log_joint = joint_logits.float().log_softmax(-1).view(b, m, nm // m, m)
    log_slot = log_joint.logsumexp(2)  # [B, M copies, M slots]
    return -log_slot.diagonal(dim1=1, dim2=2)


# --- the model ----------------------------------------------------------------------------------

class SLAModel(nn.Module):
    """A backbone with the joint head Linear(d, N*M) and, for SLA+SD, the N-way head Linear(d, N).

    forward(x) -> {"logits": joint logits [n, N*M]} (+ "sd_logits": [n, N] with the SD head).
    """

    def __init__(self, backbone: nn.Module, num_classes: int, m: int, sd: bool):
        super().__init__()
        head = getattr(backbone, "head", None)
        if not isinstance(head, nn.Linear) or not hasattr(backbone, "features"):
            raise ConfigError(f"sla needs a backbone with `features(x)` and an nn.Linear `head` to widen to "
                              f"num_classes*M outputs; got head {type(head).__name__} from "
                              f"{type(backbone).__name__} (a plugin that owns the model may have replaced it)")
        d = head.in_features
        backbone.head = nn.Identity()  # the backbone's own N-way head is unused: drop its parameters
        self.backbone, self.num_classes, self.m = backbone, num_classes, m
        self.head = nn.Linear(d, num_classes * m)
        self.sd_head = nn.Linear(d, num_classes) if sd else None

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        z = self.backbone.features(x)
        out = {"logits": self.head(z)}
        if self.sd_head is not None:
            out["sd_logits"] = self.sd_head(z)
        return out


def predict_scores(model: nn.Module, x: Tensor, mode: str, transforms: list[Transform]) -> Tensor:
    """Class scores [n, N] of an SLAModel for inputs x [n, ...]: mode "si", "ag" or "sd".

    AG in eval mode forwards the M copies of about n/M images at a time, so no forward is larger than
    SI's (same peak memory; on a CPU, one forward of 4n rows ran 1.8x slower per row than forwards of
    n rows). In train mode (batch-norm batch statistics) all n*M rows go through one forward."""
    m = len(transforms)
    if mode == "ag":
        chunk = len(x) if model.training else max(1, -(-len(x) // m))
        return torch.cat([aggregated_logits(model(transform_copies(part, transforms))["logits"], m)
                          for part in x.split(chunk)])
    out = model(x)
    return out["sd_logits"] if mode == "sd" else out["logits"][:, 0::m]


@torch.no_grad()
def mode_accuracies(model: nn.Module, x: Tensor, y: Tensor, transforms: list[Transform], batch_size: int,
                    prepare: Callable[[Tensor], Tensor] = lambda x: x) -> dict[str, float]:
    """Top-1 (%) of SI, AG (and SD with an SD head) from one forward over the M copies of each batch
    of `prepare(x)`. The model is evaluated in eval mode and left in the mode it had."""
    m, correct, was_training = len(transforms), {}, model.training
    model.eval()
    for lo in range(0, len(x), batch_size):
        out = model(transform_copies(prepare(x[lo:lo + batch_size]), transforms))
        target = y[lo:lo + batch_size]
        scores = {"si": single_logits(out["logits"], m), "ag": aggregated_logits(out["logits"], m)}
        if "sd_logits" in out:
            scores["sd"] = out["sd_logits"][0::m]
        for mode, s in scores.items():
            correct[mode] = correct.get(mode, 0) + (s.argmax(-1) == target).sum()
    model.train(was_training)
    return {mode: 100.0 * float(c) / max(len(x), 1) for mode, c in correct.items()}


# --- the plugin ---------------------------------------------------------------------------------

class SLA(SSLPlugin):
    """Joint (class, transformation) labels on the labeled batch; SI/AG/SD prediction.

    Loss: the core's supervised cross-entropy on the joint labels is L_SLA. With `sd`, the terms
    "sla/sd_ce" (beta * CE of the SD head on the identity copies) and "sla/sd_kl" (T^2 KL to the
    detached AG logits) are added as unweighted per-labeled-row terms. With `unlabeled` (methods.md
    5h, a project design, not in the paper): "sla/rot" and, with `sd`, "sla/sd_unlabeled".

    The SD terms are `weighted=False` terms of `ssl_unlabeled_loss` rather than an owned
    `ssl_supervised_loss`: SLA claims no one-owner hook for them and each term is logged on its own.
    Consequence: `closure(labeled_only=True)` (e.g. a bi-level step's outer loss) sees L_SLA only.
    `uses_unlabeled` keeps supervised SLA from drawing unlabeled rows.
    """

    incompatible = {
        "mixmatch": "MixMatch guesses and mixes N-class soft targets for labeled and unlabeled rows, but SLA's "
                    "labeled targets are N*M joint labels over M transformed copies and its head has N*M outputs",
        "flowgmm": "FlowGMM owns the model (a flow with a latent GMM classifier, no nn.Linear head) and its "
                   "class log-posteriors, so there is no linear head for SLA to widen to N*M joint classes",
    }
    descriptions = {
        "sla/sd_ce": "sd_ce_weight * cross-entropy of the SD head on the labeled identity copies.",
        "sla/sd_kl": "T^2 * KL between the SD head and the detached aggregated (AG) prediction, labeled rows.",
        "sla/rot": "rot_weight * mean over the unlabeled rows of the transformation-prediction NLL (unlabeled: true).",
        "sla/sd_unlabeled": "sd_unlabeled_weight * the self-distillation KL on the unlabeled rows.",
        "sla/top1_si": "Test top-1 in % predicting from the identity slot of the joint head.",
        "sla/top1_ag": "Test top-1 in % aggregating the joint head over the M transformations.",
        "sla/top1_sd": "Test top-1 in % of the self-distilled N-way head.",
    }

    class Config(Section):
        transform: Literal[tuple(TRANSFORMS)] = Field("rotation", description="The M transformations (official names)")
        predict: Literal["si", "ag", "sd"] = Field("ag", description="Inference: identity slot, aggregation, or SD "
                                                                     "head")
        sd: bool = Field(False, description="SLA+SD: add the N-way head and the self-distillation terms")
        temperature: float = Field(1.0, gt=0, description="T of the distillation KL")
        sd_ce_weight: float = Field(1.0, ge=0, description="Beta: CE of the SD head on labeled identity copies")
        unlabeled: bool = Field(False, description="5h extension (project design, not in the paper): draws unlabeled "
                                                   "data")
        rot_weight: float = Field(1.0, ge=0, description="Lambda_rot (untuned project choice)")
        sd_unlabeled_weight: float = Field(1.0, ge=0, description="Lambda_sd, needs sd (untuned project choice)")
        log_all_modes: bool = Field(True, description="At each evaluation add sla/top1_{si,ag,sd} to the metrics "
                                                      "(costs M forwards)")

    @property
    def transforms(self) -> list[Transform]:
        return TRANSFORMS[self.config.transform]

    @property
    def uses_unlabeled(self) -> bool:
        """Only the 5h extension needs unlabeled rows; supervised SLA draws none."""
        return self.config.unlabeled

    @hookimpl
    def ssl_configure(self):
        if self.config.predict == "sd" and not self.config.sd:
            raise ConfigError("sla.predict=sd needs the self-distillation head: set sla.sd=true")

    @hookimpl(wrapper=True)
    def ssl_build_model(self, num_classes, input_shape):
        backbone = yield
        if len(input_shape) != 3:
            raise ConfigError(f"sla transforms images [C, H, W]; got input shape {tuple(input_shape)}")
        try:
            transform_copies(torch.zeros(1, *input_shape), self.transforms)
        except (RuntimeError, IndexError):
            raise ConfigError(f"sla.transform={self.config.transform} does not fit images of shape "
                              f"{tuple(input_shape)}: 90-degree rotations need square images (rotation2 does "
                              f"not), colour permutations need 3 channels") from None
        return SLAModel(backbone, num_classes, len(self.transforms), self.config.sd)

    @hookimpl
    def ssl_modify_batch(self, batch):
        if batch.y_l.dim() != 1 or batch.y_l.is_floating_point():
            raise ConfigError("sla needs integer labels for the labeled rows; a plugin before it in `plugins:` "
                              "set soft targets, which have no joint (class, transformation) form")
        m = len(self.transforms)
        batch.x_l = transform_copies(batch.x_l, self.transforms)
        batch.y_l = joint_labels(batch.y_l, m)
        batch.idx_l = batch.idx_l.repeat_interleave(m)  # stays row-aligned with x_l

    @hookimpl
    def ssl_unlabeled_loss(self, outputs, batch, forward):
        cfg, m, terms = self.config, len(self.transforms), []
        if cfg.sd:
            student = outputs.extras_l["sd_logits"][0::m]
            terms += [LossTerm("sla/sd_ce", F.cross_entropy(student.float(), batch.y_l[0::m] // m, reduction="none"),
                               weight=cfg.sd_ce_weight, weighted=False),
                      LossTerm("sla/sd_kl", distillation_kl(student, aggregated_logits(outputs.logits_l, m),
                                                            cfg.temperature), weighted=False)]
        if cfg.unlabeled and batch.x_u.shape[0] > 0:
            b_u = batch.x_u.shape[0]
            others = transform_copies(batch.x_u, self.transforms).view(b_u, m, *batch.x_u.shape[1:])[:, 1:]
            logits = forward(others.flatten(0, 1), update_bn=False)["logits"]
            joint = torch.cat([outputs.logits_u[:, None], logits.view(b_u, m - 1, -1)], 1).flatten(0, 1)
            terms.append(LossTerm("sla/rot", transformation_nll(joint, m), weight=cfg.rot_weight))
            if cfg.sd:
                terms.append(LossTerm("sla/sd_unlabeled", distillation_kl(
                    outputs.extras_u["sd_logits"], aggregated_logits(joint, m), cfg.temperature),
                    weight=cfg.sd_unlabeled_weight))
        return terms

    @hookimpl
    def ssl_predict(self, model, x):
        return predict_scores(model, x, self.config.predict, self.transforms)

    @hookimpl
    def ssl_evaluate_end(self, model, data, prepare, metrics):
        if not self.config.log_all_modes:
            return
        accs = mode_accuracies(model, data.test_x, data.test_y, self.transforms, 256, prepare)
        metrics.update({f"sla/top1_{mode}": v for mode, v in accs.items()})
