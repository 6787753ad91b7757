"""First-stage losses against the originals over their constructor options.

References: taming's ``VQLPIPSWithDiscriminator`` and ``NLayerDiscriminator`` / ``ActNorm``
(imported from taming-transformers-hugf), CompVis ``contperceptual.LPIPSWithDiscriminator``
and CompVis ``vqperceptual.VQLPIPSWithDiscriminator`` (transcribed below: sdkit does not
ship ``ldm.modules.losses``). LPIPS is replaced on both sides by the same stand-in, a
per-example mean of (tanh x - tanh y)^2 (LPIPS itself is tests/test_lpips.py's). The
autoencoder is a three-conv stand-in whose last layer is ``decoder/conv_out``, so the
whole generator step (``generator_grads``: logs, lambda, gradients of every parameter)
and the discriminator step are compared with torch autograd of the original loss.

Options: disc_start before / at / after the step, logvar_init, kl_weight, disc_num_layers
0-4, 1/3/4-channel images (disc_in_channels), disc_factor (0 too), disc_weight (0 too),
perceptual_weight 0 / > 0, use_actnorm, hinge / vanilla, disc_ndf, codebook_weight, VQ
pixel_loss l1 / l2, CompVis' ``weights``, the adaptive weight's 1e4 clamp, non-square
sizes that are not multiples of 16, batch 1-3. Plus: ActNorm's data initialisation (from
the reconstructions, as taming's first training forward), logvar fixed unless
learn_logvar (CompVis' Adam never holds it), and the config keys of the originals.
"""
import importlib
import importlib.util
import os
import sys
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ldm_jax.convert.mapping import convert_state_dict
from ldm_jax.models.autoencoder import DiagonalGaussianDistribution
from ldm_jax.models.discriminator import DiscriminatorConfig, NLayerDiscriminator
from ldm_jax.models.quantizer import VQEncoding
from ldm_jax.training import autoencoder_losses as L
from ldm_jax.training import optim

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TAMING = "taming_transformers_hugf.taming.modules"


# ----------------------------------------------------------------------------- torch references


class TorchStandInLPIPS(torch.nn.Module):
    def forward(self, x, y):
        return ((torch.tanh(x) - torch.tanh(y)) ** 2).mean(dim=(1, 2, 3), keepdim=True)


def _import_taming():
    """taming's vqperceptual imports its LPIPS (which needs torchvision): import it with a
    stand-in LPIPS module, then take the stand-in out of sys.modules again."""
    name = TAMING + ".losses.lpips"
    stub = types.ModuleType(name)
    stub.LPIPS = TorchStandInLPIPS
    saved = {k: sys.modules.pop(k) for k in (name, TAMING + ".losses.vqperceptual") if k in sys.modules}
    sys.modules[name] = stub
    try:
        vq = importlib.import_module(TAMING + ".losses.vqperceptual")
    finally:
        sys.modules.pop(name, None)
        sys.modules.pop(TAMING + ".losses.vqperceptual", None)
        sys.modules.update(saved)
    vq.LPIPS = TorchStandInLPIPS
    disc = importlib.import_module(TAMING + ".discriminator.model")
    return vq, disc


taming_vq, taming_disc = _import_taming()


def _adaptive(nll_loss, g_loss, last_layer, weight):
    nll_grads = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
    g_grads = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return torch.clamp(torch.norm(nll_grads) / (torch.norm(g_grads) + 1e-4), 0.0, 1e4).detach() * weight


