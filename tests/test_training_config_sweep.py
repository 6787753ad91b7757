"""The LDM training objective over configurations the other tests do not cover.

A: the objective against the original ``LatentDiffusion.p_losses`` (stable-diffusion-sdkit ``ldm``):
   parameterization eps / x0 / v, loss_type l2 / l1, CompVis beta schedules and odd step counts,
   ``l_simple_weight``, ``original_elbo_weight`` (with its ``lvlb_weights`` and ``v_posterior``) and a
   fixed ``logvar_init``; refusals of what ldm_jax does not train (``learn_logvar``, CompVis "sqrt").
B: the step against the loss diffusers' ``train_text_to_image.py`` computes (prediction types, min-SNR,
   noise offset, input perturbation, zero-terminal-SNR schedules).
C: the sharded step with channel counts / context widths that do not divide the mesh equals the
   unsharded one; a batch the mesh cannot split is a clear error naming the settings.

The model is replaced by a tiny deterministic Linen module where the objective is what is tested
(the step compiles in a second); the sharding test uses a real tiny U-Net.
"""
import dataclasses
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
import torch

from ldm_jax.diffusion import losses as L
from ldm_jax.diffusion.schedule import NoiseSchedule, add_noise
from ldm_jax.training import ldm_step, objective_config, optim
from ldm_jax.training import sharding as shd
from ldm_jax.training import state as state_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARAM = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}
COMPVIS_TO_DIFFUSERS = {"linear": "scaled_linear", "sqrt_linear": "linear", "cosine": "squaredcos_cap_v2"}
FROZEN = {"vae": None, "text_encoder": None, "scale_factor": jnp.float32(0.7), "empty_ids": None}


@dataclasses.dataclass(frozen=True)
class TinyConfig:
    in_channels: int = 3
    out_channels: int = 3
    num_class_embeds: object = None


class TinyNet(nn.Module):
    """A stand-in for the U-Net with its call signature: channel mix, timestep and label terms."""
    config: TinyConfig
    dtype: object = jnp.float32

    @nn.compact
    def __call__(self, x, t, context=None, class_labels=None, train=False):
        h = nn.Dense(self.config.out_channels)(x) * (1 + 1e-3 * t.astype(jnp.float32))[:, None, None, None]
        if class_labels is not None:
            h = h + nn.Embed(self.config.num_class_embeds, self.config.out_channels)(class_labels)[:, None, None, :]
        return jnp.tanh(h)


def original_ddpm():
    from original_ckpt import import_ldm_ddpm

    ddpm, _ = import_ldm_ddpm()

    class Reference(ddpm.LatentDiffusion):
        device = torch.device("cpu")  # (no parameters: the LightningModule stand-in reads them)

    return ddpm, Reference


def reference_model(kind, timesteps, start, end, param, loss_type="l2", l_simple_weight=1.0, elbo=0.0,
                    logvar_init=0.0, v_posterior=0.0):
    """A LatentDiffusion with only what p_losses reads: the schedule buffers DDPM.register_schedule
    builds (lvlb_weights included), the objective options and a fixed logvar; apply_model is set later."""
    ddpm, Reference = original_ddpm()
    m = Reference.__new__(Reference)
    torch.nn.Module.__init__(m)
    m.parameterization, m.v_posterior, m.loss_type = param, v_posterior, loss_type
    m.l_simple_weight, m.original_elbo_weight, m.learn_logvar = l_simple_weight, elbo, False
    ddpm.DDPM.register_schedule(m, beta_schedule=kind, timesteps=timesteps, linear_start=start, linear_end=end)
    m.logvar = torch.full((m.num_timesteps,), logvar_init)
    return m


def ldm_schedule(kind, timesteps, start, end):
    return NoiseSchedule.from_diffusers_config(dict(num_train_timesteps=timesteps, beta_start=start, beta_end=end,
                                                    beta_schedule=COMPVIS_TO_DIFFUSERS[kind]))


def nchw(x):
    return torch.tensor(np.asarray(x).transpose(0, 3, 1, 2).copy())


def nhwc(x):
    return np.asarray(x.detach().numpy()).transpose(0, 2, 3, 1)


