"""First-stage (autoencoder) losses and the two-optimizer train step.

The losses are CompVis ``ldm.modules.losses.contperceptual.LPIPSWithDiscriminator``
(KL autoencoders) and taming ``vqperceptual.VQLPIPSWithDiscriminator`` (VQ ones),
Rombach et al. 2022 Sec. 3.1 / Appendix G, Esser et al. 2021 ("Taming", Eq. 5-7):

    rec   = |x - x_rec| + perceptual_weight * LPIPS(x, x_rec)        (per element)
    KL:  nll = sum(rec / exp(logvar) + logvar) / B,  logvar a scalar (logvar_init; trained
         only with learn_logvar, as the originals: CompVis AutoencoderKL never optimises it)
         L_AE = nll + kl_weight * KL(q(z|x) || N(0, I)) + lambda * disc_factor * L_G
    VQ:  nll = mean(rec),  rec with |x - x_rec| or (x - x_rec)^2 (CompVis pixel_loss "l2")
         L_AE = nll + codebook_weight * L_codebook + lambda * disc_factor * L_G
    L_G = -mean(D(x_rec))
    lambda = clamp(||grad_w nll|| / (||grad_w L_G|| + 1e-4), 0, 1e4) * disc_weight   (Taming Eq. 7)
    L_D = disc_factor * (hinge or vanilla)(D(x), D(sg(x_rec)))

with ``w`` the weights of the decoder's last layer (``decoder/conv_out/kernel``) and
``disc_factor = 0`` before ``disc_start`` (``adopt_weight``). KL: lambda = 0 when the
``disc_factor`` option is 0 (CompVis); VQ computes it regardless (taming / CompVis VQ).
With per-element ``weights`` (CompVis ``LPIPSWithDiscriminator.forward(weights=)``, KL only)
L_AE uses sum(weights * nll_elem) / B while lambda and the logged nll stay unweighted.

How lambda is computed here: the reconstruction is ``x_rec = conv_out(h)``, so the
gradient of any loss of ``x_rec`` with respect to ``w`` is the conv's weight-VJP of the
loss's cotangent on ``x_rec``. The step runs the autoencoder once under ``jax.vjp``
(capturing ``h`` with ``nn.intercept_methods``), gets the cotangents of ``nll`` and
``L_G`` on ``x_rec`` (backprop through LPIPS and D only), maps each through the conv's
weight-VJP to get the two last-layer gradients, forms lambda, and backpropagates the
combined cotangent through the autoencoder once. ``direct_generator_loss`` computes the
same thing the obvious way (jax.grad of each loss w.r.t. the kernel), for tests.

Deviation from the PyTorch Lightning loop: Lightning runs ``training_step`` twice per
batch (optimizer 0 then 1), so its discriminator sees reconstructions of the already
updated autoencoder (a second forward, with a fresh posterior sample); here both
updates use the one forward of the step (pre-update autoencoder, same sample).
Before ``disc_start`` the discriminator's parameters and optimizer state are left
unchanged (Lightning steps Adam with zero gradients, which leaves Adam's parameters
unchanged too, only its step count advances).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Optional, Tuple

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from ldm_jax.models.discriminator import DiscriminatorConfig, NLayerDiscriminator, actnorm_data_init
from ldm_jax.models.lpips import LPIPS
from ldm_jax.models.quantizer import codebook_perplexity
from ldm_jax.training import optim
from ldm_jax.training import sharding as shd
from ldm_jax.training.image_range import images_to_float

KINDS = ("kl", "vq")
DISC_LOSSES = ("hinge", "vanilla")
PIXEL_LOSSES = ("l1", "l2")
LAST_LAYER = ("decoder", "conv_out")  # module path of the decoder's last layer (Taming Eq. 7's w)


@dataclasses.dataclass(frozen=True)
class FirstStageLossConfig:
    """CompVis LPIPSWithDiscriminator / taming VQLPIPSWithDiscriminator hyperparameters."""

    kind: str = "kl"                # "kl" (LPIPSWithDiscriminator) or "vq" (VQLPIPSWithDiscriminator)
    disc_start: int = 50001         # step from which the GAN terms are on (adopt_weight threshold)
    disc_factor: float = 1.0        # GAN factor once on (0 disables the GAN entirely)
    disc_weight: float = 1.0        # multiplies the adaptive weight lambda (CompVis disc_weight)
    disc_loss: str = "hinge"        # discriminator loss: "hinge" or "vanilla" (softplus)
    kl_weight: float = 1e-6         # KL: weight of KL(q(z|x) || N(0, I))
    perceptual_weight: float = 1.0  # LPIPS weight inside the reconstruction term; 0 = pure L1
    codebook_weight: float = 1.0    # VQ: weight of the codebook + commitment loss
    logvar_init: float = 0.0        # KL: initial (and, without learn_logvar, fixed) output log-variance
    learn_logvar: bool = False      # KL: train logvar too (sdkit AutoencoderKL learn_logvar; CompVis never does)
    pixel_loss: str = "l1"          # VQ: "l1" or "l2" pixel term (CompVis vqperceptual pixel_loss); KL: "l1" only
    pixelloss_weight: float = 1.0   # accepted for the originals' YAMLs; unused there too (stored, never read)
    perceptual_loss: str = "lpips"  # only "lpips" (CompVis VQ refuses its "clips" / "dists" too)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"FirstStageLossConfig.kind must be one of {KINDS}, got {self.kind!r}")
        if self.disc_loss not in DISC_LOSSES:
            raise ValueError(f"FirstStageLossConfig.disc_loss must be one of {DISC_LOSSES}, got {self.disc_loss!r}")
        for name in ("disc_factor", "disc_weight", "kl_weight", "perceptual_weight", "codebook_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"FirstStageLossConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.pixel_loss not in PIXEL_LOSSES:
            raise ValueError(f"FirstStageLossConfig.pixel_loss must be one of {PIXEL_LOSSES}, got {self.pixel_loss!r}")
        if self.kind == "kl" and self.pixel_loss != "l1":
            # CompVis LPIPSWithDiscriminator has no pixel_loss option (always |x - x_rec|).
            raise ValueError(f"FirstStageLossConfig.pixel_loss={self.pixel_loss!r}: the KL loss (CompVis "
                             "LPIPSWithDiscriminator) only has the L1 pixel term; pixel_loss is a VQ option")
        if self.perceptual_loss != "lpips":
            raise ValueError(f"FirstStageLossConfig.perceptual_loss={self.perceptual_loss!r}: only 'lpips' is "
                             "implemented (CompVis VQLPIPSWithDiscriminator raises for 'clips' / 'dists' too)")
        if self.learn_logvar and self.kind != "kl":
            raise ValueError("FirstStageLossConfig.learn_logvar: the VQ loss has no logvar (KL only)")

    @classmethod
    def from_mapping(cls, values, kind: str) -> "FirstStageLossConfig":
        """The loss fields of a ``config.loss`` mapping (the discriminator / LPIPS keys are
        read by ``discriminator_config`` and the task; ``check_loss_keys`` refuses the rest)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{**{k: v for k, v in dict(values).items() if k in names and v is not None}, "kind": kind})