class CompVisKL(torch.nn.Module):
    """ldm.modules.losses.contperceptual.LPIPSWithDiscriminator, transcribed (LPIPS: stand-in)."""

    def __init__(self, disc_start, logvar_init=0.0, kl_weight=1.0, pixelloss_weight=1.0, disc_num_layers=3,
                 disc_in_channels=3, disc_factor=1.0, disc_weight=1.0, perceptual_weight=1.0, use_actnorm=False,
                 disc_conditional=False, disc_loss="hinge"):
        super().__init__()
        assert disc_loss in ["hinge", "vanilla"]
        self.kl_weight = kl_weight
        self.perceptual_loss = TorchStandInLPIPS().eval()
        self.perceptual_weight = perceptual_weight
        self.logvar = torch.nn.Parameter(torch.ones(size=()) * logvar_init)
        self.discriminator = taming_disc.NLayerDiscriminator(
            input_nc=disc_in_channels, n_layers=disc_num_layers,
            use_actnorm=use_actnorm).apply(taming_disc.weights_init)
        self.discriminator_iter_start = disc_start
        self.disc_loss = taming_vq.hinge_d_loss if disc_loss == "hinge" else taming_vq.vanilla_d_loss
        self.disc_factor = disc_factor
        self.discriminator_weight = disc_weight
        self.disc_conditional = disc_conditional

    def forward(self, inputs, reconstructions, posteriors, optimizer_idx, global_step, last_layer=None,
                cond=None, split="train", weights=None):
        rec_loss = torch.abs(inputs.contiguous() - reconstructions.contiguous())
        if self.perceptual_weight > 0:
            p_loss = self.perceptual_loss(inputs.contiguous(), reconstructions.contiguous())
            rec_loss = rec_loss + self.perceptual_weight * p_loss
        nll_loss = rec_loss / torch.exp(self.logvar) + self.logvar
        weighted_nll_loss = nll_loss
        if weights is not None:
            weighted_nll_loss = weights * nll_loss
        weighted_nll_loss = torch.sum(weighted_nll_loss) / weighted_nll_loss.shape[0]
        nll_loss = torch.sum(nll_loss) / nll_loss.shape[0]
        kl_loss = posteriors.kl()
        kl_loss = torch.sum(kl_loss) / kl_loss.shape[0]
        disc_factor = taming_vq.adopt_weight(self.disc_factor, global_step, threshold=self.discriminator_iter_start)
        if optimizer_idx == 0:
            assert cond is None and not self.disc_conditional
            g_loss = -torch.mean(self.discriminator(reconstructions.contiguous()))
            if self.disc_factor > 0.0:
                d_weight = _adaptive(nll_loss, g_loss, last_layer, self.discriminator_weight)
            else:
                d_weight = torch.tensor(0.0)
            loss = weighted_nll_loss + self.kl_weight * kl_loss + d_weight * disc_factor * g_loss
            return loss, {"total_loss": loss, "logvar": self.logvar, "kl_loss": kl_loss, "nll_loss": nll_loss,
                          "rec_loss": rec_loss.mean(), "d_weight": d_weight, "disc_factor": torch.tensor(disc_factor),
                          "g_loss": g_loss}
        logits_real = self.discriminator(inputs.contiguous().detach())
        logits_fake = self.discriminator(reconstructions.contiguous().detach())
        d_loss = disc_factor * self.disc_loss(logits_real, logits_fake)
        return d_loss, {"disc_loss": d_loss, "logits_real": logits_real.mean(), "logits_fake": logits_fake.mean()}


class CompVisVQ(torch.nn.Module):
    """ldm.modules.losses.vqperceptual.VQLPIPSWithDiscriminator (CompVis), transcribed."""

    def __init__(self, disc_start, codebook_weight=1.0, pixelloss_weight=1.0, disc_num_layers=3, disc_in_channels=3,
                 disc_factor=1.0, disc_weight=1.0, perceptual_weight=1.0, use_actnorm=False, disc_conditional=False,
                 disc_ndf=64, disc_loss="hinge", n_classes=None, perceptual_loss="lpips", pixel_loss="l1"):
        super().__init__()
        assert disc_loss in ["hinge", "vanilla"] and pixel_loss in ["l1", "l2"]
        self.codebook_weight = codebook_weight
        self.perceptual_loss = TorchStandInLPIPS().eval()
        self.perceptual_weight = perceptual_weight
        self.pixel_loss = (lambda x, y: torch.abs(x - y)) if pixel_loss == "l1" else (lambda x, y: (x - y) ** 2)
        self.discriminator = taming_disc.NLayerDiscriminator(
            input_nc=disc_in_channels, n_layers=disc_num_layers, use_actnorm=use_actnorm,
            ndf=disc_ndf).apply(taming_disc.weights_init)
        self.discriminator_iter_start = disc_start
        self.disc_loss = taming_vq.hinge_d_loss if disc_loss == "hinge" else taming_vq.vanilla_d_loss
        self.disc_factor = disc_factor
        self.discriminator_weight = disc_weight
        self.disc_conditional = disc_conditional

    def forward(self, codebook_loss, inputs, reconstructions, optimizer_idx, global_step, last_layer=None,
                cond=None, split="train", predicted_indices=None):
        rec_loss = self.pixel_loss(inputs.contiguous(), reconstructions.contiguous())
        p_loss = torch.tensor([0.0])
        if self.perceptual_weight > 0:
            p_loss = self.perceptual_loss(inputs.contiguous(), reconstructions.contiguous())
            rec_loss = rec_loss + self.perceptual_weight * p_loss
        nll_loss = torch.mean(rec_loss)
        disc_factor = taming_vq.adopt_weight(self.disc_factor, global_step, threshold=self.discriminator_iter_start)
        if optimizer_idx == 0:
            assert cond is None and not self.disc_conditional
            g_loss = -torch.mean(self.discriminator(reconstructions.contiguous()))
            d_weight = _adaptive(nll_loss, g_loss, last_layer, self.discriminator_weight)
            loss = nll_loss + d_weight * disc_factor * g_loss + self.codebook_weight * codebook_loss.mean()
            return loss, {"total_loss": loss, "quant_loss": codebook_loss.mean(), "nll_loss": nll_loss,
                          "rec_loss": rec_loss.mean(), "p_loss": p_loss.mean(), "d_weight": d_weight,
                          "disc_factor": torch.tensor(disc_factor), "g_loss": g_loss}
        logits_real = self.discriminator(inputs.contiguous().detach())
        logits_fake = self.discriminator(reconstructions.contiguous().detach())
        d_loss = disc_factor * self.disc_loss(logits_real, logits_fake)
        return d_loss, {"disc_loss": d_loss, "logits_real": logits_real.mean(), "logits_fake": logits_fake.mean()}


