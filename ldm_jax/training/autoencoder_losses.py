"""First-stage (autoencoder) losses and the two-optimizer train step.

The losses are CompVis ``ldm.modules.losses.contperceptual.LPIPSWithDiscriminator``
(KL autoencoders) and taming ``vqperceptual.VQLPIPSWithDiscriminator`` (VQ ones),
Rombach et al. 2022 Sec. 3.1 / Appendix G, Esser et al. 2021 ("Taming", Eq. 5-7):

    rec   = |x - x_rec| + perceptual_weight * LPIPS(x, x_rec)        (per element)
    KL:  nll = sum(rec / exp(logvar) + logvar) / B,  logvar a learned scalar (init 0)
         L_AE = nll + kl_weight * KL(q(z|x) || N(0, I)) + lambda * disc_factor * L_G
    VQ:  nll = mean(rec)
         L_AE = nll + codebook_weight * L_codebook + lambda * disc_factor * L_G
    L_G = -mean(D(x_rec))
    lambda = clamp(||grad_w nll|| / (||grad_w L_G|| + 1e-4), 0, 1e4) * disc_weight   (Taming Eq. 7)
    L_D = disc_factor * (hinge or vanilla)(D(x), D(sg(x_rec)))

with ``w`` the weights of the decoder's last layer (``decoder/conv_out/kernel``) and
``disc_factor = 0`` before ``disc_start`` (``adopt_weight``).

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

from ldm_jax.models.discriminator import NLayerDiscriminator, actnorm_data_init
from ldm_jax.models.lpips import LPIPS
from ldm_jax.models.quantizer import codebook_perplexity
from ldm_jax.training import optim
from ldm_jax.training import sharding as shd
from ldm_jax.training.image_range import images_to_float

KINDS = ("kl", "vq")
DISC_LOSSES = ("hinge", "vanilla")
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
    logvar_init: float = 0.0        # KL: initial value of the learned output log-variance

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"FirstStageLossConfig.kind must be one of {KINDS}, got {self.kind!r}")
        if self.disc_loss not in DISC_LOSSES:
            raise ValueError(f"FirstStageLossConfig.disc_loss must be one of {DISC_LOSSES}, got {self.disc_loss!r}")
        for name in ("disc_factor", "disc_weight", "kl_weight", "perceptual_weight", "codebook_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"FirstStageLossConfig.{name} must be >= 0, got {getattr(self, name)}")

    @classmethod
    def from_mapping(cls, values, kind: str) -> "FirstStageLossConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{**{k: v for k, v in dict(values).items() if k in names and v is not None}, "kind": kind})


# ----------------------------------------------------------------------------- pieces


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
        return self.lpips.apply({"params": lpips_params}, x_bhwc, x_rec_bhwc)

    def nll(self, x_bhwc, x_rec_bhwc, logvar, lpips_params) -> Tuple[jax.Array, Dict[str, jax.Array]]:
        """The reconstruction term (KL: Laplace-like NLL with learned logvar summed per
        example; VQ: mean) and its logs."""
        x_rec = x_rec_bhwc.astype(jnp.float32)
        abs_err = jnp.abs(x_bhwc.astype(jnp.float32) - x_rec)
        p_b = self.perceptual(lpips_params, x_bhwc, x_rec)
        rec = abs_err + self.cfg.perceptual_weight * p_b[:, None, None, None]
        logs = {"l1": jnp.mean(abs_err), "p_loss": jnp.mean(p_b), "rec_loss": jnp.mean(rec)}
        if self.cfg.kind == "kl":
            lv = logvar.astype(jnp.float32)
            nll = jnp.sum(rec / jnp.exp(lv) + lv) / x_bhwc.shape[0]
            logs["logvar"] = lv
        else:
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


def generator_grads(loss: FirstStageLoss, ae: nn.Module, params, x_bhwc, *, lpips_params, disc_params,
                    step, rng, sample_posterior: bool = True):
    """Gradients of L_AE w.r.t. ``params = {"autoencoder": ..., "logvar": ()}``, the
    (stopped) reconstruction and logs. See the module docstring for the method."""
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
    g_loss, vjp_g = jax.vjp(lambda xr: loss.g_loss(disc_params, xr), x_rec)
    (ct_g,) = vjp_g(jnp.ones((), g_loss.dtype))

    # Last-layer gradients: the weight-VJP of x_rec = conv_out(h).
    _, vjp_kernel = jax.vjp(lambda k: conv.apply({"params": {**conv_params, "kernel": k}}, h), kernel)
    (grad_w_nll,) = vjp_kernel(ct_nll.astype(x_rec.dtype))
    (grad_w_g,) = vjp_kernel(ct_g.astype(x_rec.dtype))
    if cfg.disc_factor > 0:
        d_weight = adaptive_weight(grad_w_nll, grad_w_g, cfg.disc_weight)
    else:
        d_weight = jnp.float32(0.0)
    disc_factor = adopt_weight(cfg.disc_factor, step, cfg.disc_start)
    gan_scale = d_weight * disc_factor

    # One backward pass through the autoencoder with the combined cotangent.
    ct_x_rec = (ct_nll + gan_scale * ct_g).astype(x_rec.dtype)
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
                          step, rng, sample_posterior: bool = True):
    """The reference formulation, for tests: (L_AE, d_weight) as a differentiable function
    of ``params``, with lambda from ``jax.grad`` of nll and L_G w.r.t. the last-layer kernel."""
    cfg = loss.cfg

    def parts(p):
        x_rec, enc = ae.apply({"params": p["autoencoder"]}, x_bhwc, sample_posterior, rng)
        nll, _ = loss.nll(x_bhwc, x_rec, p["logvar"], lpips_params)
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
    d_weight = adaptive_weight(grad_w_nll, grad_w_g, cfg.disc_weight) if cfg.disc_factor > 0 else jnp.float32(0)
    disc_factor = adopt_weight(cfg.disc_factor, step, cfg.disc_start)

    def total(p):
        nll, reg, g = parts(p)
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

        updates, opt_state = tx_ae.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)

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


def make_actnorm_init(discriminator: NLayerDiscriminator):
    """``(state, batch) -> state`` with the discriminator's ActNorm layers initialised from
    the batch's real images (taming initialises them in the first training forward)."""
    def init(state: FirstStageState, batch):
        x = images_to_float(batch["image"])
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