# config.loss keys read elsewhere: the discriminator (discriminator_config) and the LPIPS weights (task).
DISC_KEYS = ("disc_ndf", "disc_num_layers", "disc_norm", "disc_norm_groups", "disc_in_channels", "use_actnorm",
             "disc_conditional")
OTHER_KEYS = ("lpips_weights", "n_classes")  # n_classes: CompVis VQ stores it, uses it nowhere (logging commented out)


def check_loss_keys(values, where: str = "config.loss") -> None:
    """Refuse keys no part of the first-stage loss reads, so that an option of the original
    losses (or a typo) cannot train silently with a different objective."""
    known = {f.name for f in dataclasses.fields(FirstStageLossConfig)} - {"kind"}
    known |= set(DISC_KEYS) | set(OTHER_KEYS)
    unknown = sorted(k for k in dict(values) if k not in known)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; the first-stage loss reads {sorted(known)}")


def discriminator_config(values, image_channels: int, where: str = "config.loss") -> DiscriminatorConfig:
    """The PatchGAN's ``DiscriminatorConfig`` from the ``config.loss`` keys (disc_ndf,
    disc_num_layers, disc_norm, disc_norm_groups, and the originals' disc_in_channels,
    use_actnorm, disc_conditional) for images with ``image_channels`` channels."""
    values = {k: v for k, v in dict(values).items() if v is not None}
    in_channels = int(values.get("disc_in_channels", image_channels))
    if in_channels != image_channels:
        # The originals feed the discriminator the images themselves (no cond: see below),
        # so any other width fails in its first conv.
        raise ValueError(f"{where}.disc_in_channels={in_channels} but the images have {image_channels} channels "
                         "(the discriminator sees the images and reconstructions)")
    if values.get("disc_conditional", False):
        # LPIPSWithDiscriminator / VQLPIPSWithDiscriminator assert `not disc_conditional` when
        # no cond is passed, and AutoencoderKL / VQModel.training_step never pass one.
        raise ValueError(f"{where}.disc_conditional=True: the originals' autoencoders never pass a "
                         "condition to the discriminator (their loss asserts), so it is not supported")
    norm = values.get("disc_norm", "group")
    if "use_actnorm" in values and not values["use_actnorm"] and norm == "actnorm":
        raise ValueError(f"{where}.use_actnorm=False conflicts with {where}.disc_norm='actnorm'")
    if values.get("use_actnorm", False):
        # taming use_actnorm=True: ActNorm instead of BatchNorm ("group" is this library's
        # default stand-in for taming's BatchNorm, so it yields; "batch"/"none" conflict).
        if norm not in ("group", "actnorm"):
            raise ValueError(f"{where}.use_actnorm=True conflicts with {where}.disc_norm={norm!r} "
                             "(use_actnorm means disc_norm='actnorm')")
        norm = "actnorm"
    return DiscriminatorConfig(in_channels=in_channels, ndf=int(values.get("disc_ndf", 64)),
                               n_layers=int(values.get("disc_num_layers", 3)), norm=norm,
                               norm_groups=int(values.get("disc_norm_groups", 32)))