# ----------------------------------------------------------------------------- JAX side: stand-ins


class StandInPerceptual(nn.Module):
    """TorchStandInLPIPS in JAX: (B,)."""

    @nn.compact
    def __call__(self, x, y):
        return jnp.mean(jnp.square(jnp.tanh(x) - jnp.tanh(y)), axis=(1, 2, 3))


class _TinyConfig:
    num_vq_embeddings = 5


class _Decoder(nn.Module):
    out_ch: int

    @nn.compact
    def __call__(self, z):
        h = nn.silu(nn.Conv(6, (3, 3), padding=1, name="conv_in")(z))
        return nn.Conv(self.out_ch, (3, 3), padding=1, name="conv_out")(h)


class TinyAE(nn.Module):
    """encoder conv -> (KL: posterior sample | VQ: a stand-in codebook loss 0.3 mean(z^2))
    -> decoder conv_in, SiLU, conv_out (the last layer of Taming Eq. 7)."""

    kind: str
    out_ch: int
    config: _TinyConfig = _TinyConfig()

    def setup(self):
        self.encoder = nn.Conv(4 if self.kind == "kl" else 2, (3, 3), padding=1)
        self.decoder = _Decoder(self.out_ch)

    def __call__(self, x, sample_posterior=True, rng=None):
        m = self.encoder(x)
        if self.kind == "kl":
            post = DiagonalGaussianDistribution.from_moments(m)
            return self.decoder(post.sample(rng) if sample_posterior else post.mode()), post
        enc = VQEncoding(latents=m, pre_quant=m, indices=jnp.argmax(m, -1), loss=0.3 * jnp.mean(jnp.square(m)))
        return self.decoder(m), enc


def nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.transpose(np.asarray(x, np.float32), (0, 3, 1, 2))))


def _oihw(k):
    return torch.tensor(np.ascontiguousarray(np.transpose(np.asarray(k), (3, 2, 0, 1))), requires_grad=True)


def torch_tiny_ae(params, x, kind, eps=None):
    """TinyAE in torch: (x_rec, posterior | codebook loss, {param path: leaf tensor})."""
    from ldm.modules.distributions.distributions import DiagonalGaussianDistribution as TorchDGD

    leaves = {"encoder/kernel": _oihw(params["encoder"]["kernel"]),
              "encoder/bias": torch.tensor(np.asarray(params["encoder"]["bias"]), requires_grad=True)}
    for n in ("conv_in", "conv_out"):
        leaves[f"decoder/{n}/kernel"] = _oihw(params["decoder"][n]["kernel"])
        leaves[f"decoder/{n}/bias"] = torch.tensor(np.asarray(params["decoder"][n]["bias"]), requires_grad=True)
    m = F.conv2d(nchw(x), leaves["encoder/kernel"], leaves["encoder/bias"], padding=1)
    if kind == "kl":
        reg = TorchDGD(m)
        z = reg.mean + reg.std * nchw(eps)
    else:
        reg, z = 0.3 * torch.mean(m ** 2), m
    h = F.silu(F.conv2d(z, leaves["decoder/conv_in/kernel"], leaves["decoder/conv_in/bias"], padding=1))
    return F.conv2d(h, leaves["decoder/conv_out/kernel"], leaves["decoder/conv_out/bias"], padding=1), reg, leaves


def _disc_state(tdisc, grads=False):
    state = {}
    for k, p in (tdisc.named_parameters() if grads else tdisc.state_dict().items()):
        if k.endswith(("running_mean", "running_var", "num_batches_tracked", "initialized")):
            continue
        v = (p.grad if p.grad is not None else torch.zeros_like(p)) if grads else p
        v = v.detach().numpy()
        state[k] = v.reshape(-1) if k.endswith((".loc", ".scale")) else v
    return state