# ------------------------------------------------------------------ A: the original's p_losses
SCHEDULES = [("linear", 1000, 0.00085, 0.012), ("sqrt_linear", 500, 1e-4, 0.02), ("cosine", 101, 1e-4, 0.02),
             ("linear", 9, 0.0015, 0.2)]
TERMS = {"plain": dict(), "weighted": dict(l_simple_weight=0.5, elbo=1e-3),
         "elbo_logvar": dict(elbo=0.1, logvar_init=-0.3, v_posterior=0.2), "logvar": dict(l_simple_weight=2.0,
                                                                                          logvar_init=0.7),
         "v_posterior": dict(elbo=1.0, v_posterior=1.0)}


def assert_sgd_step_is(state, new_state, grads, rtol, atol):
    """One optax.sgd(1.0) step moved each parameter by minus its gradient: params - new = grads."""
    moved = jax.tree_util.tree_map(lambda a, b: a - b, state.params, new_state.params)
    for g, e in zip(jax.tree_util.tree_leaves(moved), jax.tree_util.tree_leaves(grads)):
        np.testing.assert_allclose(g, e, rtol=rtol, atol=atol)


@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: f"{s[0]}-{s[1]}")
@pytest.mark.parametrize("param", ["eps", "x0", "v"])
def test_lvlb_weights_match_register_schedule(schedule, param):
    for v_posterior in (0.0, 0.3):
        ref = reference_model(*schedule, param, v_posterior=v_posterior)
        got = L.lvlb_weights(ldm_schedule(*schedule), PARAM[param], v_posterior)
        np.testing.assert_allclose(got, ref.lvlb_weights.numpy(), rtol=2e-6)


@pytest.mark.parametrize("terms", sorted(TERMS))
@pytest.mark.parametrize("loss_type", ["l2", "l1"])
@pytest.mark.parametrize("param", ["eps", "x0", "v"])
def test_objective_matches_p_losses(param, loss_type, terms):
    """ldm_objective on a model output: the loss and its gradient w.r.t. that output equal p_losses'
    (same x0, noise, timesteps; the model returns a fixed tensor), for every schedule."""
    kw = TERMS[terms]
    rng = np.random.default_rng(0)
    for schedule in SCHEDULES:
        ref = reference_model(*schedule, param, loss_type, **kw)
        sched = ldm_schedule(*schedule)
        x0 = rng.standard_normal((5, 4, 4, 3)).astype(np.float32)
        noise = rng.standard_normal(x0.shape).astype(np.float32)
        t = rng.integers(0, schedule[1], 5)
        t[0] = 0  # lvlb_weights[0] := lvlb_weights[1]
        out = rng.standard_normal(x0.shape).astype(np.float32)

        O = nchw(out).requires_grad_(True)
        seen = {}
        ref.apply_model = lambda x_noisy, t_, c: (seen.setdefault("x_t", x_noisy), O)[1]
        want, _ = ref.p_losses(nchw(x0), None, torch.tensor(t), noise=nchw(noise))
        want.backward()

        def objective(o):
            target = L.prediction_target(sched, jnp.asarray(x0), jnp.asarray(noise), t, PARAM[param])
            vlb = L.lvlb_weights(sched, PARAM[param], kw.get("v_posterior", 0.0))
            return L.ldm_objective(L.per_example_loss(o, target, loss_type), jnp.asarray(t),
                                   l_simple_weight=kw.get("l_simple_weight", 1.0),
                                   logvar_init=kw.get("logvar_init", 0.0), original_elbo_weight=kw.get("elbo", 0.0),
                                   lvlb_weights_t=vlb)

        got, grad = jax.value_and_grad(objective)(jnp.asarray(out))
        np.testing.assert_allclose(np.asarray(add_noise(sched, x0, noise, t)), nhwc(seen["x_t"]), atol=1e-6)
        np.testing.assert_allclose(float(got), float(want.detach()), rtol=2e-6, err_msg=str(schedule))
        np.testing.assert_allclose(np.asarray(grad), nhwc(O.grad), rtol=2e-5, atol=1e-9, err_msg=str(schedule))