# ----------------------------------------------------------------------------- pieces

LPIPS_CHANNELS = (1, 3)  # image widths taming's LPIPS takes


def lpips_per_image(lpips: LPIPS, lpips_params, x_bhwc, x_rec_bhwc) -> jax.Array:
    """LPIPS (B,) of RGB or grey images: taming's LPIPS ScalingLayer computes (x - shift) / scale
    with a (1, 3, 1, 1) shift, which broadcasts a grey (B, 1, H, W) image to 3 identical channels."""
    if x_bhwc.shape[-1] == 1:
        x_bhwc = jnp.broadcast_to(x_bhwc, x_bhwc.shape[:-1] + (3,))
        x_rec_bhwc = jnp.broadcast_to(x_rec_bhwc, x_rec_bhwc.shape[:-1] + (3,))
    return lpips.apply({"params": lpips_params}, x_bhwc, x_rec_bhwc)



def adopt_weight(weight: float, step: jax.Array, threshold: int, value: float = 0.0) -> jax.Array:
    """taming adopt_weight: ``value`` before ``threshold`` steps, ``weight`` from then on."""
    return jnp.where(jnp.asarray(step) < threshold, jnp.float32(value), jnp.float32(weight))


def hinge_d_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
    """0.5 (E[relu(1 - D(x))] + E[relu(1 + D(x_rec))]) (Lim & Ye 2017; taming)."""
    return 0.5 * (jnp.mean(jax.nn.relu(1.0 - logits_real)) + jnp.mean(jax.nn.relu(1.0 + logits_fake)))


def vanilla_d_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
    """0.5 (E[softplus(-D(x))] + E[softplus(D(x_rec))]): the non-saturating GAN (Goodfellow 2014)."""
    return 0.5 * (jnp.mean(jax.nn.softplus(-logits_real)) + jnp.mean(jax.nn.softplus(logits_fake)))


def adaptive_weight(nll_grad: jax.Array, g_grad: jax.Array, disc_weight: float) -> jax.Array:
    """Taming Eq. 7: clamp(||grad nll|| / (||grad L_G|| + 1e-4), 0, 1e4) * disc_weight, no gradient."""
    ratio = jnp.linalg.norm(nll_grad.astype(jnp.float32).ravel()) / (
        jnp.linalg.norm(g_grad.astype(jnp.float32).ravel()) + 1e-4)
    return jax.lax.stop_gradient(jnp.clip(ratio, 0.0, 1e4) * disc_weight)