def disc_tree(tdisc, disc, shape, grads=False):
    target = jax.eval_shape(lambda k: disc.init(k, jnp.zeros(shape))["params"], jax.random.PRNGKey(0))
    return convert_state_dict(_disc_state(tdisc, grads), target, source="taming NLayerDiscriminator")


def _perturb(tdisc, seed, actnorm, last_scale):
    """Random non-trivial discriminator weights (ActNorm marked initialised)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in tdisc.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
        if actnorm:
            for mod in tdisc.modules():
                if hasattr(mod, "initialized"):
                    mod.initialized.fill_(1)
        tdisc.main[-1].weight.mul_(last_scale)
        tdisc.main[-1].bias.mul_(last_scale)


# ----------------------------------------------------------------------------- the step vs the originals

BASE = dict(B=2, H=13, W=15, C=3, n_layers=1, ndf=4, actnorm=False, disc_loss="hinge", disc_start=5, step=6,
            disc_factor=1.0, disc_weight=0.75, pw=0.0, logvar_init=0.0, kl_weight=1e-6, codebook_weight=1.0,
            pixel_loss="l1", last_scale=1.0, weights=False)

CASES = {
    # KL (CompVis LPIPSWithDiscriminator)
    "kl-after-start": dict(ref="kl", pw=0.7, logvar_init=-1.5, kl_weight=0.01),
    "kl-before-start-vanilla": dict(ref="kl", step=4, disc_loss="vanilla", logvar_init=2.0, kl_weight=1.0),
    "kl-at-start-actnorm-2layers": dict(ref="kl", step=5, n_layers=2, actnorm=True, pw=1.0),
    "kl-disc-factor-0": dict(ref="kl", disc_factor=0.0, pw=1.0),
    "kl-weights-1ch-b1-3layers": dict(ref="kl", weights=True, C=1, B=1, H=48, W=50, n_layers=3, ndf=2,
                                      disc_factor=0.5, pw=0.5, disc_weight=0.0),
    "kl-clamp-1e4-4ch-b3": dict(ref="kl", last_scale=1e-8, C=4, B=3, disc_start=0),
    "kl-0layers": dict(ref="kl", n_layers=0, disc_start=0),  # taming builds it too (no middle layers)
    # VQ (taming VQLPIPSWithDiscriminator)
    "taming-vq-disc-factor-0": dict(ref="vq_taming", disc_factor=0.0, pw=1.0, codebook_weight=0.25),
    "taming-vq-actnorm-vanilla-ndf8": dict(ref="vq_taming", actnorm=True, disc_loss="vanilla", ndf=8, step=4),
    "taming-vq-4layers-48x50-1ch": dict(ref="vq_taming", n_layers=4, H=48, W=50, ndf=2, B=1, C=1, disc_start=0,
                                        pw=1.0),
    # VQ (CompVis VQLPIPSWithDiscriminator: pixel_loss)
    "compvis-vq-l2": dict(ref="vq_compvis", pixel_loss="l2", pw=0.7, codebook_weight=2.0, disc_factor=0.5),
    "compvis-vq-l2-4ch-b3-clamp": dict(ref="vq_compvis", pixel_loss="l2", C=4, B=3, last_scale=1e-8, step=5),
}


def run_case(c):
    """Errors (relative to each reference value's scale) of every compared quantity."""
    kind = "kl" if c["ref"] == "kl" else "vq"
    rng = np.random.default_rng(sum(map(ord, c["name"])))
    B, H, W, C = c["B"], c["H"], c["W"], c["C"]
    x = rng.uniform(-1, 1, (B, H, W, C)).astype(np.float32)
    ae = TinyAE(kind, C)
    params = jax.tree_util.tree_map(lambda a: 3.0 * a, ae.init(jax.random.PRNGKey(0), jnp.asarray(x), False)["params"])
    key = jax.random.PRNGKey(1)
    disc_kw = dict(disc_start=c["disc_start"], disc_num_layers=c["n_layers"], disc_in_channels=C,
                   disc_factor=c["disc_factor"], disc_weight=c["disc_weight"], perceptual_weight=c["pw"],
                   use_actnorm=c["actnorm"], disc_loss=c["disc_loss"])
    torch.manual_seed(0)
    if c["ref"] == "kl":
        ref = CompVisKL(logvar_init=c["logvar_init"], kl_weight=c["kl_weight"], **disc_kw)
        # (LPIPSWithDiscriminator has no disc_ndf: a narrower taming discriminator, for speed)
        ref.discriminator = taming_disc.NLayerDiscriminator(C, c["ndf"], c["n_layers"], c["actnorm"]).apply(
            taming_disc.weights_init)
    elif c["ref"] == "vq_taming":
        ref = taming_vq.VQLPIPSWithDiscriminator(codebook_weight=c["codebook_weight"], disc_ndf=c["ndf"], **disc_kw)
    else:
        ref = CompVisVQ(codebook_weight=c["codebook_weight"], disc_ndf=c["ndf"], pixel_loss=c["pixel_loss"], **disc_kw)
    ref.train()
    _perturb(ref.discriminator, 0, c["actnorm"], c["last_scale"])

    values = {"disc_start": c["disc_start"], "disc_factor": c["disc_factor"], "disc_weight": c["disc_weight"],
              "disc_loss": c["disc_loss"], "perceptual_weight": c["pw"], "disc_num_layers": c["n_layers"],
              "disc_in_channels": C, "use_actnorm": c["actnorm"], "disc_ndf": c["ndf"], "disc_conditional": False,
              "pixelloss_weight": 1.0}
    if kind == "kl":
        values.update(kl_weight=c["kl_weight"], logvar_init=c["logvar_init"])
    else:
        values.update(codebook_weight=c["codebook_weight"], pixel_loss=c["pixel_loss"], n_classes=5)
    if not c["actnorm"]:
        values["disc_norm"] = "batch"  # taming's BatchNorm (train mode)
    L.check_loss_keys(values)
    cfg = L.FirstStageLossConfig.from_mapping(values, kind)
    disc = NLayerDiscriminator(L.discriminator_config(values, C))
    loss = L.FirstStageLoss(cfg, disc, StandInPerceptual() if c["pw"] > 0 else None)
    dparams = disc_tree(ref.discriminator, disc, x.shape)
    step = jnp.int32(c["step"])
    weights = rng.uniform(0, 2, (B, H, W, C)).astype(np.float32) if c["weights"] else None
    grads, x_rec, logs = L.generator_grads(
        loss, ae, {"autoencoder": params, "logvar": jnp.float32(c["logvar_init"])}, jnp.asarray(x), lpips_params={},
        disc_params=dparams, step=step, rng=key, weights=None if weights is None else jnp.asarray(weights))
    (_, dlogs), dgrads = jax.value_and_grad(lambda dp: loss.d_loss(dp, jnp.asarray(x), x_rec, step),
                                            has_aux=True)(dparams)

    eps = np.asarray(jax.random.normal(key, (B, H, W, 2), jnp.float32)) if kind == "kl" else None
    xrec_t, reg, leaves = torch_tiny_ae(params, x, kind, eps)
    xt, last = nchw(x), leaves["decoder/conv_out/kernel"]
    if kind == "kl":
        tloss, tlog = ref(xt, xrec_t, reg, 0, c["step"], last_layer=last,
                          **({} if weights is None else {"weights": nchw(weights)}))
        dl, dlog = ref(xt, xrec_t.detach(), reg, 1, c["step"])
    else:
        tloss, tlog = ref(reg, xt, xrec_t, 0, c["step"], last_layer=last)
        dl, dlog = ref(reg, xt, xrec_t.detach(), 1, c["step"])
    tloss.backward()
    ref.discriminator.zero_grad()
    if dl.requires_grad:
        dl.backward()
    tlog = {k.split("/")[-1]: float(v.detach()) for k, v in {**tlog, **dlog}.items()}

    errs = {}
    for k, v in tlog.items():
        ours = {**logs, **dlogs}[k]
        errs[k] = abs(float(ours) - v) / max(1.0, abs(v))
    ref_rec = xrec_t.detach().permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(np.asarray(x_rec), ref_rec, atol=2e-6 * float(np.abs(ref_rec).max()), rtol=0)
    top = max(float(t.grad.abs().max()) for t in leaves.values())
    for name, t in leaves.items():
        ours = grads["autoencoder"]
        for part in name.split("/"):
            ours = ours[part]
        g = t.grad.numpy()
        g = np.transpose(g, (2, 3, 1, 0)) if g.ndim == 4 else g
        errs["grad " + name] = float(np.max(np.abs(np.asarray(ours) - g))) / max(float(np.abs(g).max()), 1e-3 * top)
    if kind == "kl":
        tg = float(ref.logvar.grad)
        errs["grad logvar"] = abs(float(grads["logvar"]) - tg) / max(1.0, abs(tg))
    tgrads = disc_tree(ref.discriminator, disc, x.shape, grads=True)
    dtop = max(float(np.abs(t).max()) for t in jax.tree_util.tree_leaves(tgrads))
    for (path, o), t in zip(jax.tree_util.tree_leaves_with_path(dgrads), jax.tree_util.tree_leaves(tgrads)):
        errs["disc grad " + jax.tree_util.keystr(path)] = (
            float(np.max(np.abs(np.asarray(o) - t))) / max(float(np.abs(t).max()), 1e-3 * dtop, 1e-12))
    return errs, logs, tlog


@pytest.mark.parametrize("name", list(CASES))
def test_step_matches_original_losses(name):
    c = {**BASE, **CASES[name], "name": name}
    errs, logs, tlog = run_case(c)
    worst = max(errs, key=errs.get)
    print(f"{name}: worst {worst} {errs[worst]:.2e}; d_weight {tlog['d_weight']:.6g}")
    bad = {k: v for k, v in errs.items() if v > 5e-5}  # float32 rounding: <= 3e-5 in 120 random cases
    assert not bad, bad
    if c["last_scale"] < 1e-3:  # lambda hits the clamp
        assert tlog["d_weight"] == pytest.approx(1e4 * c["disc_weight"])
    if c["ref"] != "kl" and c["disc_factor"] == 0 and c["disc_weight"] > 0:
        assert float(logs["d_weight"]) > 0  # VQ computes lambda even with the GAN off


def test_adaptive_weight_clamp_and_eps():
    """clamp(||g_nll|| / (||g_G|| + 1e-4), 0, 1e4) * disc_weight: the eps and both ends."""
    a = jnp.full((2, 3), 1e-5 / np.sqrt(6), jnp.float32)  # norm 1e-5
    z = jnp.zeros((2, 3), jnp.float32)
    np.testing.assert_allclose(float(L.adaptive_weight(a, z, 1.0)), 0.1, rtol=1e-5)  # 1e-5 / 1e-4
    assert float(L.adaptive_weight(a * 1e6, z, 0.5)) == pytest.approx(0.5e4)       # clamped at 1e4
    np.testing.assert_allclose(float(L.adaptive_weight(a, a, 2.0)), 2.0 * 1e-5 / (1e-5 + 1e-4), rtol=1e-5)
    assert float(L.adaptive_weight(z, a, 1.0)) == 0.0


def test_codebook_perplexity_matches_compvis_measure_perplexity():
    """The logged VQ ``perplexity`` = CompVis vqperceptual.measure_perplexity (karpathy's
    deep-vector-quantization), whose call in the loss is commented out (n_classes unused)."""
    from ldm_jax.models.quantizer import codebook_perplexity

    idx = np.random.default_rng(3).integers(0, 7, (2, 5, 6))  # codes 7..9 of 10 unused
    enc = F.one_hot(torch.from_numpy(idx), 10).float().reshape(-1, 10)
    avg = enc.mean(0)
    ref = float((-(avg * torch.log(avg + 1e-10)).sum()).exp())
    np.testing.assert_allclose(float(codebook_perplexity(jnp.asarray(idx, jnp.int32), 10)), ref, rtol=1e-6)


# ----------------------------------------------------------------------------- ActNorm, logvar, channels


def _tiny_state(kind, x, disc, rng=0, logvar=0.0):
    ae = TinyAE(kind, x.shape[-1])
    params = {"autoencoder": ae.init(jax.random.PRNGKey(rng), x, False)["params"], "logvar": jnp.float32(logvar)}
    tx = optim.make_optimizer(optim.OptimizerConfig(lr=1e-2, b1=0.5, b2=0.9, num_steps=10, warmup_steps=0,
                                                    lr_schedule="constant", weight_decay=0.0))
    dparams = disc.init(jax.random.PRNGKey(rng + 1), x)["params"]
    state = L.FirstStageState(step=jnp.int32(0), params=params, opt_state=tx.init(params), ema_params=None,
                              disc_params=dparams, disc_opt_state=tx.init(dparams), rng=jax.random.PRNGKey(7))
    return ae, tx, state


def test_actnorm_initialises_from_first_reconstructions():
    """taming's ActNorm initialises in the discriminator's first training forward: the
    generator half of step 0, D(x_rec). make_actnorm_init(disc, ae) does the same (the
    reconstructions of step 0's key), so loc/scale and then every logit match taming."""
    x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 13, 15, 3)), jnp.float32)
    disc = NLayerDiscriminator(DiscriminatorConfig(ndf=4, n_layers=2, norm="actnorm"))
    ae, _, state = _tiny_state("kl", x, disc)
    new = jax.jit(L.make_actnorm_init(disc, ae, sample_posterior=True))(state, {"image": x})

    torch.manual_seed(0)
    ref = CompVisKL(disc_start=0, perceptual_weight=0.0, disc_num_layers=2, use_actnorm=True).train()
    ref.discriminator = taming_disc.NLayerDiscriminator(3, 4, 2, use_actnorm=True).apply(taming_disc.weights_init)
    with torch.no_grad():
        for name, p in ref.discriminator.named_parameters():
            if not name.endswith((".loc", ".scale")):
                p.copy_(torch.from_numpy(np.array(disc_to_torch_value(state.disc_params, name))))
    key = jax.random.fold_in(state.rng, state.step)
    eps = np.asarray(jax.random.normal(key, (2, 13, 15, 2), jnp.float32))
    xrec_t, post, leaves = torch_tiny_ae(state.params["autoencoder"], x, "kl", eps)
    ref(nchw(x), xrec_t, post, 0, 0, last_layer=leaves["decoder/conv_out/kernel"])  # initialises ActNorm
    for i in (3, 6):
        for p in ("loc", "scale"):
            np.testing.assert_allclose(np.asarray(new.disc_params[f"main_{i}"][p]),
                                       getattr(ref.discriminator.main[i], p).detach().numpy().reshape(-1),
                                       rtol=2e-5, atol=2e-6, err_msg=f"main_{i}.{p}")
    with torch.no_grad():
        ref_logits = ref.discriminator(nchw(x)).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(np.asarray(disc.apply({"params": new.disc_params}, x)), ref_logits, atol=2e-5)


