"""First-stage (autoencoder) training task for the generic loop (``loop.train``).

    task = AutoencoderTask(config, mesh, workdir)
    loop.train(config, workdir, task=task, mesh=mesh)

The state (``autoencoder_losses.FirstStageState``) holds the autoencoder (+ the learned
``logvar``) and the PatchGAN discriminator with their two optimizers, both updated in
one jitted step (``autoencoder_losses.make_train_step``). LPIPS weights are frozen and
passed beside the state.

Evaluation runs at every checkpoint (the loop asks for the task's ``metadata()`` when
it saves): reconstructions (posterior mode) of the held-out split give PSNR, SSIM
(Gaussian window 11, sigma 1.5, as skimage / pytorch-msssim), LPIPS, and for VQ models
codebook usage and perplexity; plus the PSNR of two trivial predictors (the eval set's
mean image, a blank white image) as baselines. Results go to the log, TensorBoard
(``workdir/tb``, tags ``eval/*``), ``workdir/eval/step_N.json`` and a reconstruction
grid ``workdir/samples/recon_step_N.png``. The eval also suggests the LDM's
``scale_factor`` = 1 / std of the latents the LDM would see (KL: posterior samples, VQ:
pre-quantisation latents, as ``ldm_step.first_stage_latents``), saved with the
checkpoint metadata and returned by ``load_autoencoder_from_workdir``.

Config keys (``configs/emoji_autoencoder.py``): ``model.kind`` ("kl" | "vq"),
``model.codebook_init`` ("uniform" | "data", VQ only),
``model.autoencoder`` (AutoencoderConfig fields), ``model.dtype``, ``model.attention_impl``;
``loss.*`` (FirstStageLossConfig fields, ``lpips_weights``, ``disc_ndf``,
``disc_num_layers``, ``disc_norm``, ``disc_norm_groups``, the originals' ``disc_in_channels``,
``use_actnorm``, ``disc_conditional`` (False only), ``n_classes``; any other key is refused);
``model.learn_logvar`` (= ``loss.learn_logvar``); ``train.*`` (OptimizerConfig
fields, ``disc_lr``); ``eval.*``; ``mesh.*``; ``data.*``.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from typing import Any, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from ldm_jax.models.autoencoder import AutoencoderConfig, build_autoencoder
from ldm_jax.models.discriminator import NLayerDiscriminator
from ldm_jax.models.lpips import LPIPS, load_lpips_params
from ldm_jax.training import autoencoder_losses as losses
from ldm_jax.training import optim
from ldm_jax.training import sharding as shd
from ldm_jax.training import state as state_lib
from ldm_jax.training.config_access import compute_dtype, config_as_dict as _as_dict, config_get as _get
from ldm_jax.training.image_range import images_to_float

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- metrics


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    coords = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    g = np.exp(-(coords ** 2) / (2.0 * sigma ** 2))
    return (g / g.sum()).astype(np.float32)


def ssim_per_image(x_bhwc: jax.Array, y_bhwc: jax.Array, data_range: float = 1.0, win_size: int = 11,
                   sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03) -> jax.Array:
    """Mean SSIM per image (B,) (Wang et al. 2004, Eq. 13): Gaussian-weighted local
    statistics over the fully-inside ("valid") windows of each channel, population
    covariances, mean over positions and channels -- what pytorch-msssim's ``ssim`` and
    skimage's ``structural_similarity(gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, channel_axis=-1)`` compute."""
    if x_bhwc.shape != y_bhwc.shape or x_bhwc.ndim != 4:
        raise ValueError(f"ssim: expected two (B, H, W, C) batches of one shape, got {x_bhwc.shape}, {y_bhwc.shape}")
    if min(x_bhwc.shape[1:3]) < win_size:
        raise ValueError(f"ssim: images of {x_bhwc.shape[1]}x{x_bhwc.shape[2]} are smaller than the "
                         f"{win_size}x{win_size} window")
    g = jnp.asarray(_gaussian_window(win_size, sigma))
    c = x_bhwc.shape[-1]

    def blur(a):  # separable depthwise valid convolution, (B, H, W, C) -> (B, H-10, W-10, C)
        hp = jax.lax.Precision.HIGHEST
        kh = jnp.tile(g.reshape(win_size, 1, 1, 1), (1, 1, 1, c))
        kw = jnp.tile(g.reshape(1, win_size, 1, 1), (1, 1, 1, c))
        dn = ("NHWC", "HWIO", "NHWC")
        a = jax.lax.conv_general_dilated(a, kh, (1, 1), "VALID", dimension_numbers=dn, feature_group_count=c,
                                         precision=hp)
        return jax.lax.conv_general_dilated(a, kw, (1, 1), "VALID", dimension_numbers=dn, feature_group_count=c,
                                            precision=hp)

    x = x_bhwc.astype(jnp.float32)
    y = y_bhwc.astype(jnp.float32)
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    mu_x, mu_y = blur(x), blur(y)
    s_xx = blur(x * x) - mu_x ** 2
    s_yy = blur(y * y) - mu_y ** 2
    s_xy = blur(x * y) - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * s_xy + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (s_xx + s_yy + c2))
    return jnp.mean(ssim_map, axis=(1, 2, 3))


