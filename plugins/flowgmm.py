"""FlowGMM (Izmailov et al., ICML 2020; methods.md section 4): a normalizing flow with a Gaussian-mixture latent.

z = f(x) through an invertible flow; the latent density has one isotropic Gaussian per class with fixed means:
    log p(x, y=k) = log pi_k + log N(f(x); mu_k, sigma_k^2 I) + log|det J(x)|
    log p(x)      = logsumexp_k [log pi_k + log N(f(x); mu_k, sigma_k^2 I)] + log|det J(x)|
    p(y | x)      = softmax_k(log pi_k + log N(f(x); mu_k, sigma_k^2 I))      (Bayes' rule; logdet cancels)
The plugin owns the model (`model:` is ignored): its forward returns {"logits": log p(y|x) [N, C],
"log_px": log p(x) [N]}, so the core's prediction (argmax = Bayes' rule), evaluation, ECE and confusion work
unchanged. Losses in nats (no per-dimension normalisation, as the official code).

The official image loss (izmailovpavel/flowgmm experiments/train_flows/train_semisup_cons.py:89-102, flow_loss.py:20-32):
    L = label_weight * CE(labeled rows) + mean_{all rows} NLL(x) + w_cons(epoch) * mean_{all rows} NLL(x1 | y2)
with NLL(x) = -log p(x), NLL(x1 | y2) = -log N(f(x1); mu_y2) - log|det J| and y2 = argmax p(y | x2) of a no-grad
forward of another view (:76-80), one mean over the labeled and unlabeled rows together (32 + 32: each set
carries half). `likelihood_mean: all_rows` (the default) is that form; `per_set` is the tabular code's
(train_semisup_flowgmm_tabular.py:65-73 at HEAD): label_weight * CE + mean_L NLL + unlabeled_weight * mean_U NLL.
In the core's convention (supervised loss = mean over labeled rows, each term = weight * mean over unlabeled
rows) with n_l labeled and n_u unlabeled rows and f_l = n_l / (n_l + n_u), f_u = n_u / (n_l + n_u)
(all_rows) or f_l = f_u = 1 (per_set), c = consistency_weight * ramp:
    supervised, per labeled row:  label_weight * CE + f_l * (NLL + c * NLL(x1 | y2))
    "flowgmm/nll":                NLL of each unlabeled row, weight unlabeled_weight * f_u
    "flowgmm/consistency":        NLL(x1 | y2) of each unlabeled row, weight c * f_u
which sums to the official loss exactly. unlabeled_weight 0 draws no unlabeled rows (FlowGMM-Sup: n_u = 0,
so 3 CE + NLL over the labeled rows, as train_sup.py:44-48 with its label weight 3). The consistency ramp is
the official min((epoch + 1) / R, 1) (train_semisup_cons.py:39-43, 363) in steps: min((step + 1) / R_steps, 1).
The constant D log 256 of dequantized images has no gradient: it is left out of the losses and added for
bits per dimension only.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from ssltrain import ConfigError, LossTerm, SSLPlugin, Section, all_reduce_mean, hookimpl, linear_rampup

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
    """Fixed class means [C, D]. "random": scale * N(0, I) (the official default, train_utils.py get_means,
    scale 1 for images); "balanced": scale * sqrt(D) * orthonormal random directions, the same pairwise
    distances as "random" (scale * sqrt(2D)) with equal norms, re-centred on the data by `FlowGMMModel`
    (`centre_means`) on the first training batch; "opposite" (2 classes): +-mu with ||mu_0 - mu_1|| = scale
    along `direction` (normalised; [D] values, as the official 2-D toy's hand-placed means) or, when None,
    a random unit direction."""
    if init == "random":
        return scale * torch.randn(num_classes, dim, generator=generator)
    if init == "balanced":
        if num_classes > dim:
            raise ValueError(f"'balanced' means need at most as many classes as dimensions ({num_classes} > {dim})")
        q = torch.linalg.qr(torch.randn(dim, num_classes, generator=generator))[0]
        return scale * math.sqrt(dim) * q.T
    if direction is None:
        u = F.normalize(torch.randn(dim, generator=generator), dim=0)
    else:
        u = F.normalize(torch.tensor(direction, dtype=torch.float32), dim=0)
    return torch.stack([u, -u]) * (scale / 2)


# ----------------------------------------------------------------------------- model
class FlowGMMModel(nn.Module):
    """Flow + fixed Gaussian mixture. Images ([C, H, W] in [0, 1]) go through dequantization and the logit
    layer first; vectors go straight into the flow. The flow runs in float32 even under autocast (the
    likelihood of D dimensions sums thousands of nats: bf16 would lose it).

    With `centre_on_data`, the first forward in training mode adds the mean latent of its batch (averaged over
    processes) to every class mean, once (a data-dependent initialisation, as Glow's ActNorm): the means then
    sit around the data instead of around 0, where the data's mean latent picks one favoured class."""

    def __init__(self, flow: nn.Module, means: Tensor, image: bool, centre_on_data: bool = False):
        super().__init__()
        self.flow, self.image = flow, image
        self.register_buffer("means", means)
        self.register_buffer("sigma", torch.ones(means.shape[0]))
        self.register_buffer("log_prior", torch.full((means.shape[0],), -math.log(means.shape[0])))
        self.register_buffer("means_centred", torch.tensor(not centre_on_data))
        self._check_centred = centre_on_data  # read the buffer (a host sync) only until it is True
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

    @torch.no_grad()
    def centre_means(self, z: Tensor) -> None:
        """Move the means by the mean of the latents z [N, D] (averaged over processes), once."""
        self.means += all_reduce_mean(z.detach().float().mean(0))
        self.means_centred.fill_(True)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        z, logdet = self.latent(x)
        if self.training and self._check_centred:
            if not self.means_centred:  # False until the first training batch (a checkpoint keeps it)
                self.centre_means(z)
            self._check_centred = False
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
        "flowgmm/nll": "The unlabeled rows' share of the -log p(x) mean, in nats: unlabeled_weight * n_u / (n_l + n_u) "
                       "* their mean (all_rows) or unlabeled_weight * their mean (per_set).",
        "flowgmm/consistency": "The unlabeled rows' share of consistency_weight * ramp * mean of -log p(x1 | y2), y2 "
                               "= argmax p(y | view 2), in nats (the labeled rows' share is in the supervised loss).",
        "flowgmm/bpd": "Bits per dimension of the batch (training) or of eval_bpd_rows test rows (at evaluation); "
                       "lower is a better density.",
        "flowgmm/class_regions": "2-D data: the classes the flow's Gaussian mixture assigns over the input plane, "
                                 "labeled points in colour, unlabeled in grey.",
        "flowgmm/latent_space": "2-D data: the points in the flow's latent space with the fixed class means.",
        "flowgmm/class_samples": "Images: samples from each class's Gaussian (one row per class).",
    }

    class Config(Section):
        label_weight: float = Field(3.0, ge=0, description="w_lab on the CE of labeled rows (3: image code; 1 with "
                                                           "per_set: the tabular code's -log p(x, y))")
        likelihood_mean: Literal["all_rows", "per_set"] = Field(
            "all_rows", description="all_rows: one -log p(x) mean over labeled + unlabeled rows (image code); per_set: "
                                    "separate means (tabular code); see the module docstring")
        unlabeled_weight: float = Field(1.0, ge=0, description="Weight of -log p(x) of unlabeled rows; 0: FlowGMM-Sup "
                                                               "(no unlabeled rows drawn)")
        consistency_weight: float = Field(1.0, ge=0, description="FlowGMM-cons, on all rows (the image code's default "
                                                                 "1); 0: plain FlowGMM")
        consistency_rampup_steps: int = Field(0, ge=0, description="Official linear ramp, in steps: R epochs x steps "
                                                                   "per epoch (the script's default, 1 epoch: none)")
        consistency_view: Literal["weak", "strong"] = Field("weak", description="The view x2 whose argmax is the "
                                                                                "target")
        means: Literal["random", "balanced", "opposite"] = Field(
            "balanced", description="Fixed class means, see make_means (balanced: centred on the first batch)")
        mean_scale: float = Field(1.0, gt=0, description="Random/balanced: std of the means; opposite: their distance")
        mean_direction: list[float] | None = Field(None, description="Opposite: the axis of +-mu ([D] values); None: "
                                                                     "random")
        couplings: int = Field(6, ge=1, description="Vectors: number of affine couplings")
        hidden: int = Field(256, ge=1, description="Vectors: width of the coupling MLPs")
        dropout: float = Field(0.0, ge=0, lt=1, description="Vectors: dropout in the coupling MLPs (0.5 in the "
                                                            "official code)")
        scales: int = Field(2, ge=1, description="Images: RealNVP scales")
        mid_channels: int = Field(64, ge=1, description="Images: conditioner width of the first 3 couplings, doubled "
                                                        "after (the paper's 64/128)")
        res_blocks: int = Field(8, ge=1, description="Images: residual blocks per conditioner (8 in the paper)")
        sample_temperature: float = Field(0.7, gt=0, description="Images: latent std of the logged class samples")
        eval_bpd_rows: int = Field(2000, ge=1, description="Test rows used for the test bits per dimension")

    def __init__(self, config=None):
        super().__init__(config)
        self.uses_unlabeled = config.unlabeled_weight > 0
        self.dim, self.num_bins = 0, 1

    @hookimpl
    def ssl_build_model(self, config, num_classes, input_shape):
        c = self.config
        image = len(input_shape) == 3
        if image and config.data.normalize:
            raise ConfigError("flowgmm models images in [0, 1] (dequantization + logit layer); "
                              "set data.normalize: false")
        if c.means == "opposite" and num_classes != 2:
            raise ConfigError(f"flowgmm.means: 'opposite' needs 2 classes, the data has {num_classes}; use 'balanced'")
        dim = math.prod(input_shape)
        if c.means == "balanced" and num_classes > dim:
            raise ConfigError(f"flowgmm.means: 'balanced' needs at most {dim} classes (the input dimension), "
                              f"the data has {num_classes}; use 'random'")
        if c.mean_direction is not None and (len(c.mean_direction) != dim or not any(c.mean_direction)):
            raise ConfigError(f"flowgmm.mean_direction: needs {dim} values, not all zero (the input dimension), "
                              f"got {c.mean_direction}")
        if image:
            try:
                flow = ImageRealNVP(tuple(input_shape), c.scales, c.mid_channels, c.res_blocks)
            except ValueError as exc:
                raise ConfigError(f"flowgmm: {exc} (lower flowgmm.scales)") from None
        else:
            flow = VectorRealNVP(dim, c.couplings, c.hidden, c.dropout)
        means = make_means(num_classes, dim, c.means, c.mean_scale, torch.Generator().manual_seed(config.seed),
                           c.mean_direction)
        model = FlowGMMModel(flow, means, image, centre_on_data=c.means == "balanced")
        self.dim, self.num_bins = model.dim, model.num_bins
        return model

    def row_shares(self, batch) -> tuple[float, float]:
        """(f_l, f_u): the labeled and unlabeled rows' shares of the likelihood terms (module docstring)."""
        if self.config.likelihood_mean == "per_set":
            return 1.0, 1.0
        n_l, n_u = batch.x_l.shape[0], batch.x_u.shape[0]
        return n_l / (n_l + n_u), n_u / (n_l + n_u)

    def consistency_nll(self, logits: Tensor, log_px: Tensor, view2: Tensor, forward) -> Tensor:
        """-log p(x1 | y2) per row, y2 = argmax p(y | x2) from a no-grad forward of the other view x2."""
        with torch.no_grad():
            target = consistency_target(forward(view2, update_bn=False)["logits"])
        log_prior = torch.full((logits.shape[1],), -math.log(logits.shape[1]), device=target.device)
        return conditional_nll(logits.float(), log_px.float(), target, log_prior)

    def consistency_ramp(self, step: int) -> float:
        return self.config.consistency_weight * linear_rampup(step + 1, self.config.consistency_rampup_steps)

    @hookimpl
    def ssl_modify_batch(self, batch, ctx):
        if self.config.consistency_weight > 0:
            view = self.config.consistency_view
            batch.extras["flowgmm/view2_l"] = ctx.augment(batch.raw_l, view)
            batch.extras["flowgmm/view2_u"] = ctx.augment(batch.raw_u, view)

    @hookimpl
    def ssl_supervised_loss(self, outputs, batch, ctx, forward):
        f_l, _ = self.row_shares(batch)
        log_px = outputs.extras_l["log_px"].float()
        loss = self.config.label_weight * F.cross_entropy(outputs.logits_l.float(), batch.y_l, reduction="none")
        loss = loss - f_l * log_px
        if self.config.consistency_weight > 0:
            nll = self.consistency_nll(outputs.logits_l, log_px, batch.extras["flowgmm/view2_l"], forward)
            loss = loss + f_l * self.consistency_ramp(ctx.step) * nll
        return loss

    @hookimpl
    def ssl_unlabeled_loss(self, outputs, batch, ctx, forward):
        c, terms = self.config, []
        if batch.x_u.shape[0] == 0:
            return terms
        _, f_u = self.row_shares(batch)
        log_px = outputs.extras_u["log_px"].float()
        if c.unlabeled_weight > 0:
            terms.append(LossTerm("flowgmm/nll", -log_px, weight=c.unlabeled_weight * f_u))
        if c.consistency_weight > 0:
            nll = self.consistency_nll(outputs.logits_u, log_px, batch.extras["flowgmm/view2_u"], forward)
            terms.append(LossTerm("flowgmm/consistency", nll, weight=self.consistency_ramp(ctx.step) * f_u))
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