def disc_to_torch_value(params, name):
    """The flax value of a taming discriminator parameter name (main.K.weight / bias)."""
    _, idx, leaf = name.split(".")
    p = params[f"main_{idx}"]
    return np.transpose(np.asarray(p["kernel"]), (3, 2, 0, 1)) if leaf == "weight" else np.asarray(p["bias"])


def test_logvar_fixed_unless_learned():
    """CompVis AutoencoderKL's Adam holds encoder/decoder/quant convs only, so logvar stays
    at logvar_init (sdkit: learn_logvar=False by default). (learn_logvar=True trains it with
    the gradient generator_grads returns, compared with torch above.)"""
    x = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (2, 13, 15, 3)), jnp.float32)
    disc = NLayerDiscriminator(DiscriminatorConfig(ndf=4, n_layers=1, norm="batch"))
    ae, tx, state = _tiny_state("kl", x, disc, logvar=0.5)
    cfg = L.FirstStageLossConfig(kind="kl", disc_start=0, perceptual_weight=0.0, logvar_init=0.5)
    assert not cfg.learn_logvar
    opt_cfg = optim.OptimizerConfig(lr=1e-2, b1=0.5, b2=0.9, num_steps=10, warmup_steps=0, lr_schedule="constant",
                                    weight_decay=0.0)
    step = L.make_train_step(ae, L.FirstStageLoss(cfg, disc), tx, tx, opt_cfg)
    new, metrics = jax.jit(step)(state, {"image": x}, {"lpips": None})
    assert float(new.params["logvar"]) == 0.5 and float(metrics["logvar"]) == 0.5
    assert float(jnp.max(jnp.abs(new.params["autoencoder"]["encoder"]["kernel"]
                                 - state.params["autoencoder"]["encoder"]["kernel"]))) > 0


