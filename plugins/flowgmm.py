"""FlowGMM (Izmailov et al., ICML 2020; methods.md section 4): a normalizing flow with a Gaussian-mixture latent.

z = f(x) through an invertible flow; the latent density has one isotropic Gaussian per class with fixed means:
    log p(x, y=k) = log pi_k + log N(f(x); mu_k, sigma_k^2 I) + log|det J(x)|
    log p(x)      = logsumexp_k [log pi_k + log N(f(x); mu_k, sigma_k^2 I)] + log|det J(x)|
    p(y | x)      = softmax_k(log pi_k + log N(f(x); mu_k, sigma_k^2 I))      (Bayes' rule; logdet cancels)
The plugin owns the model (`model:` is ignored): its forward returns {"logits": log p(y|x) [N, C],
"log_px": log p(x) [N]}, so the core's prediction (argmax = Bayes' rule), evaluation, ECE and confusion work
unchanged. Losses, per row, in nats (no per-dimension normalisation, as the official code):
    labeled:   label_weight * (-log p(y|x)) - log p(x)   (= -log p(x, y) when label_weight = 1: the paper's
               objective; the image code uses label_weight = 3)
    "flowgmm/nll":         -log p(x) of each unlabeled row, weight `unlabeled_weight` (0: FlowGMM-Sup, labeled only),
               optionally ramped linearly over `unlabeled_rampup_steps` (an addition, not in the paper: with few
               labels the unlabeled likelihood alone fixes which cluster goes to which component early on)
    "flowgmm/consistency": -log p(x1 | y2) with y2 = argmax p(y | x2) from a no-grad forward of another view,
               weight `consistency_weight` times a linear ramp (FlowGMM-cons).
Deviation from the image code: it averages -log p(x) over the union of labeled and unlabeled rows; here labeled
and unlabeled rows are averaged separately (the tabular code's form). The constant D log 256 of dequantized images
is left out of the losses (it has no gradient) and added for bits per dimension only.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from ssltrain import ConfigError, LossTerm, SSLPlugin, Section, hookimpl, linear_rampup

from .flows import ImageRealNVP, VectorRealNVP, dequantize_logit, inverse_logit

PALETTE = torch.tensor([[0.12, 0.47, 0.71], [1.0, 0.5, 0.05], [0.17, 0.63, 0.17], [0.84, 0.15, 0.16],
                        [0.58, 0.4, 0.74], [0.55, 0.34, 0.29], [0.89, 0.47, 0.76], [0.5, 0.5, 0.5],
                        [0.74, 0.74, 0.13], [0.09, 0.75, 0.81]])


# ----------------------------------------------------------------------------- math
def isotropic_log_density(z: Tensor, means: Tensor, sigma: Tensor) -> Tensor:
    """log N(z_n; mu_k, sigma_k^2 I) in closed form, [N, C], for z [N, D], means [C, D], sigma [C] (> 0):
    -||z - mu_k||^2 / (2 sigma_k^2) - D log sigma_k - (D/2) log(2 pi). No D x D covariance is built."""
    dim = z.shape[1]
    sq = (z[:, None, :] - means[None]).pow(2).sum(-1)
    return -0.5 * sq / sigma.pow(2) - dim * torch.log(sigma) - 0.5 * dim * math.log(2 * math.pi)


def mixture_outputs(log_joint_z: Tensor, logdet: Tensor) -> tuple[Tensor, Tensor]:
    """From log pi_k + log N(z; mu_k, .) [N, C] and log|det J| [N]: (log p(y|x) [N, C], log p(x) [N])."""
    log_pz = torch.logsumexp(log_joint_z, dim=1)
    return log_joint_z - log_pz[:, None], log_pz + logdet


def joint_log_likelihood(log_posterior: Tensor, log_px: Tensor, y: Tensor) -> Tensor:
    """log p(x, y) = log p(y|x) + log p(x), per row [N]."""
    return log_posterior.gather(1, y[:, None])[:, 0] + log_px


def conditional_nll(log_posterior: Tensor, log_px: Tensor, target: Tensor, log_prior: Tensor) -> Tensor:
    """-log p(x | y=target) = -(log p(x, target) - log pi_target), per row [N] (FlowGMM-cons's NLL_comp)."""
    return -(joint_log_likelihood(log_posterior, log_px, target) - log_prior[target])


def consistency_target(log_posterior: Tensor) -> Tensor:
    """Hard target argmax_k p(k | x2): long, detached (a stop-gradient pseudo-label)."""
    return log_posterior.detach().argmax(dim=1)


def bits_per_dim(log_px: Tensor, dim: int, num_bins: int) -> Tensor:
    """(-log p(x) + D log num_bins) / (D ln 2): bits per dimension of 8-bit data dequantized to [0, 1)
    (num_bins = 256); num_bins = 1 gives the continuous density's bits per dimension."""
    return (-log_px + dim * math.log(num_bins)) / (dim * math.log(2))


def make_means(num_classes: int, dim: int, init: str, scale: float, generator: torch.Generator,
               direction: list[float] | None = None) -> Tensor:
    """Fixed class means [C, D]. "random": scale * N(0, I) (the official default, scale 1 for images);
    "opposite" (2 classes): +-mu with ||mu_0 - mu_1|| = scale along `direction` (normalised; [D] values,
    as the official 2-D toy's hand-placed means) or, when None, a random unit direction."""
    if init == "random":
        return scale * torch.randn(num_classes, dim, generator=generator)
    if direction is None:
        u = F.normalize(torch.randn(dim, generator=generator), dim=0)
    else:
        u = F.normalize(torch.tensor(direction, dtype=torch.float32), dim=0)
    return torch.stack([u, -u]) * (scale / 2)


# ----------------------------------------------------------------------------- model
class FlowGMMModel(nn.Module):
    """Flow + fixed Gaussian mixture. Images ([C, H, W] in [0, 1]) go through dequantization and the logit
    layer first; vectors go straight into the flow. The flow runs in float32 even under autocast."""

    def __init__(self, flow: nn.Module, means: Tensor, image: bool):
        super().__init__()
        self.flow, self.image = flow, image
        self.register_buffer("means", means)
        self.register_buffer("sigma", torch.ones(means.shape[0]))
        self.register_buffer("log_prior", torch.full((means.shape[0],), -math.log(means.shape[0])))
        self.dim = means.shape[1]
        self.num_bins = 256 if image else 1

    def latent(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """z = f(x) [N, D] and log|det dz/dx| [N] (the logit layer's logdet included)."""
        with torch.autocast(x.device.type, enabled=False):
            x = x.float()
            logdet = x.new_zeros(x.shape[0])
            if self.image:
                x, logdet = dequantize_logit(x)
            z, ld = self.flow(x)
            return z, logdet + ld

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        z, logdet = self.latent(x)
        log_joint_z = self.log_prior + isotropic_log_density(z, self.means, self.sigma)
        log_posterior, log_px = mixture_outputs(log_joint_z, logdet)
        return {"logits": log_posterior, "log_px": log_px}

    def sample(self, k: int, n: int, temperature: float = 1.0) -> Tensor:
        """n inputs drawn from class component k (latent std scaled by `temperature`)."""
        z = self.means[k] + temperature * self.sigma[k] * torch.randn(n, self.dim, device=self.means.device)
        x = self.flow.inverse(z)
        return inverse_logit(x) if self.image else x


# ----------------------------------------------------------------------------- pictures
def draw_points(img: Tensor, points: Tensor, lo: Tensor, hi: Tensor, color: Tensor, radius: int) -> None:
    """Paint square dots of `color` [3] at `points` [N, 2] (x right, y up, extent lo..hi) into img [3, S, S]."""
    size = img.shape[1]
    pix = ((points - lo) / (hi - lo) * (size - 1)).round().long()
    col, row = pix[:, 0], size - 1 - pix[:, 1]
    for dr in range(-radius, radius + 1):
        for dc in range(-radius, radius + 1):
            r, c = row + dr, col + dc
            ok = (r >= 0) & (r < size) & (c >= 0) & (c < size)
            img[:, r[ok], c[ok]] = color[:, None]


def extent(points: Tensor, margin: float = 0.1) -> tuple[Tensor, Tensor]:
    lo, hi = points.min(0).values, points.max(0).values
    pad = (hi - lo).clamp(min=1e-3) * margin
    return lo - pad, hi + pad


def scatter_image(background: Tensor, labeled: Tensor, labels: Tensor, unlabeled: Tensor,
                  lo: Tensor, hi: Tensor) -> Tensor:
    """Unlabeled points as small grey dots, labeled points as class-coloured dots with a black border."""
    img = background.clone()
    draw_points(img, unlabeled, lo, hi, torch.tensor([0.35, 0.35, 0.35]), 0)
    for k in labels.unique().tolist():
        pts = labeled[labels == k]
        draw_points(img, pts, lo, hi, torch.zeros(3), 3)
        draw_points(img, pts, lo, hi, PALETTE[k % len(PALETTE)], 2)
    return img


@torch.no_grad()
def class_regions_image(model: FlowGMMModel, lo: Tensor, hi: Tensor, size: int) -> Tensor:
    """[3, S, S]: each pixel of the 2-D input plane coloured by the posterior-weighted class colours (pale)."""
    ys, xs = torch.linspace(float(hi[1]), float(lo[1]), size), torch.linspace(float(lo[0]), float(hi[0]), size)
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1).view(-1, 2)
    post = model(grid.to(model.means.device))["logits"].exp().cpu()
    colors = post @ PALETTE[torch.arange(post.shape[1]) % len(PALETTE)]
    return (0.55 + 0.45 * colors).T.reshape(3, size, size)


# ----------------------------------------------------------------------------- plugin
class FlowGMM(SSLPlugin):
    """Owns the model (flow + latent GMM) and the supervised loss; adds "flowgmm/nll" and, when its weight
    is positive, "flowgmm/consistency". Logs bits per dimension and, after each evaluation, the test bpd
    and pictures (2-D: class regions and latent space; images: samples from each class component)."""

    incompatible = {"sla": "SLA widens/wraps the classifier head, but FlowGMM's classifier is the latent Gaussian "
                           "mixture of its flow (there is no linear head to widen)"}
    descriptions = {
        "flowgmm/nll": "unlabeled_weight * ramp * mean over the unlabeled rows of -log p(x), in nats.",
        "flowgmm/consistency": "consistency_weight * ramp * mean over the unlabeled rows of -log p(y = argmax of "
                               "view 2 | x), in nats.",
        "flowgmm/bpd": "Bits per dimension of the batch (training) or of eval_bpd_rows test rows (at evaluation); "
                       "lower is a better density.",
        "flowgmm/class_regions": "2-D data: the classes the flow's Gaussian mixture assigns over the input plane, "
                                 "labeled points in colour, unlabeled in grey.",
        "flowgmm/latent_space": "2-D data: the points in the flow's latent space with the fixed class means.",
        "flowgmm/class_samples": "Images: samples from each class's Gaussian (one row per class).",
    }

    class Config(Section):
        label_weight: float = Field(1.0, ge=0, description="w_lab on -log p(y|x) of labeled rows (1: paper; 3: image "
                                                           "code)")
        unlabeled_weight: float = Field(1.0, ge=0, description="Weight of -log p(x) of unlabeled rows; 0: labeled only")
        unlabeled_rampup_steps: int = Field(0, ge=0, description="Linear ramp of unlabeled_weight, in steps (not in "
                                                                 "the paper)")
        consistency_weight: float = Field(0.0, ge=0, description="FlowGMM-cons (1.0 in the image code); 0: off")
        consistency_rampup_steps: int = Field(0, ge=0, description="Linear ramp of the consistency weight, in steps")
        consistency_view: Literal["weak", "strong"] = Field("weak", description="The view x2 whose argmax is the "
                                                                                "target")
        means: Literal["random", "opposite"] = Field("random", description="Fixed class means, see make_means")
        mean_scale: float = Field(1.0, gt=0, description="Random: std of the means; opposite: distance between them")
        mean_direction: list[float] | None = Field(None, description="Opposite: the axis of +-mu ([D] values); None: "
                                                                     "random")
        couplings: int = Field(6, ge=1, description="Vectors: number of affine couplings")
        hidden: int = Field(256, ge=1, description="Vectors: width of the coupling MLPs")
        dropout: float = Field(0.0, ge=0, lt=1, description="Vectors: dropout in the coupling MLPs (0.5 in the "
                                                            "official code)")
        scales: int = Field(2, ge=1, description="Images: RealNVP scales")
        mid_channels: int = Field(32, ge=1, description="Images: channels of the conditioner ResNets (64/128 in the "
                                                        "paper)")
        res_blocks: int = Field(2, ge=1, description="Images: residual blocks per conditioner (8 in the paper)")
        sample_temperature: float = Field(0.7, gt=0, description="Images: latent std of the logged class samples")
        eval_bpd_rows: int = Field(2000, ge=1, description="Test rows used for the test bits per dimension")

    def __init__(self, config=None):
        super().__init__(config)
        self.uses_unlabeled = config.unlabeled_weight > 0 or config.consistency_weight > 0
        self.dim, self.num_bins = 0, 1

    @hookimpl
    def ssl_build_model(self, config, num_classes, input_shape):
        c = self.config
        image = len(input_shape) == 3
        if image and config.data.normalize:
            raise ConfigError("flowgmm models images in [0, 1] (dequantization + logit layer); "
                              "set data.normalize: false")
        if c.means == "opposite" and num_classes != 2:
            raise ConfigError(f"flowgmm.means: 'opposite' needs 2 classes, the data has {num_classes}; use 'random'")
        dim = math.prod(input_shape)
        if c.mean_direction is not None and (len(c.mean_direction) != dim or not any(c.mean_direction)):
            raise ConfigError(f"flowgmm.mean_direction: needs {dim} values, not all zero (the input dimension), "
                              f"got {c.mean_direction}")
        if image:
            try:
                flow = ImageRealNVP(tuple(input_shape), c.scales, c.mid_channels, c.res_blocks)
            except ValueError as exc:
                raise ConfigError(f"flowgmm: {exc} (lower flowgmm.scales)") from None
        else:
            flow = VectorRealNVP(math.prod(input_shape), c.couplings, c.hidden, c.dropout)
        means = make_means(num_classes, dim, c.means, c.mean_scale, torch.Generator().manual_seed(config.seed),
                           c.mean_direction)
        model = FlowGMMModel(flow, means, image)
        self.dim, self.num_bins = model.dim, model.num_bins
        return model

    @hookimpl
    def ssl_supervised_loss(self, outputs, batch):
        ce = F.cross_entropy(outputs.logits_l.float(), batch.y_l, reduction="none")
        return self.config.label_weight * ce - outputs.extras_l["log_px"].float()

    @hookimpl
    def ssl_modify_batch(self, batch, ctx):
        if self.config.consistency_weight > 0:
            batch.extras["flowgmm/view2"] = ctx.augment(batch.raw_u, self.config.consistency_view)

    @hookimpl
    def ssl_unlabeled_loss(self, outputs, batch, ctx, forward):
        c, terms = self.config, []
        if c.unlabeled_weight > 0:
            ramp = linear_rampup(ctx.step, c.unlabeled_rampup_steps)
            terms.append(LossTerm("flowgmm/nll", -outputs.extras_u["log_px"].float(), weight=c.unlabeled_weight * ramp))
        if c.consistency_weight > 0:
            with torch.no_grad():
                target = consistency_target(forward(batch.extras["flowgmm/view2"], update_bn=False)["logits"])
            log_prior = torch.full((ctx.num_classes,), -math.log(ctx.num_classes), device=target.device)
            nll = conditional_nll(outputs.logits_u.float(), outputs.extras_u["log_px"].float(), target, log_prior)
            ramp = linear_rampup(ctx.step, c.consistency_rampup_steps)
            terms.append(LossTerm("flowgmm/consistency", nll, weight=c.consistency_weight * ramp))
        return terms

    @hookimpl
    def ssl_metrics(self, result):
        out = result.loss.outputs
        log_px = torch.cat([out.extras_l["log_px"], out.extras_u["log_px"]]).detach().float()
        return {"flowgmm/bpd": bits_per_dim(log_px, self.dim, self.num_bins).mean()}

    @hookimpl
    def ssl_evaluate_end(self, model, data, metrics, step, logger):
        was_training = model.training
        model.eval()
        with torch.no_grad():
            x = data.test_x[:self.config.eval_bpd_rows]
            x = x.float() / 255 if x.dtype == torch.uint8 else x
            log_px = torch.cat([model(part)["log_px"] for part in x.split(256)])
            metrics["flowgmm/bpd"] = bits_per_dim(log_px, self.dim, self.num_bins).mean().item()
            if data.input_shape == (2,):
                self._log_2d(model, data, step, logger)
            elif model.image:
                self._log_samples(model, data, step, logger)
        model.train(was_training)

    def _log_2d(self, model, data, step, logger, size: int = 256):
        labeled = data.train_x[data.labeled_idx]
        labels = data.y_hidden[data.labeled_idx].cpu()
        unlabeled = data.train_x[data.unlabeled_idx[:2000]]
        pts = torch.cat([labeled, unlabeled]).cpu()
        lo, hi = extent(pts)
        regions = class_regions_image(model, lo, hi, size)
        logger.image("flowgmm/class_regions", scatter_image(regions, labeled.cpu(), labels, unlabeled.cpu(), lo, hi), step)
        z_l, z_u, means = model.latent(labeled)[0].cpu(), model.latent(unlabeled)[0].cpu(), model.means.cpu()
        lo, hi = extent(torch.cat([z_l, z_u, means]))
        img = scatter_image(torch.ones(3, size, size), z_l, labels, z_u, lo, hi)
        draw_points(img, means, lo, hi, torch.zeros(3), 5)
        for k in range(len(means)):
            draw_points(img, means[k:k + 1], lo, hi, PALETTE[k % len(PALETTE)], 3)
        logger.image("flowgmm/latent_space", img, step)

    def _log_samples(self, model, data, step, logger, per_class: int = 8):
        from torchvision.utils import make_grid
        samples = torch.cat([model.sample(k, per_class, self.config.sample_temperature)
                             for k in range(data.num_classes)])
        logger.image("flowgmm/class_samples", make_grid(samples.cpu(), nrow=per_class, pad_value=1.0), step)