class FirstStageLoss:
    """The loss terms for one configuration (modules static, parameters passed in)."""

    def __init__(self, cfg: FirstStageLossConfig, discriminator: NLayerDiscriminator,
                 lpips: Optional[LPIPS] = None):
        if cfg.perceptual_weight > 0 and lpips is None:
            raise ValueError("FirstStageLoss: perceptual_weight > 0 needs an LPIPS module")
        self.cfg = cfg
        self.discriminator = discriminator
        self.lpips = lpips
        self.d_loss_fn = hinge_d_loss if cfg.disc_loss == "hinge" else vanilla_d_loss

    def perceptual(self, lpips_params, x_bhwc, x_rec_bhwc) -> jax.Array:
        """LPIPS per example (B,); zeros when the perceptual term is off."""
        if self.cfg.perceptual_weight <= 0:
            return jnp.zeros((x_bhwc.shape[0],), jnp.float32)
        if x_bhwc.shape[-1] not in LPIPS_CHANNELS:
            raise ValueError(f"FirstStageLoss: perceptual_weight={self.cfg.perceptual_weight} needs 1- or 3-channel "
                             f"images for LPIPS (VGG16), got {x_bhwc.shape[-1]} channels; set perceptual_weight=0")
        return lpips_per_image(self.lpips, lpips_params, x_bhwc, x_rec_bhwc)

    def nll(self, x_bhwc, x_rec_bhwc, logvar, lpips_params,
            weights=None) -> Tuple[jax.Array, Dict[str, jax.Array]]:
        """The reconstruction term (KL: Laplace-like NLL with the scalar logvar summed per
        example; VQ: mean) and its logs. With ``weights`` (KL only, broadcastable to the
        images, NHWC) the returned term is CompVis' weighted_nll_loss; ``logs["nll_loss"]``
        stays the unweighted one, as in CompVis."""
        x_rec = x_rec_bhwc.astype(jnp.float32)
        diff = x_bhwc.astype(jnp.float32) - x_rec
        pix = jnp.square(diff) if self.cfg.pixel_loss == "l2" else jnp.abs(diff)
        p_b = self.perceptual(lpips_params, x_bhwc, x_rec)
        rec = pix + self.cfg.perceptual_weight * p_b[:, None, None, None]
        logs = {"l1": jnp.mean(jnp.abs(diff)), "p_loss": jnp.mean(p_b), "rec_loss": jnp.mean(rec)}
        if self.cfg.kind == "kl":
            lv = logvar.astype(jnp.float32)
            elem = rec / jnp.exp(lv) + lv
            nll = jnp.sum(elem) / x_bhwc.shape[0]
            logs["logvar"] = lv
            logs["nll_loss"] = nll
            if weights is not None:
                nll = jnp.sum(jnp.asarray(weights, jnp.float32) * elem) / x_bhwc.shape[0]
                logs["weighted_nll_loss"] = nll
        else:
            if weights is not None:
                raise ValueError("FirstStageLoss: weights are a KL-loss option (VQLPIPSWithDiscriminator has none)")
            nll = jnp.mean(rec)
            logs["nll_loss"] = nll
        return nll, logs

    def logits(self, disc_params, x_bhwc) -> jax.Array:
        return self.discriminator.apply({"params": disc_params}, x_bhwc)

    def g_loss(self, disc_params, x_rec_bhwc) -> jax.Array:
        """L_G = -mean(D(x_rec))."""
        return -jnp.mean(self.logits(disc_params, x_rec_bhwc))

    def d_loss(self, disc_params, x_bhwc, x_rec_bhwc, step) -> Tuple[jax.Array, Dict[str, jax.Array]]:
        """L_D on real images and (stopped) reconstructions, times disc_factor(step)."""
        logits_real = self.logits(disc_params, jax.lax.stop_gradient(x_bhwc))
        logits_fake = self.logits(disc_params, jax.lax.stop_gradient(x_rec_bhwc))
        factor = adopt_weight(self.cfg.disc_factor, step, self.cfg.disc_start)
        loss = factor * self.d_loss_fn(logits_real, logits_fake)
        return loss, {"disc_loss": loss, "logits_real": jnp.mean(logits_real),
                      "logits_fake": jnp.mean(logits_fake)}

    @property
    def reg_weight(self) -> float:
        """Weight of the model's regulariser (KL or codebook loss) in L_AE."""
        return self.cfg.kl_weight if self.cfg.kind == "kl" else self.cfg.codebook_weight


# ----------------------------------------------------------------------------- generator side