class _RGBOnly(nn.Module):
    """An LPIPS stand-in that, like LPIPS, takes RGB only, and weighs the channels differently."""

    @nn.compact
    def __call__(self, x, y):
        assert x.shape[-1] == 3 and y.shape[-1] == 3
        w = jnp.asarray([0.2, 0.3, 0.5], jnp.float32)
        return jnp.mean(jnp.square(jnp.tanh(x) - jnp.tanh(y)) * w, axis=(1, 2, 3))


def test_perceptual_channels():
    """taming's LPIPS broadcasts a 1-channel image against its 3-channel shift (grey ->
    RGB); other widths fail there, and here with an error naming perceptual_weight."""
    lp = _RGBOnly()
    x = jnp.asarray(np.random.default_rng(2).uniform(-1, 1, (2, 13, 15, 2)), jnp.float32)
    a, b = x[..., :1], x[..., 1:]
    loss = L.FirstStageLoss(L.FirstStageLossConfig(perceptual_weight=1.0), NLayerDiscriminator(), lp)
    ours = loss.perceptual({}, a, b)
    ref = lp.apply({}, jnp.repeat(a, 3, -1), jnp.repeat(b, 3, -1))
    np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), rtol=1e-6)
    with pytest.raises(ValueError, match="perceptual_weight"):
        loss.perceptual({}, jnp.zeros((1, 16, 16, 4)), jnp.zeros((1, 16, 16, 4)))