def _tiny_step(step_cfg, schedule, n_cls=None, k=1):
    net = TinyNet(TinyConfig(num_class_embeds=n_cls))
    opt = optim.OptimizerConfig(lr=1.0, ema_decay=0.0, grad_clip=0.0, grad_accum_steps=k)
    tx = optax.sgd(1.0)  # new params = params - grads
    labels = None if n_cls is None else jnp.zeros((1,), jnp.int32)
    init = state_lib.make_init_fn(lambda key: net.init(key, jnp.zeros((1, 4, 4, 3)), jnp.zeros((1,)), None,
                                                       labels)["params"], tx, use_ema=False)
    return net, ldm_step.make_train_step(net, schedule, tx, step_cfg, opt), init(jax.random.PRNGKey(4))


@pytest.mark.parametrize("param,loss_type,kw,cond", [
    ("x0", "l1", dict(l_simple_weight=0.5, original_elbo_weight=0.05, logvar_init=-0.3, v_posterior=0.2), "adm"),
    ("eps", "l2", dict(original_elbo_weight=1.0, v_posterior=0.5), "none"),
])
def test_step_matches_p_losses(param, loss_type, kw, cond):
    """The train step's loss and parameter gradients with the CompVis terms (class labels: the "adm" key)."""
    kind, T, start, end = SCHEDULES[2]
    sched = ldm_schedule(kind, T, start, end)
    n_cls = 4 if cond == "adm" else None
    cfg = ldm_step.LDMStepConfig(prediction_type=PARAM[param], loss_type=loss_type, cond_drop_prob=0.0,
                                 conditioning="class" if n_cls else "none", **kw)
    net, step, state = _tiny_step(cfg, sched, n_cls)
    latents = jax.random.normal(jax.random.PRNGKey(7), (6, 4, 4, 3))
    labels = jnp.arange(6, dtype=jnp.int32) % 3
    batch = {"latents": latents, **({"label": labels} if n_cls else {})}
    new_state, metrics = jax.jit(step)(state, batch, FROZEN)

    key = jax.random.fold_in(state.rng, state.step)
    t, noise = L.sample_training_inputs(jax.random.fold_in(key, ldm_step._NOISE), latents, sched)
    x0 = latents * FROZEN["scale_factor"]
    out, vjp = jax.vjp(lambda p: net.apply({"params": p}, add_noise(sched, x0, noise, t), t, None,
                                           labels if n_cls else None), state.params)
    ref = reference_model(kind, T, start, end, param, loss_type, kw.get("l_simple_weight", 1.0),
                          kw.get("original_elbo_weight", 0.0), kw.get("logvar_init", 0.0), kw.get("v_posterior", 0.0))
    O = nchw(out).requires_grad_(True)
    ref.apply_model = lambda x_noisy, t_, c: O
    want, _ = ref.p_losses(nchw(x0), None, torch.tensor(np.asarray(t)), noise=nchw(noise))
    want.backward()
    np.testing.assert_allclose(float(metrics["loss"]), float(want.detach()), rtol=2e-6)
    assert_sgd_step_is(state, new_state, vjp(jnp.asarray(nhwc(O.grad)))[0], rtol=1e-5, atol=1e-7)