def psnr_per_image(x_bhwc: jax.Array, y_bhwc: jax.Array, data_range: float = 1.0) -> jax.Array:
    """10 log10(range^2 / MSE) per image (B,)."""
    mse = jnp.mean(jnp.square(x_bhwc.astype(jnp.float32) - y_bhwc.astype(jnp.float32)), axis=(1, 2, 3))
    return 10.0 * jnp.log10(data_range ** 2 / jnp.maximum(mse, 1e-12))


def perplexity_from_counts(counts_k: np.ndarray) -> Tuple[float, float]:
    """(usage, perplexity) of code counts: the fraction of used codes, and exp(entropy)
    (as ``quantizer.codebook_usage`` / ``codebook_perplexity`` on the indices)."""
    counts = np.asarray(counts_k, np.float64)
    p = counts / max(counts.sum(), 1.0)
    return float(np.mean(counts > 0)), float(np.exp(-np.sum(p * np.log(p + 1e-10))))


# ----------------------------------------------------------------------------- task


class AutoencoderTask:
    """Hooks for ``loop.train`` (see ``loop.py``) for first-stage training."""

    def __init__(self, config, mesh: Mesh, workdir: Optional[str] = None):
        self.config = config
        self.mesh = mesh
        self.workdir = workdir
        model = config.model
        self.dtype = compute_dtype(model)
        attention_impl = _get(model, "attention_impl", "xla")
        kind = _get(model, "kind", "kl")
        self.min_fsdp_size = int(_get(config.mesh, "min_fsdp_size", 2 ** 18))
        self.rules = [tuple(r) for r in (_get(config.mesh, "rules", ()) or ())]
        self.image_size = int(config.data.image_size)

        self.ae_config = AutoencoderConfig(**{**_as_dict(_get(model, "autoencoder")), "kind": kind})
        if self.image_size % self.ae_config.downsample_factor:
            raise ValueError(f"data.image_size={self.image_size} is not divisible by the autoencoder's "
                             f"factor {self.ae_config.downsample_factor}")
        self.ae = build_autoencoder(self.ae_config, attention_impl=attention_impl, dtype=self.dtype)

        lcfg = config.loss
        loss_values = _as_dict(lcfg)
        losses.check_loss_keys(loss_values)
        learn_logvar = _get(model, "learn_logvar", None)  # where the originals' YAML has it (model.params)
        if learn_logvar is not None:
            if loss_values.get("learn_logvar") is not None and bool(loss_values["learn_logvar"]) != bool(learn_logvar):
                raise ValueError(f"model.learn_logvar={learn_logvar} conflicts with "
                                 f"loss.learn_logvar={loss_values['learn_logvar']}")
            loss_values["learn_logvar"] = bool(learn_logvar)
        self.loss_cfg = losses.FirstStageLossConfig.from_mapping(loss_values, kind)
        if self.loss_cfg.perceptual_weight > 0 and self.ae_config.in_channels not in losses.LPIPS_CHANNELS:
            raise ValueError(f"loss.perceptual_weight={self.loss_cfg.perceptual_weight}: LPIPS needs 1- or 3-channel "
                             f"images, the autoencoder has in_channels={self.ae_config.in_channels}; "
                             "set loss.perceptual_weight=0")
        self.disc_config = losses.discriminator_config(loss_values, self.ae_config.in_channels)
        self.discriminator = NLayerDiscriminator(self.disc_config, dtype=self.dtype)

        # LPIPS: needed for the loss when perceptual_weight > 0; used by the eval if found.
        self.lpips = LPIPS(dtype=self.dtype)
        lpips_params = None
        weights = _get(lcfg, "lpips_weights", "") or None
        if self.loss_cfg.perceptual_weight > 0 or weights:
            lpips_params = load_lpips_params(weights)
        else:
            try:
                lpips_params = load_lpips_params()
            except FileNotFoundError as e:
                log.warning("no LPIPS in the evaluation: %s", e)
        self.loss = losses.FirstStageLoss(self.loss_cfg, self.discriminator,
                                          self.lpips if self.loss_cfg.perceptual_weight > 0 else None)
        frozen = {"lpips": None}
        if lpips_params is not None:
            frozen["lpips"] = shd.shard_tree(lpips_params, shd.tree_shardings(
                lpips_params, mesh, self.min_fsdp_size, self.rules))
        self.frozen = frozen
        self.frozen_shardings = jax.tree_util.tree_map(lambda x: x.sharding, frozen)

        # Two optimizers (CompVis: Adam(lr, betas=(0.5, 0.9)) for both).
        train = config.train
        opt_fields = {"b1": 0.5, "b2": 0.9, "weight_decay": 0.0, "grad_clip": 0.0, "ema_decay": 0.0,
                      **_as_dict(train)}
        opt_fields.setdefault("num_steps", int(train.num_steps))
        self.opt_cfg = optim.OptimizerConfig.from_mapping(opt_fields)
        disc_lr = _get(train, "disc_lr", None)
        self.disc_opt_cfg = dataclasses.replace(self.opt_cfg, lr=float(disc_lr if disc_lr is not None else self.opt_cfg.lr),
                                                ema_decay=0.0)
        self.tx = optim.make_optimizer(self.opt_cfg)
        self.tx_disc = optim.make_optimizer(self.disc_opt_cfg)
        self.global_batch_size = int(train.batch_size)
        shd.check_batch_size(self.global_batch_size, mesh, self.opt_cfg.grad_accum_steps)

        self.sample_posterior = bool(_get(model, "sample_posterior", True))
        self._init_fn = losses.make_init_fn(self.ae, self.discriminator, self.tx, self.tx_disc, self.image_size,
                                            self.loss_cfg.logvar_init, use_ema=self.opt_cfg.ema_decay > 0)
        self._abstract, self.state_shardings = state_lib.abstract_train_state(
            self._init_fn, mesh, self.min_fsdp_size, self.rules)
        self.step_fn = losses.make_train_step(self.ae, self.loss, self.tx, self.tx_disc, self.opt_cfg, mesh=mesh,
                                              sample_posterior=self.sample_posterior)
        # SyncedJit: with several processes, compile, then meet at a barrier before the first run
        # (a peer still compiling would time out the first collective; see sharding.SyncedJit).
        self._jitted = shd.SyncedJit(
            losses.jit_train_step(self.step_fn, mesh, self.state_shardings, self.frozen_shardings), "ae_train_step")
        self._actnorm_init = None
        self._actnorm_pending = False
        # First-batch initialisers (state, batch) -> state, donating the state.
        init_shardings = dict(in_shardings=(self.state_shardings, shd.batch_sharding(mesh)),
                              out_shardings=self.state_shardings, donate_argnums=(0,))
        if self.disc_config.norm == "actnorm":
            self._actnorm_init = shd.SyncedJit(
                jax.jit(losses.make_actnorm_init(self.discriminator, self.ae, self.sample_posterior,
                                                 self.opt_cfg.grad_accum_steps), **init_shardings), "actnorm_init")

        # VQ codebook initialisation: "uniform" (taming's U(-1/K, 1/K)) or "data" (from the
        # first batch's latents, see autoencoder_losses.make_codebook_data_init).
        self.codebook_init = _get(model, "codebook_init", "uniform")
        if self.codebook_init not in ("uniform", "data"):
            raise ValueError(f"model.codebook_init={self.codebook_init!r}: expected 'uniform' or 'data'")
        self._codebook_init = None
        self._codebook_pending = False
        if kind == "vq" and self.codebook_init == "data":
            self._codebook_init = shd.SyncedJit(
                jax.jit(losses.make_codebook_data_init(self.ae), **init_shardings), "codebook_init")

        ecfg = _get(config, "eval", {})
        self.eval_batch_size = int(_get(ecfg, "batch_size", self.global_batch_size))
        self.eval_num_batches = int(_get(ecfg, "num_batches", 0))  # 0 = the whole split
        self.eval_split = _get(ecfg, "split", "validation")
        self.eval_enabled = bool(_get(ecfg, "enabled", True))
        self.num_grid_images = int(_get(ecfg, "num_images", 8))
        self._eval_batches = None
        self._eval_fn = None
        self._recon_fn = None
        self._state = None
        self._evaluated_step = None
        self._tb = None
        self.scale_factor: Optional[float] = None
        self.last_eval: Dict[str, Any] = {}

    # ------------------------------------------------------------------ loop hooks
    def init_state(self, rng: jax.Array):
        self._state = shd.SyncedJit(jax.jit(self._init_fn, out_shardings=self.state_shardings), "ae_init")(rng)
        return self._state

    def abstract_state(self):
        return self._abstract

    def prepare_batch(self, host_batch: Dict[str, Any]) -> Dict[str, np.ndarray]:
        return {"image": np.asarray(host_batch["image"])}

    def on_first_batch(self, state, batch) -> None:
        """Fresh runs only: ActNorm discriminators and a "data" VQ codebook initialise from
        the first batch (in the first ``train_step``, since hooks cannot return a new state)."""
        self._actnorm_pending = self._actnorm_init is not None
        self._codebook_pending = self._codebook_init is not None

    def train_step(self, state, batch):
        if self._codebook_pending:
            state = self._codebook_init(state, batch)
            self._codebook_pending = False
        if self._actnorm_pending:
            state = self._actnorm_init(state, batch)
            self._actnorm_pending = False
        self._state, metrics = self._jitted(state, batch, self.frozen)
        return self._state, metrics

    def metadata(self) -> Dict[str, Any]:
        """Checkpoint metadata; the loop asks for it when it saves, so the held-out
        evaluation runs here (once per saved step)."""
        if self._state is not None and self.eval_enabled:
            step = int(jax.device_get(self._state.step))
            if step != self._evaluated_step:
                self.evaluate(self._state, step)
        return {"task": "autoencoder", "autoencoder_config": dataclasses.asdict(self.ae_config),
                "scale_factor": self.scale_factor, "eval": self.last_eval}

    def load_metadata(self, meta: Dict[str, Any]) -> None:
        if meta.get("scale_factor") is not None:
            self.scale_factor = float(meta["scale_factor"])
        self.last_eval = dict(meta.get("eval") or {})

    def sample(self, state, step: int) -> Optional[np.ndarray]:
        """Originals and reconstructions of the first eval images, interleaved (N, H, W, 3) in [0, 1]."""
        batches = self._eval_data()
        if not batches:
            return None
        images = batches[0]["image"][: self.eval_batch_size]
        recon = np.asarray(self._reconstruct(self._ae_params(state), images))
        n = min(self.num_grid_images, images.shape[0])
        pairs = np.stack([images[:n].astype(np.float32) / 255.0, recon[:n]], axis=1)
        return pairs.reshape((-1,) + pairs.shape[2:])

    # ------------------------------------------------------------------ evaluation
    def _ae_params(self, state):
        params = state.ema_params if state.ema_params is not None else state.params
        return params["autoencoder"]

    def _eval_data(self):
        """Host batches of the held-out split (loaded once; padded to whole batches with a mask)."""
        if self._eval_batches is None:
            from ldm_jax.training.loop import SyntheticDataset

            b = self.eval_batch_size
            shd.local_batch_size(b, self.mesh)
            data_cfg = {**_as_dict(self.config.data), "shuffle": False, "random_flip": False,
                        "drop_remainder": False}
            if data_cfg.get("name") == "synthetic":
                # held-out examples: indices far beyond any training run
                ds = SyntheticDataset(b, self.image_size, jax.process_index(), jax.process_count(),
                                      seed=int(_get(self.config, "seed", 0)) + 1)
                n = self.eval_num_batches or 4
                batches = [dict(next(ds), mask=np.ones((b // jax.process_count(),), bool)) for _ in range(n)]
            else:
                from ldm_jax.data import create_dataset

                it = create_dataset(data_cfg, split=self.eval_split, global_batch_size=b,
                                    process_index=jax.process_index(), process_count=jax.process_count(),
                                    seed=0, image_size=self.image_size, num_epochs=1)
                batches = []
                for batch in it:
                    batches.append({"image": np.asarray(batch["image"]), "mask": np.asarray(batch["mask"], bool)})
                    if self.eval_num_batches and len(batches) >= self.eval_num_batches:
                        break
            self._eval_batches = batches
        return self._eval_batches

    def _reconstruct(self, ae_params, images_uint8):
        if self._recon_fn is None:
            ae = self.ae

            def recon(params, image):
                x = images_to_float(image)
                x_rec, _ = ae.apply({"params": params}, x, False)
                return (jnp.clip(x_rec.astype(jnp.float32), -1.0, 1.0) + 1.0) / 2.0

            self._recon_fn = jax.jit(recon, out_shardings=shd.replicated(self.mesh))
        return self._recon_fn(ae_params, shd.shard_batch(np.asarray(images_uint8), self.mesh))

    def _make_eval_fn(self):
        ae, lpips, kind = self.ae, self.lpips, self.ae_config.kind
        use_lpips = self.frozen["lpips"] is not None and self.ae_config.in_channels in losses.LPIPS_CHANNELS
        num_codes = self.ae_config.num_vq_embeddings

        def fn(params, lpips_params, image, mask, rng):
            x = images_to_float(image)
            if kind == "kl":
                x_rec, post = ae.apply({"params": params}, x, False)
                eps = jax.random.normal(rng, post.mean.shape, jnp.float32)
                z = post.mean + post.std * eps  # what the LDM trains on (sample_posterior)
            else:
                x_rec, enc = ae.apply({"params": params}, x, False)
                z = enc.pre_quant.astype(jnp.float32)
            x_rec = jnp.clip(x_rec.astype(jnp.float32), -1.0, 1.0)
            m = mask.astype(jnp.float32)
            a, b = (x + 1.0) / 2.0, (x_rec + 1.0) / 2.0
            out = {"count": jnp.sum(m), "psnr": jnp.sum(m * psnr_per_image(a, b)),
                   "ssim": jnp.sum(m * ssim_per_image(a, b)),
                   "l1": jnp.sum(m * jnp.mean(jnp.abs(x - x_rec), axis=(1, 2, 3))),
                   "z_sum": jnp.sum(m[:, None, None, None] * z),
                   "z_sq": jnp.sum(m[:, None, None, None] * jnp.square(z)),
                   "z_count": jnp.sum(m) * float(np.prod(z.shape[1:]))}
            if use_lpips:
                out["lpips"] = jnp.sum(m * losses.lpips_per_image(lpips, lpips_params, x, x_rec))
            if kind == "vq":
                idx = jnp.where(mask[:, None, None], enc.indices, num_codes)
                out["code_counts"] = jnp.bincount(idx.reshape(-1), length=num_codes + 1)[:num_codes]
            return out

        return jax.jit(fn, out_shardings=shd.replicated(self.mesh))

    def evaluate(self, state, step: int) -> Dict[str, Any]:
        """Held-out metrics (see the module docstring); sets ``scale_factor`` and writes the
        JSON / TensorBoard / grid outputs on process 0 when the task has a workdir."""
        batches = self._eval_data()
        if self._eval_fn is None:
            self._eval_fn = self._make_eval_fn()
        params = self._ae_params(state)
        totals: Dict[str, np.ndarray] = {}
        for i, hb in enumerate(batches):
            dev = shd.shard_batch({"image": hb["image"], "mask": hb["mask"]}, self.mesh)
            rng = jax.random.fold_in(jax.random.PRNGKey(1234), i)
            out = jax.device_get(self._eval_fn(params, self.frozen["lpips"], dev["image"], dev["mask"], rng))
            for k, v in out.items():
                totals[k] = totals.get(k, 0) + np.asarray(v, np.float64)
        n = float(totals["count"])
        result: Dict[str, Any] = {"step": int(step), "num_images": int(n)}
        for k in ("psnr", "ssim", "l1", "lpips"):
            if k in totals:
                result[k] = float(totals[k] / n)
        zc = float(totals["z_count"])
        mean = totals["z_sum"] / zc
        var = (totals["z_sq"] - zc * mean ** 2) / max(zc - 1.0, 1.0)  # unbiased, as torch.std
        result["latent_std"] = float(math.sqrt(max(var, 1e-20)))
        result["scale_factor"] = 1.0 / result["latent_std"]
        if "code_counts" in totals:
            result["codebook_usage"], result["codebook_perplexity"] = perplexity_from_counts(totals["code_counts"])
        result.update(self._baselines(batches))
        self.scale_factor = result["scale_factor"]
        self.last_eval = result
        self._evaluated_step = int(step)
        if jax.process_index() == 0:
            log.info("eval step %d: %s", step, ", ".join(f"{k}={v:.4g}" for k, v in result.items()
                                                         if isinstance(v, float)))
            self._write_eval(result, state, step)
        return result

    @staticmethod
    def _baselines(batches) -> Dict[str, float]:
        """PSNR of predicting the eval set's mean image, and a blank white image."""
        imgs = np.concatenate([b["image"][b["mask"]] for b in batches]).astype(np.float64) / 255.0
        mean_img = imgs.mean(axis=0, keepdims=True)

        def psnr(pred):
            mse = np.mean((imgs - pred) ** 2, axis=(1, 2, 3))
            return float(np.mean(10.0 * np.log10(1.0 / np.maximum(mse, 1e-12))))

        return {"baseline_psnr_mean_image": psnr(mean_img), "baseline_psnr_white": psnr(np.ones_like(mean_img))}

    def _write_eval(self, result, state, step: int) -> None:
        if not self.workdir:
            return
        from ldm_jax.training.loop import save_image_grid

        os.makedirs(os.path.join(self.workdir, "eval"), exist_ok=True)
        with open(os.path.join(self.workdir, "eval", f"step_{step}.json"), "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
        try:
            if self._tb is None:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(os.path.join(self.workdir, "tb"))
            for k, v in result.items():
                if isinstance(v, float) and k != "step":
                    self._tb.add_scalar(f"eval/{k}", v, step)
            self._tb.flush()
        except ImportError:  # pragma: no cover
            pass
        grid = self.sample(state, step)
        if grid is not None:
            save_image_grid(grid, os.path.join(self.workdir, "samples", f"recon_step_{step:07d}.png"),
                            ncol=min(8, grid.shape[0]))


# ----------------------------------------------------------------------------- loading


def is_autoencoder_workdir(path: str) -> bool:
    """True for a train.py workdir (or its checkpoints/ folder) holding first-stage checkpoints."""
    try:
        _latest(path)
    except (FileNotFoundError, ValueError):
        return False
    return True


def _checkpoint_dir(path: str) -> str:
    sub = os.path.join(path, "checkpoints")
    return sub if os.path.isdir(sub) else path


def _latest(path: str) -> Tuple[str, int, Dict[str, Any]]:
    """(checkpoint dir, latest step, its extra JSON) of an autoencoder run."""
    import orbax.checkpoint as ocp

    from ldm_jax.training.checkpoint import EXTRA

    directory = os.path.abspath(_checkpoint_dir(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{path}: not a training workdir (no checkpoints/ folder)")
    steps = sorted(int(s) for s in os.listdir(directory) if s.isdigit())
    if not steps:
        raise FileNotFoundError(f"{directory}: no finished checkpoint")
    step = steps[-1]
    with ocp.CheckpointManager(directory, item_handlers=_read_handlers()) as manager:
        extra = manager.restore(step, args=ocp.args.Composite(**{EXTRA: ocp.args.JsonRestore()}))[EXTRA]
    extra = dict(extra or {})
    if extra.get("task") != "autoencoder" or "autoencoder_config" not in extra:
        raise ValueError(f"{directory}: step {step} is not an autoencoder checkpoint")
    return directory, step, extra


def _read_handlers():
    """Handlers for both items of a training checkpoint (``training.checkpoint``): with item names only,
    orbax warns about every item a restore leaves out ("found in the checkpoint, but could not be restored")."""
    import orbax.checkpoint as ocp

    from ldm_jax.training.checkpoint import EXTRA, STATE

    return {STATE: ocp.StandardCheckpointHandler(), EXTRA: ocp.JsonCheckpointHandler()}


def load_autoencoder_from_workdir(workdir: str, *, dtype=jnp.float32, attention_impl: str = "xla",
                                  use_ema: bool = True):
    """(module, params, scale_factor) from the latest checkpoint of an autoencoder run.

    ``params`` are the EMA weights when the run kept an EMA (and ``use_ema``), else the
    trained ones, as numpy-backed arrays on the default device; ``scale_factor`` is the
    run's suggestion (1 / std of the eval latents) or None when no eval ran. The module's
    ``config.scaling_factor`` carries it too (when known).
    """
    import orbax.checkpoint as ocp

    from ldm_jax.training.checkpoint import STATE

    directory, step, extra = _latest(workdir)
    fields = dict(extra["autoencoder_config"])
    scale_factor = extra.get("scale_factor")
    if scale_factor is not None:
        fields["scaling_factor"] = float(scale_factor)
    ae_config = AutoencoderConfig(**fields)
    module = build_autoencoder(ae_config, attention_impl=attention_impl, dtype=dtype)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    with ocp.CheckpointManager(directory, item_handlers=_read_handlers()) as manager:
        meta = manager.item_metadata(step)[STATE]
        target = jax.tree_util.tree_map(
            lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=device), meta,
            is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype"))
        state = manager.restore(step, args=ocp.args.Composite(**{STATE: ocp.args.StandardRestore(target)}))[STATE]
    params = state.get("ema_params") if use_ema else None
    params = params if params else state["params"]
    return module, params["autoencoder"], (None if scale_factor is None else float(scale_factor))


def _ldm_loader(path: str, dtype=jnp.float32, attention_impl: str = "xla"):
    module, params, _ = load_autoencoder_from_workdir(path, dtype=dtype, attention_impl=attention_impl)
    return module, params


def register_with_ldm_task() -> None:
    """Let ``first_stage.checkpoint`` of the LDM task point at an autoencoder workdir."""
    from ldm_jax.training import ldm_task

    if not any(loader is _ldm_loader for _, loader in ldm_task.FIRST_STAGE_LOADERS):
        ldm_task.register_first_stage_loader(is_autoencoder_workdir, _ldm_loader)


register_with_ldm_task()