# ----------------------------------------------------------------------------- config keys


def test_config_keys_of_the_originals():
    ok = dict(disc_start=0, disc_in_channels=3, use_actnorm=False, disc_conditional=False, pixelloss_weight=1.0,
              n_classes=8192, perceptual_loss="lpips", pixel_loss="l2", disc_ndf=64, disc_num_layers=2)
    L.check_loss_keys(ok)
    assert L.FirstStageLossConfig.from_mapping(ok, "vq").pixel_loss == "l2"
    assert L.discriminator_config(ok, 3).n_layers == 2
    assert L.discriminator_config({"use_actnorm": True}, 3).norm == "actnorm"
    assert L.discriminator_config({"disc_in_channels": 1}, 1).in_channels == 1
    errors = [
        (lambda: L.check_loss_keys({"disc_start": 0, "perceptual_loss_weight": 1.0}), "perceptual_loss_weight"),
        (lambda: L.discriminator_config({"disc_in_channels": 4}, 3), "disc_in_channels"),
        (lambda: L.discriminator_config({"disc_conditional": True}, 3), "disc_conditional"),
        (lambda: L.discriminator_config({"use_actnorm": True, "disc_norm": "batch"}, 3), "use_actnorm"),
        (lambda: L.discriminator_config({"use_actnorm": False, "disc_norm": "actnorm"}, 3), "use_actnorm"),
        (lambda: L.FirstStageLossConfig(kind="kl", pixel_loss="l2"), "pixel_loss"),
        (lambda: L.FirstStageLossConfig(kind="vq", pixel_loss="l3"), "pixel_loss"),
        (lambda: L.FirstStageLossConfig(kind="vq", perceptual_loss="dists"), "perceptual_loss"),
        (lambda: L.FirstStageLossConfig(kind="vq", learn_logvar=True), "learn_logvar"),
    ]
    for fn, key in errors:
        with pytest.raises(ValueError, match=key):
            fn()
    vq = L.FirstStageLoss(L.FirstStageLossConfig(kind="vq", perceptual_weight=0.0), NLayerDiscriminator())
    with pytest.raises(ValueError, match="weights"):
        vq.nll(jnp.zeros((1, 4, 4, 3)), jnp.zeros((1, 4, 4, 3)), jnp.float32(0), None, jnp.ones((1, 4, 4, 3)))