def test_config_keys_reach_the_step_and_refusals(tmp_path):
    """diffusion.* objective keys become LDMStepConfig fields; learn_logvar, a CompVis "sqrt" schedule,
    infinite lvlb weights and an original YAML whose objective differs are clear errors."""
    diff = ml_collections.ConfigDict(dict(l_simple_weight=0.5, original_elbo_weight=0.1, logvar_init=0.2,
                                          v_posterior=0.3, input_perturbation=0.1, rescale_betas_zero_snr=True,
                                          prediction_type="v_prediction"))
    terms = objective_config.loss_terms(diff)
    assert terms == dict(l_simple_weight=0.5, original_elbo_weight=0.1, logvar_init=0.2, v_posterior=0.3,
                         input_perturbation=0.1)
    assert objective_config.loss_terms(ml_collections.ConfigDict()) == dict(
        l_simple_weight=1.0, original_elbo_weight=0.0, logvar_init=0.0, v_posterior=0.0, input_perturbation=0.0)
    config = objective_config.schedule_config_from(diff, "v_prediction")
    assert config["rescale_betas_zero_snr"] is True
    assert objective_config.schedule_from_config(config).zero_terminal_snr
    assert "rescale_betas_zero_snr" not in objective_config.schedule_config_from(ml_collections.ConfigDict(), "epsilon")

    with pytest.raises(ValueError, match="diffusion.learn_logvar"):
        objective_config.loss_terms(ml_collections.ConfigDict(dict(learn_logvar=True)))
    with pytest.raises(ValueError, match=r"diffusion\.\*.*'sqrt'.*no diffusers equivalent"):
        objective_config.schedule_from_config(dict(num_train_timesteps=10, beta_schedule="sqrt", prediction_type="epsilon"))
    with pytest.raises(ValueError, match="'sqrt_linear' is diffusion.beta_schedule='linear'"):
        objective_config.schedule_from_config(dict(num_train_timesteps=10, beta_schedule="sqrt_linear"))
    with pytest.raises(ValueError, match="v_posterior"):
        ldm_step.LDMStepConfig(v_posterior=1.5)
    with pytest.raises(ValueError, match="l_simple_weight"):
        ldm_step.LDMStepConfig(l_simple_weight=float("nan"))
    zsnr = NoiseSchedule.create("scaled_linear", 20, rescale_betas_zero_snr=True)
    with pytest.raises(ValueError, match=r"original_elbo_weight=0.1.*not finite at timesteps \[19\]"):
        ldm_step.make_train_step(TinyNet(TinyConfig()), zsnr, optax.sgd(1.0),
                                 ldm_step.LDMStepConfig(conditioning="none", original_elbo_weight=0.1),
                                 optim.OptimizerConfig())

    # An original YAML with objective options: the config must repeat them.
    with open(os.path.join(ROOT, "tests", "original_configs", "tiny-uncond-ldm-kl.yaml")) as f:
        text = f.read()
    assert "original_elbo_weight" not in text and "\n  params:\n" in text  # model.params

    def yaml_with(extra):
        path = tmp_path / f"v{len(list(tmp_path.iterdir()))}.yaml"
        lines = "".join(f"    {k}: {v}\n" for k, v in extra.items())
        path.write_text(text.replace("\n  params:\n", "\n  params:\n" + lines, 1))
        return ml_collections.ConfigDict(dict(original_config=str(path), allow_schedule_change=False))

    cfg = ldm_step.LDMStepConfig(conditioning="none")
    objective_config.check_original_objective(yaml_with({"l_simple_weight": 1.0}), cfg)  # the defaults: fine
    with pytest.raises(ValueError, match=r"diffusion.original_elbo_weight=0.0 vs the YAML's 0.5"):
        objective_config.check_original_objective(yaml_with({"original_elbo_weight": 0.5}), cfg)
    objective_config.check_original_objective(yaml_with({"original_elbo_weight": 0.5}),
                                      dataclasses.replace(cfg, original_elbo_weight=0.5))
    with pytest.raises(ValueError, match="learn_logvar: true"):
        objective_config.check_original_objective(yaml_with({"learn_logvar": "true"}), cfg)
    with pytest.raises(ValueError, match="diffusion.loss_type='l2' vs the YAML's 'l1'"):
        objective_config.check_original_objective(yaml_with({"loss_type": "l1"}), cfg)