def _ae_forward(ae: nn.Module, x_bhwc, rng, sample_posterior: bool, capture: dict):
    """Returns a function params -> ((x_rec, reg), aux) for jax.vjp, capturing the input
    of the decoder's last layer (and that layer, unbound) on the way."""
    def forward(ae_params):
        seen = {}

        def interceptor(next_fun, args, kwargs, context):
            if context.method_name == "__call__" and tuple(context.module.path) == LAST_LAYER:
                seen["h"] = args[0]
                capture["conv"] = context.module.clone(parent=None)
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(interceptor):
            x_rec, enc = ae.apply({"params": ae_params}, x_bhwc, sample_posterior, rng)
        if "h" not in seen:
            raise ValueError(f"autoencoder has no module at {'/'.join(LAST_LAYER)} (the decoder's last layer)")
        if hasattr(enc, "logvar"):  # KL posterior
            reg = jnp.mean(enc.kl())
            aux = {"h": seen["h"], "latent_std": jnp.std(enc.mean)}
        else:  # VQEncoding
            reg = enc.loss.astype(jnp.float32)
            aux = {"h": seen["h"], "indices": enc.indices}
        return (x_rec, reg), aux

    return forward


def _adaptive_on(cfg: FirstStageLossConfig) -> bool:
    """Whether lambda is computed: KL only when the disc_factor option is > 0 (CompVis
    LPIPSWithDiscriminator); taming / CompVis VQLPIPSWithDiscriminator always compute it."""
    return cfg.kind == "vq" or cfg.disc_factor > 0


def generator_grads(loss: FirstStageLoss, ae: nn.Module, params, x_bhwc, *, lpips_params, disc_params,
                    step, rng, sample_posterior: bool = True, weights=None):
    """Gradients of L_AE w.r.t. ``params = {"autoencoder": ..., "logvar": ()}``, the
    (stopped) reconstruction and logs. See the module docstring for the method.
    ``weights``: CompVis' per-element nll weights (KL only; lambda uses the unweighted nll)."""
    cfg = loss.cfg
    capture: Dict[str, Any] = {}
    (x_rec, reg), vjp_ae, aux = jax.vjp(
        _ae_forward(ae, x_bhwc, rng, sample_posterior, capture), params["autoencoder"], has_aux=True)
    h = aux["h"]
    kernel = params["autoencoder"]["decoder"]["conv_out"]["kernel"]
    conv_params = dict(params["autoencoder"]["decoder"]["conv_out"])
    conv = capture["conv"]

    # Cotangents on x_rec of nll (and d nll / d logvar) and of L_G.
    nll, vjp_nll, logs = jax.vjp(lambda xr, lv: loss.nll(x_bhwc, xr, lv, lpips_params), x_rec, params["logvar"],
                                 has_aux=True)
    ct_nll, grad_logvar = vjp_nll(jnp.ones((), nll.dtype))
    ct_total_nll = ct_nll  # cotangent of the nll term of L_AE (the weighted one with weights)
    if weights is not None:
        nll_w, vjp_w, logs = jax.vjp(lambda xr, lv: loss.nll(x_bhwc, xr, lv, lpips_params, weights), x_rec,
                                     params["logvar"], has_aux=True)
        ct_total_nll, grad_logvar = vjp_w(jnp.ones((), nll_w.dtype))
        nll = nll_w
    g_loss, vjp_g = jax.vjp(lambda xr: loss.g_loss(disc_params, xr), x_rec)
    (ct_g,) = vjp_g(jnp.ones((), g_loss.dtype))

    # Last-layer gradients: the weight-VJP of x_rec = conv_out(h).
    _, vjp_kernel = jax.vjp(lambda k: conv.apply({"params": {**conv_params, "kernel": k}}, h), kernel)
    (grad_w_nll,) = vjp_kernel(ct_nll.astype(x_rec.dtype))
    (grad_w_g,) = vjp_kernel(ct_g.astype(x_rec.dtype))
    if _adaptive_on(cfg):
        d_weight = adaptive_weight(grad_w_nll, grad_w_g, cfg.disc_weight)
    else:
        d_weight = jnp.float32(0.0)
    disc_factor = adopt_weight(cfg.disc_factor, step, cfg.disc_start)
    gan_scale = d_weight * disc_factor

    # One backward pass through the autoencoder with the combined cotangent.
    ct_x_rec = (ct_total_nll + gan_scale * ct_g).astype(x_rec.dtype)
    (grads_ae,) = vjp_ae((ct_x_rec, jnp.asarray(loss.reg_weight, reg.dtype)))

    total = nll + loss.reg_weight * reg + gan_scale * g_loss
    logs = dict(logs, total_loss=total, g_loss=g_loss, d_weight=d_weight, disc_factor=disc_factor)
    if cfg.kind == "kl":
        logs.update(kl_loss=reg, latent_std=aux["latent_std"])
    else:
        logs.update(quant_loss=reg)
        num_codes = ae.config.num_vq_embeddings
        logs["perplexity"] = codebook_perplexity(aux["indices"], num_codes)
    grads = {"autoencoder": grads_ae, "logvar": grad_logvar.astype(params["logvar"].dtype)}
    return grads, jax.lax.stop_gradient(x_rec), logs