@pytest.mark.parametrize("name", sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, "configs"))
                                        if f.startswith(("autoencoder_", "emoji_autoencoder"))))
def test_shipped_configs_loss_sections(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", name + ".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    values = c.loss.to_dict()
    L.check_loss_keys(values)
    L.FirstStageLossConfig.from_mapping(values, c.model.kind)
    L.discriminator_config(values, 3)


def test_task_refuses_unknown_and_conflicting_keys():
    from ldm_jax.training.autoencoder_task import AutoencoderTask
    from ldm_jax.training import sharding as shd

    spec = importlib.util.spec_from_file_location("emoji_ae", os.path.join(ROOT, "configs", "emoji_autoencoder.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    mesh = shd.make_mesh(1, 1, devices=jax.devices()[:1])
    for key, value, match in [("disc_conditional", True, "disc_conditional"), ("pixel_loss", "l2", "pixel_loss"),
                              ("perceptual_loss_weight", 1.0, "perceptual_loss_weight")]:
        cfg = module.get_config("runlocal,kl")
        cfg.loss[key] = value
        with pytest.raises(ValueError, match=match):
            AutoencoderTask(cfg, mesh)
    cfg = module.get_config("runlocal,kl")
    cfg.model.learn_logvar = True
    cfg.loss.learn_logvar = False
    with pytest.raises(ValueError, match="learn_logvar"):
        AutoencoderTask(cfg, mesh)
    # where an original YAML puts it (model.params): taken when config.loss leaves it unset (None)
    cfg = module.get_config("runlocal,kl")
    cfg.model.learn_logvar = True
    assert cfg.loss.learn_logvar is None and AutoencoderTask(cfg, mesh).loss_cfg.learn_logvar
    # a batch the micro-batches cannot split: named at construction (not a sharding error in the step)
    cfg = module.get_config("runlocal,kl")
    cfg.train.batch_size, cfg.train.grad_accum_steps = 6, 4
    with pytest.raises(ValueError, match=r"train.batch_size=6 must be a multiple of train.grad_accum_steps=4"):
        AutoencoderTask(cfg, mesh)