# ------------------------------------------------------------------ B: diffusers' train_text_to_image
@pytest.mark.parametrize("prediction_type,gamma,offset,perturb,schedule", [
    ("epsilon", None, 0.1, 0.1, ("scaled_linear", 1000, 0.00085, 0.012, False)),
    ("v_prediction", 5.0, 0.1, 0.1, ("scaled_linear", 1000, 0.00085, 0.012, True)),
    ("v_prediction", 0.5, 0.0, 0.2, ("linear", 13, 1e-3, 0.2, True)),
    ("sample", 5.0, 0.05, 0.0, ("squaredcos_cap_v2", 50, 1e-4, 0.02, False)),
])
def test_step_matches_diffusers_train_text_to_image(prediction_type, gamma, offset, perturb, schedule):
    """noise (+ noise_offset), input_perturbation, add_noise / get_velocity targets and the min-SNR block
    of examples/text_to_image/train_text_to_image.py, on diffusers' DDPMScheduler (float32 schedule:
    ~1e-6 relative; its eps weight at t = 0 ~3e-5)."""
    import diffusers
    import torch.nn.functional as F
    from diffusers.training_utils import compute_snr

    kind, T, start, end, zsnr = schedule
    sched_cfg = dict(num_train_timesteps=T, beta_schedule=kind, beta_start=start, beta_end=end,
                     rescale_betas_zero_snr=zsnr)
    sched = NoiseSchedule.from_diffusers_config(sched_cfg)
    ref = diffusers.DDPMScheduler(**sched_cfg, prediction_type=prediction_type)
    cfg = ldm_step.LDMStepConfig(prediction_type=prediction_type, conditioning="none", min_snr_gamma=gamma,
                                 offset_noise=offset, input_perturbation=perturb)
    net, step, state = _tiny_step(cfg, sched)
    latents = jax.random.normal(jax.random.PRNGKey(8), (8, 4, 4, 3))
    new_state, metrics = jax.jit(step)(state, {"latents": latents}, {**FROZEN, "scale_factor": jnp.float32(1.0)})

    key = jax.random.fold_in(state.rng, state.step)
    t, noise = L.sample_training_inputs(jax.random.fold_in(key, ldm_step._NOISE), latents, sched, offset)
    new_noise = noise + perturb * jax.random.normal(jax.random.fold_in(key, ldm_step._INPUT_PERTURBATION),
                                                    noise.shape)
    ts = torch.tensor(np.asarray(t))
    noisy = ref.add_noise(nchw(latents), nchw(new_noise) if perturb else nchw(noise), ts)
    out, vjp = jax.vjp(lambda p: net.apply({"params": p}, jnp.asarray(nhwc(noisy)), t), state.params)
    pred = nchw(out).requires_grad_(True)
    target = {"epsilon": nchw(noise), "v_prediction": ref.get_velocity(nchw(latents), nchw(noise), ts),
              "sample": nchw(latents)}[prediction_type]
    if gamma is None:
        want = F.mse_loss(pred.float(), target.float(), reduction="mean")
    else:
        snr = compute_snr(ref, ts)
        w = torch.stack([snr, gamma * torch.ones_like(ts)], dim=1).min(dim=1)[0]
        w = w / snr if prediction_type == "epsilon" else w / (snr + 1) if prediction_type == "v_prediction" else w
        want = (F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3)) * w).mean()
    want.backward()
    np.testing.assert_allclose(float(metrics["loss"]), float(want.detach()), rtol=1e-4)
    assert_sgd_step_is(state, new_state, vjp(jnp.asarray(nhwc(pred.grad)))[0], rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------ C: sharding
def test_sharded_step_with_odd_widths_equals_unsharded():
    """A U-Net whose widths (36 channels: not a multiple of 8; 5 input channels, context width 21) do not
    all divide the mesh, text conditioning with a trained tiny CLIP, CFG dropout, min-SNR, offset noise,
    input perturbation, EMA and 2 micro-batches: the step on the (1, 8) mesh equals the unsharded step
    (loss, params, EMA). (The sweep behind this file ran meshes (1, 8), (2, 4), (4, 2), (8, 1).)"""
    from ldm_jax.models.clip import CLIPTextConfig, CLIPTextModel
    from ldm_jax.models.unet import UNet, UNetConfig

    unet = UNet(UNetConfig(in_channels=5, out_channels=5, block_out_channels=(36,),
                           down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",),
                           mid_block_type=None, layers_per_block=1, cross_attention_dim=21, num_heads=3,
                           norm_num_groups=4))
    te = CLIPTextModel(CLIPTextConfig(vocab_size=50, hidden_size=21, intermediate_size=10, num_layers=1, num_heads=3,
                                      max_position_embeddings=5))
    te_params = jax.eval_shape(te.init, jax.random.PRNGKey(3), jnp.zeros((1, 5), jnp.int32))["params"]
    opt = optim.OptimizerConfig(lr=1.0, ema_decay=0.5, grad_clip=0.0, grad_accum_steps=2)
    tx = optax.sgd(1.0)
    cfg = ldm_step.LDMStepConfig(conditioning="text", cond_drop_prob=0.3, train_text_encoder=True, min_snr_gamma=5.0,
                                 offset_noise=0.05, input_perturbation=0.05)
    dummy = (jnp.zeros((1, 8, 8, 5)), jnp.zeros((1,)), jnp.zeros((1, 5, 21)))
    # Random weights drawn on the host (compiling the Flax initialisers costs more than the step).
    shapes = jax.eval_shape(lambda k: {"unet": unet.init(k, *dummy)["params"], "text_encoder": te_params},
                            jax.random.PRNGKey(0))
    draw = np.random.default_rng(1)
    params = jax.tree_util.tree_map(lambda s: (0.2 * draw.standard_normal(s.shape)).astype(np.float32), shapes)
    init_fn = state_lib.make_init_fn(lambda k: params, tx, use_ema=True)
    schedule = NoiseSchedule.create("scaled_linear", 1000)
    rng = np.random.default_rng(0)
    batch = {"latents": rng.standard_normal((16, 8, 8, 5)).astype(np.float32),
             "input_ids": rng.integers(0, 50, (16, 5)).astype(np.int32)}
    frozen = {**FROZEN, "empty_ids": jnp.zeros((1, 5), jnp.int32)}
    state0 = jax.device_get(init_fn(jax.random.PRNGKey(1)))
    step = ldm_step.make_train_step(unet, schedule, tx, cfg, opt, text_encoder=te)
    ref_state, ref_metrics = jax.device_get(jax.jit(step)(state0, batch, frozen))

    for data, fsdp in [(1, 8)]:
        mesh = shd.make_mesh(data, fsdp, devices=jax.devices()[: data * fsdp])
        _, shardings = state_lib.abstract_train_state(init_fn, mesh, min_fsdp_size=16)
        # some leaves are sharded, others (widths 5, 21, and 36 over 8) fall back to replication
        specs = [s.spec for s in jax.tree_util.tree_leaves(shardings.params)]
        assert any("fsdp" in s for s in specs) and any(all(a is None for a in s) for s in specs)
        frozen_m = jax.device_put(frozen, shd.replicated(mesh))
        jitted = ldm_step.jit_train_step(ldm_step.make_train_step(unet, schedule, tx, cfg, opt, text_encoder=te,
                                                                  mesh=mesh),
                                         mesh, shardings, jax.tree_util.tree_map(lambda a: a.sharding, frozen_m))
        state, metrics = jax.device_get(jitted(shd.shard_tree(state0, shardings), shd.shard_batch(batch, mesh),
                                               frozen_m))
        np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-5)
        for tree in ("params", "ema_params"):
            for a, b in zip(jax.tree_util.tree_leaves(getattr(state, tree)),
                            jax.tree_util.tree_leaves(getattr(ref_state, tree))):
                np.testing.assert_allclose(a, b, atol=2e-6, err_msg=f"mesh {data}x{fsdp} {tree}")