def direct_generator_loss(loss: FirstStageLoss, ae: nn.Module, params, x_bhwc, *, lpips_params, disc_params,
                          step, rng, sample_posterior: bool = True, weights=None):
    """The reference formulation, for tests: (L_AE, d_weight) as a differentiable function
    of ``params``, with lambda from ``jax.grad`` of nll and L_G w.r.t. the last-layer kernel."""
    cfg = loss.cfg

    def parts(p, w=None):
        x_rec, enc = ae.apply({"params": p["autoencoder"]}, x_bhwc, sample_posterior, rng)
        nll, _ = loss.nll(x_bhwc, x_rec, p["logvar"], lpips_params, w)
        reg = jnp.mean(enc.kl()) if hasattr(enc, "logvar") else enc.loss
        return nll, reg, loss.g_loss(disc_params, x_rec)

    def with_kernel(k):
        ae_p = jax.tree_util.tree_map(lambda a: a, params["autoencoder"])
        ae_p["decoder"] = dict(ae_p["decoder"])
        ae_p["decoder"]["conv_out"] = {**ae_p["decoder"]["conv_out"], "kernel": k}
        return {"autoencoder": ae_p, "logvar": params["logvar"]}

    kernel = params["autoencoder"]["decoder"]["conv_out"]["kernel"]
    grad_w_nll = jax.grad(lambda k: parts(with_kernel(k))[0])(kernel)
    grad_w_g = jax.grad(lambda k: parts(with_kernel(k))[2])(kernel)
    d_weight = adaptive_weight(grad_w_nll, grad_w_g, cfg.disc_weight) if _adaptive_on(cfg) else jnp.float32(0)
    disc_factor = adopt_weight(cfg.disc_factor, step, cfg.disc_start)

    def total(p):
        nll, reg, g = parts(p, weights)
        return nll + loss.reg_weight * reg + d_weight * disc_factor * g

    return total, d_weight


# ----------------------------------------------------------------------------- state and step


@flax.struct.dataclass
class FirstStageState:
    """Both parameter sets and optimizers of first-stage training (one checkpointed tree)."""

    step: jax.Array          # () int32: number of updates done
    params: Any              # {"autoencoder": Flax params, "logvar": () float32}
    opt_state: Any           # optax state of the autoencoder optimizer (incl. logvar)
    ema_params: Any          # EMA of params (None when off)
    disc_params: Any         # discriminator params
    disc_opt_state: Any      # optax state of the discriminator optimizer
    rng: jax.Array           # base key; step keys are fold_in(rng, step)


def make_init_fn(ae: nn.Module, discriminator: NLayerDiscriminator, tx_ae, tx_disc, image_size: int,
                 logvar_init: float = 0.0, use_ema: bool = False) -> Callable[[jax.Array], FirstStageState]:
    """rng -> FirstStageState with freshly initialised parameters and optimizer states."""
    from ldm_jax.models.autoencoder import init_params

    def init(rng):
        ae_rng, d_rng, state_rng = jax.random.split(rng, 3)
        x = jnp.zeros((1, image_size, image_size, discriminator.config.in_channels), jnp.float32)
        params = {"autoencoder": jax.tree_util.tree_map(lambda a: a.astype(jnp.float32),
                                                        init_params(ae, ae_rng, image_size)),
                  "logvar": jnp.full((), logvar_init, jnp.float32)}
        disc_params = discriminator.init(d_rng, x)["params"]
        return FirstStageState(
            step=jnp.zeros((), jnp.int32), params=params, opt_state=tx_ae.init(params),
            ema_params=jax.tree_util.tree_map(jnp.copy, params) if use_ema else None,
            disc_params=disc_params, disc_opt_state=tx_disc.init(disc_params), rng=state_rng)

    return init