@pytest.mark.parametrize("batch_size,k,mesh_shape", [(6, 1, (2, 4)), (8, 2, (1, 8)), (12, 1, (4, 2)), (6, 4, None)])
def test_batch_the_mesh_cannot_split_is_a_clear_error(batch_size, k, mesh_shape):
    """train.batch_size must be a multiple of grad_accum_steps x devices: checked when the task is built
    and when the step is traced (before XLA's sharding-shape error)."""
    mesh = None if mesh_shape is None else shd.make_mesh(*mesh_shape, devices=jax.devices()[: np.prod(mesh_shape)])
    match = rf"train.batch_size={batch_size} must be a multiple of train.grad_accum_steps={k}"
    with pytest.raises(ValueError, match=match):
        shd.check_batch_size(batch_size, mesh, k)
    cfg = ldm_step.LDMStepConfig(conditioning="none")
    net = TinyNet(TinyConfig())
    opt = optim.OptimizerConfig(grad_accum_steps=k, ema_decay=0.0)
    step = ldm_step.make_train_step(net, NoiseSchedule.create(), optax.sgd(1.0), cfg, opt, mesh=mesh)
    state = state_lib.make_init_fn(lambda key: net.init(key, jnp.zeros((1, 4, 4, 3)), jnp.zeros((1,)))["params"],
                                   optax.sgd(1.0), use_ema=False)(jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match=match):
        jax.eval_shape(step, state, {"latents": jnp.zeros((batch_size, 4, 4, 3))}, FROZEN)
    shd.check_batch_size(batch_size * 8 * k, mesh, k)  # a multiple is fine