def _tree_where(pred, new, old):
    return jax.tree_util.tree_map(lambda a, b: jnp.where(pred, a, b), new, old)


def make_train_step(ae: nn.Module, loss: FirstStageLoss, tx_ae: optax.GradientTransformation,
                    tx_disc: optax.GradientTransformation, opt_cfg: optim.OptimizerConfig, *,
                    mesh: Optional[Mesh] = None, sample_posterior: bool = True):
    """The pure step ``(state, batch, frozen) -> (state, metrics)``: both optimizers in one
    step. ``batch["image"]``: uint8 (B, H, W, 3) or float in [-1, 1]; ``frozen``:
    ``{"lpips": params | None}``. With ``grad_accum_steps`` k > 1 the batch is split into
    k micro-batches (strided, as ``optim.split_microbatches``), each with its own lambda
    (as Lightning's accumulate_grad_batches), and the gradients averaged."""
    k_accum = opt_cfg.grad_accum_steps
    lr_fn = optim.learning_rate_schedule(opt_cfg)
    cfg = loss.cfg

    def micro_grads(state, frozen, x_bhwc, key):
        grads, x_rec, logs = generator_grads(
            loss, ae, state.params, x_bhwc, lpips_params=frozen["lpips"], disc_params=state.disc_params,
            step=state.step, rng=key, sample_posterior=sample_posterior)
        (_, d_logs), d_grads = jax.value_and_grad(
            lambda dp: loss.d_loss(dp, x_bhwc, x_rec, state.step), has_aux=True)(state.disc_params)
        return grads, d_grads, {**logs, **d_logs}

    def train_step(state: FirstStageState, batch, frozen):
        key = jax.random.fold_in(state.rng, state.step)
        x = images_to_float(batch["image"])
        if k_accum == 1:
            grads, d_grads, logs = micro_grads(state, frozen, x, key)
        else:
            micro = optim.split_microbatches(x, k_accum, mesh)
            out0 = jax.eval_shape(micro_grads, state, frozen, micro[0], key)
            zeros = jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, jnp.float32), out0)

            def body(acc, inputs):
                index, mb = inputs
                out = micro_grads(state, frozen, mb, jax.random.fold_in(key, index))
                return jax.tree_util.tree_map(lambda s, o: s + o.astype(jnp.float32), acc, out), None

            sums, _ = jax.lax.scan(body, zeros, (jnp.arange(k_accum, dtype=jnp.int32), micro))
            grads, d_grads, logs = jax.tree_util.tree_map(lambda s: s / k_accum, sums)

        if cfg.kind == "kl" and not cfg.learn_logvar:
            # CompVis AutoencoderKL's Adam holds encoder/decoder/quant convs only: the loss's
            # logvar stays at logvar_init (sdkit: unless learn_logvar). Zero gradient and no
            # update (also no decoupled weight decay).
            grads = {**grads, "logvar": jnp.zeros_like(grads["logvar"])}
        updates, opt_state = tx_ae.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        if cfg.kind == "kl" and not cfg.learn_logvar:
            params = {**params, "logvar": state.params["logvar"]}

        # The discriminator only moves once the GAN is on (adopt_weight threshold).
        d_updates, d_opt_new = tx_disc.update(d_grads, state.disc_opt_state, state.disc_params)
        d_params_new = optax.apply_updates(state.disc_params, d_updates)
        disc_on = jnp.logical_and(state.step >= cfg.disc_start, cfg.disc_factor > 0)
        disc_params = _tree_where(disc_on, d_params_new, state.disc_params)
        disc_opt_state = _tree_where(disc_on, d_opt_new, state.disc_opt_state)

        step = state.step + 1
        metrics = {"loss": logs["total_loss"], **logs, "grad_norm": optax.global_norm(grads["autoencoder"]),
                   "disc_grad_norm": optax.global_norm(d_grads), "lr": lr_fn(state.step)}
        ema = state.ema_params
        if ema is not None:
            decay = optim.ema_decay_at(step, opt_cfg.ema_decay, opt_cfg.ema_warmup)
            ema = optim.update_ema(ema, params, decay)
        new_state = state.replace(step=step, params=params, opt_state=opt_state, ema_params=ema,
                                  disc_params=disc_params, disc_opt_state=disc_opt_state)
        return new_state, metrics

    return train_step


def make_actnorm_init(discriminator: NLayerDiscriminator, ae: Optional[nn.Module] = None,
                      sample_posterior: bool = True, grad_accum_steps: int = 1):
    """``(state, batch) -> state`` with the discriminator's ActNorm layers initialised from
    data, as taming's ActNorm does in the discriminator's first training forward. That
    forward is the generator half of the first step (optimizer_idx 0: ``D(x_rec)``), so
    with ``ae`` the layers initialise from the reconstructions the first train step makes
    (same parameters, same posterior key ``fold_in(rng, step)``); without it, from the
    real images. With ``grad_accum_steps`` k > 1, from the first micro-batch (Lightning's
    first forward sees the first of the k accumulated batches)."""
    def init(state: FirstStageState, batch):
        x = images_to_float(batch["image"])
        key = jax.random.fold_in(state.rng, state.step)
        if grad_accum_steps > 1:  # as make_train_step: micro-batch 0 and its key
            x = optim.split_microbatches(x, grad_accum_steps)[0]
            key = jax.random.fold_in(key, 0)
        if ae is not None:
            x, _ = ae.apply({"params": state.params["autoencoder"]}, x, sample_posterior, key)
            x = x.astype(jnp.float32)
        return state.replace(disc_params=actnorm_data_init(discriminator, state.disc_params, x))

    return init


def make_codebook_data_init(ae: nn.Module):
    """``(state, batch) -> state`` with the VQ codebook set to K distinct pre-quantisation
    latent vectors of the first batch (a random subset; drawn with replacement plus a
    1e-3 relative jitter when the batch holds fewer than K vectors).

    Why: taming's U(-1/K, 1/K) codebook sits at the origin while the encoder's outputs are
    O(1), so early on the commitment term pulls the latents towards zero and only a few
    codes are used; Adam then needs hundreds of steps to grow the codebook. Starting it on
    the data's own latents (the data-dependent / k-means initialisation of Dhariwal et al.
    2020 "Jukebox" and Zeghidour et al. 2021 "SoundStream") gives full codebook use from
    the first step. The optimizer moments are still zero at this point, and the EMA copy
    (if any) gets the same codebook.
    """
    def init(state: FirstStageState, batch):
        x = images_to_float(batch["image"])
        params = state.params["autoencoder"]
        enc = ae.apply({"params": params}, x, method="encode")
        z_nd = enc.pre_quant.astype(jnp.float32).reshape(-1, enc.pre_quant.shape[-1])
        codebook = params["quantize"]["embedding"]["embedding"]
        k, n = codebook.shape[0], z_nd.shape[0]
        key = jax.random.fold_in(state.rng, 0x5EED)
        pick_key, noise_key = jax.random.split(key)
        if n >= k:
            rows = jax.random.permutation(pick_key, n)[:k]
        else:
            rows = jax.random.randint(pick_key, (k,), 0, n)
        new = z_nd[rows]
        if n < k:
            scale = 1e-3 * (jnp.std(z_nd) + 1e-6)
            new = new + scale * jax.random.normal(noise_key, new.shape, jnp.float32)
        new = new.astype(codebook.dtype)

        def with_codebook(tree):
            if tree is None:
                return None
            ae_params = dict(tree["autoencoder"])
            quantize = dict(ae_params["quantize"])
            quantize["embedding"] = {**quantize["embedding"], "embedding": new}
            ae_params["quantize"] = quantize
            return {**tree, "autoencoder": ae_params}

        return state.replace(params=with_codebook(state.params), ema_params=with_codebook(state.ema_params))

    return init


def jit_train_step(train_step: Callable, mesh: Mesh, state_shardings, frozen_shardings):
    """``jax.jit`` with explicit shardings (state donated, batch on P(("data", "fsdp")),
    metrics replicated), as ``ldm_step.jit_train_step``."""
    return jax.jit(train_step, in_shardings=(state_shardings, shd.batch_sharding(mesh), frozen_shardings),
                   out_shardings=(state_shardings, shd.replicated(mesh)), donate_argnums=(0,))
