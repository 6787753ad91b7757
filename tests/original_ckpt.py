"""Tiny random-weight checkpoints in the original CompVis / Stability single-file format.

Every model is built from the original modules that stable-diffusion-sdkit ships
(``ldm.modules.diffusionmodules.openaimodel.UNetModel``,
``ldm.modules.diffusionmodules.model.Encoder/Decoder``) or, for the text
encoders, from transformers / open_clip's TextTransformer; the state dicts are
laid out under the prefixes ``LatentDiffusion`` uses. ``ldm.models.*`` is not
imported (it needs pytorch_lightning). Nothing is downloaded.
"""
from __future__ import annotations

import importlib.util
import os
import sys
import types
from typing import Dict, Optional

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIGS = os.path.join(HERE, "original_configs")


def perturb(module: torch.nn.Module, seed: int, scale: float = 0.05) -> None:
    """Add noise to every parameter (zero-initialised out layers and norm gains included)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def unet_model(seed: int, **kwargs) -> torch.nn.Module:
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    torch.manual_seed(seed)
    model = UNetModel(**kwargs).eval()
    perturb(model, seed + 1)
    return model


class FirstStage(torch.nn.Module):
    """The parameter layout of ldm.models.autoencoder.AutoencoderKL / VQModelInterface
    (encoder, decoder, quant_conv, post_quant_conv[, quantize.embedding]) with the
    inference math of both (LatentDiffusion.encode_first_stage / decode_first_stage)."""

    def __init__(self, ddconfig: dict, embed_dim: int, n_embed: Optional[int] = None):
        super().__init__()
        from ldm.modules.diffusionmodules.model import Decoder, Encoder

        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        z = ddconfig["z_channels"]
        self.kind = "kl" if n_embed is None else "vq"
        if self.kind == "kl":
            self.quant_conv = torch.nn.Conv2d(2 * z, 2 * embed_dim, 1)
        else:
            self.quantize = torch.nn.Module()
            self.quantize.embedding = torch.nn.Embedding(n_embed, embed_dim)
            self.quant_conv = torch.nn.Conv2d(z, embed_dim, 1)
        self.post_quant_conv = torch.nn.Conv2d(embed_dim, z, 1)

    def encode(self, x):
        """KL: (mean, logvar clamped to [-30, 20]); VQ: the pre-quantisation latents."""
        h = self.quant_conv(self.encoder(x))
        if self.kind == "vq":
            return h
        mean, logvar = torch.chunk(h, 2, dim=1)
        return mean, torch.clamp(logvar, -30.0, 20.0)

    def quantize_latents(self, h):
        """taming VectorQuantizer2 (legacy) forward value: nearest codebook entry by
        ||z||^2 + ||e||^2 - 2 z.e, returned with the indices."""
        b, c, hh, ww = h.shape
        z = h.permute(0, 2, 3, 1).reshape(-1, c)
        e = self.quantize.embedding.weight
        d = (z ** 2).sum(1, keepdim=True) + (e ** 2).sum(1) - 2 * z @ e.t()
        idx = torch.argmin(d, dim=1)
        zq = e[idx].reshape(b, hh, ww, c).permute(0, 3, 1, 2)
        return zq, idx.reshape(b, hh, ww)

    def decode(self, z):
        if self.kind == "vq":  # VQModelInterface.decode(force_not_quantize=False)
            z, _ = self.quantize_latents(z)
        return self.decoder(self.post_quant_conv(z))


def first_stage(seed: int, ddconfig: dict, embed_dim: int, n_embed: Optional[int] = None) -> FirstStage:
    torch.manual_seed(seed)
    model = FirstStage(ddconfig, embed_dim, n_embed).eval()
    perturb(model, seed + 1)
    if n_embed is not None:  # codebook on the scale of the latents, so every code can win
        with torch.no_grad():
            model.quantize.embedding.weight.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(seed + 2))
    return model


def clip_text_model(seed: int, hidden: int = 64, layers: int = 2, quick_gelu: bool = True):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    model = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64), max_position_embeddings=77,
        hidden_act="quick_gelu" if quick_gelu else "gelu", bos_token_id=49406, eos_token_id=49407,
        pad_token_id=1)).eval()
    perturb(model, seed + 1)
    return model


def load_open_clip_transformer():
    """open_clip/transformer.py loaded by file path (the package imports torchvision)."""
    name = "_open_clip_original_ref"
    if name + ".transformer" in sys.modules:
        return sys.modules[name + ".transformer"]
    root = os.path.dirname(importlib.util.find_spec("open_clip").origin)
    pkg = types.ModuleType(name)
    pkg.__path__ = [root]
    utils = types.ModuleType(name + ".utils")

    def _unused(*args, **kwargs):
        raise NotImplementedError("stand-in for open_clip.utils")

    utils.to_2tuple = utils.feature_take_indices = _unused
    sys.modules[name] = pkg
    sys.modules[name + ".utils"] = utils
    for sub in ("pos_embed", "transformer"):
        spec = importlib.util.spec_from_file_location(f"{name}.{sub}", os.path.join(root, sub + ".py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return sys.modules[name + ".transformer"]


def open_clip_text_model(seed: int, width: int = 128, layers: int = 3):
    """An open_clip TextTransformer as FrozenOpenCLIPEmbedder holds it (ViT-H-14 layout, tiny)."""
    oc = load_open_clip_transformer()
    torch.manual_seed(seed)
    model = oc.TextTransformer(context_length=77, vocab_size=49408, width=width, heads=width // 64, layers=layers,
                               mlp_ratio=2.0, output_dim=width, output_tokens=True).eval()
    perturb(model, seed + 1)
    return model


def open_clip_context(model, ids: np.ndarray, layer: str = "penultimate") -> np.ndarray:
    """FrozenOpenCLIPEmbedder.encode_with_transformer (batch-first blocks of current open_clip)."""
    text = torch.from_numpy(np.asarray(ids)).long()
    skip = 1 if layer == "penultimate" else 0
    with torch.no_grad():
        x = model.token_embedding(text) + model.positional_embedding
        for block in model.transformer.resblocks[:len(model.transformer.resblocks) - skip]:
            x = block(x, attn_mask=model.attn_mask)
        return model.ln_final(x).numpy()


def ldm_state_dict(unet=None, first=None, cond=None, cond_prefix: str = "cond_stage_model.",
                   betas: Optional[np.ndarray] = None, ema_seed: Optional[int] = None) -> Dict[str, np.ndarray]:
    """A LatentDiffusion state dict: model.diffusion_model.*, first_stage_model.*,
    cond_stage_model.*, the schedule buffers, and optional model_ema.* copies
    (the U-Net weights plus noise, keyed with the dots removed, as LitEma stores them)."""
    sd: Dict[str, np.ndarray] = {}
    for prefix, module in (("model.diffusion_model.", unet), ("first_stage_model.", first), (cond_prefix, cond)):
        if module is not None:
            sd.update({prefix + k: v.detach().numpy().copy() for k, v in module.state_dict().items()})
    if betas is not None:
        sd["betas"] = betas.astype(np.float32)
        alphas_cumprod = np.cumprod(1.0 - betas)
        sd["alphas_cumprod"] = alphas_cumprod.astype(np.float32)
        sd["sqrt_alphas_cumprod"] = np.sqrt(alphas_cumprod).astype(np.float32)
    if ema_seed is not None:
        rng = np.random.default_rng(ema_seed)
        for k in [k for k in sd if k.startswith("model.diffusion_model.")]:
            sd["model_ema." + k[len("model."):].replace(".", "")] = (
                sd[k] + 0.05 * rng.standard_normal(sd[k].shape)).astype(np.float32)
        sd["model_ema.decay"] = np.asarray(0.9999, np.float32)
        sd["model_ema.num_updates"] = np.asarray(1000, np.int32)
    return sd


def save_ckpt(path: str, state_dict: Dict[str, np.ndarray], global_step: int = 1000) -> str:
    """torch.save in the LatentDiffusion/Lightning layout: {"state_dict": ..., "global_step": ...}."""
    torch.save({"state_dict": {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state_dict.items()},
                "global_step": global_step, "epoch": 3}, path)
    return path


def save_safetensors(path: str, state_dict: Dict[str, np.ndarray]) -> str:
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in state_dict.items()}, path)
    return path


# ----------------------------------------------------------------------------- the original LatentDiffusion


def import_ldm_ddpm():
    """``ldm.models.diffusion.ddpm`` (LatentDiffusion, DiffusionWrapper) and ``ldm.models.diffusion.ddim``.

    ddpm.py imports pytorch_lightning (for ``LightningModule`` as a base class and
    ``rank_zero_only``) and torchvision (``make_grid``, for logging only), which the
    test environment does not install. For the import only, stand-ins are put in
    ``sys.modules``: ``LightningModule`` is ``torch.nn.Module`` plus the ``device``
    property the DDIM sampler reads; they are removed again afterwards so that
    other packages' optional-dependency checks do not see them.
    """
    if "ldm.models.diffusion.ddpm" in sys.modules:
        return sys.modules["ldm.models.diffusion.ddpm"], sys.modules["ldm.models.diffusion.ddim"]

    class LightningModule(torch.nn.Module):
        @property
        def device(self):
            return next(self.parameters()).device

    pl = types.ModuleType("pytorch_lightning")
    pl.LightningModule = LightningModule
    utilities = types.ModuleType("pytorch_lightning.utilities")
    distributed = types.ModuleType("pytorch_lightning.utilities.distributed")
    distributed.rank_zero_only = lambda fn: fn
    pl.utilities, utilities.distributed = utilities, distributed
    tv = types.ModuleType("torchvision")
    tv_utils = types.ModuleType("torchvision.utils")
    tv_utils.make_grid = None
    tv.utils = tv_utils
    stubs = {"pytorch_lightning": pl, "pytorch_lightning.utilities": utilities,
             "pytorch_lightning.utilities.distributed": distributed, "torchvision": tv,
             "torchvision.utils": tv_utils}
    added = [name for name in stubs if name not in sys.modules]
    sys.modules.update({name: stubs[name] for name in added})
    try:
        import ldm.models.diffusion.ddim as ddim
        import ldm.models.diffusion.ddpm as ddpm
    finally:
        for name in added:
            sys.modules.pop(name, None)
    return ddpm, ddim


class SpatialRescalerReference(torch.nn.Module):
    """The semantic-synthesis cond stage ``ldm.modules.encoders.modules.SpatialRescaler`` of CompVis
    latent-diffusion, which stable-diffusion-sdkit's ``ldm`` (from the SD 2 repository) does not ship:
    ``n_stages`` calls of ``F.interpolate(x, scale_factor=multiplier, mode=method)`` (align_corners and
    antialias left at their defaults), then, with ``out_channels``, a 1x1 ``nn.Conv2d`` named
    ``channel_mapper``. Same constructor arguments and parameter names, so its state dict has the
    original keys."""

    def __init__(self, n_stages=1, method="bilinear", multiplier=0.5, in_channels=3, out_channels=None, bias=False):
        super().__init__()
        assert n_stages >= 0 and method in ("nearest", "linear", "bilinear", "trilinear", "bicubic", "area")
        self.n_stages, self.method, self.multiplier = n_stages, method, multiplier
        self.remap_output = out_channels is not None
        if self.remap_output:
            self.channel_mapper = torch.nn.Conv2d(in_channels, out_channels, 1, bias=bias)

    def forward(self, x):
        for _ in range(self.n_stages):
            x = torch.nn.functional.interpolate(x, scale_factor=self.multiplier, mode=self.method)
        return self.channel_mapper(x) if self.remap_output else x

    def encode(self, x):  # what LatentDiffusion.get_learned_conditioning calls
        return self(x)


def latent_diffusion(yaml_file: str, seed: int, cond_stage_config=None):
    """The original ``LatentDiffusion`` of a YAML (``model.target``'s parameters), eval mode,
    every parameter perturbed. ``cond_stage_config`` replaces the YAML's (e.g.
    ``torch.nn.Identity`` for a text encoder that would be downloaded)."""
    import contextlib
    import io

    from omegaconf import OmegaConf

    ddpm, _ = import_ldm_ddpm()
    cfg = OmegaConf.load(yaml_file).model
    params = cfg.params
    if cond_stage_config is not None:
        params.cond_stage_config = cond_stage_config
    name = cfg.target.rsplit(".", 1)[-1]
    cond = params.get("cond_stage_config")
    if not isinstance(cond, str) and cond is not None and cond.target.endswith(".SpatialRescaler"):
        # not in sdkit's ldm (whose encoders module would also need torchvision): the reference, same params
        cond.target = f"{SpatialRescalerReference.__module__}.{SpatialRescalerReference.__name__}"
    torch.manual_seed(seed)
    with contextlib.redirect_stdout(io.StringIO()):  # it prints parameter counts and modes
        model = getattr(ddpm, name)(**params).eval()
    perturb(model, seed + 1)
    return model


class one_torch_thread:
    """Run torch on one thread: the tiny reference models are dominated by thread
    hand-offs, which cost seconds per call on a loaded 2-core machine."""

    def __enter__(self):
        self.threads = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.threads)


def ddim_sample(model, x_T: torch.Tensor, steps: int, cond=None, uncond=None, scale: float = 1.0):
    """The original ``DDIMSampler.sample`` (eta 0) from ``x_T`` (B, C, h, w) -> final latents."""
    import contextlib
    import io

    _, ddim = import_ldm_ddpm()
    sampler = ddim.DDIMSampler(model)
    with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()), one_torch_thread():
        z, _ = sampler.sample(S=steps, batch_size=x_T.shape[0], shape=tuple(x_T.shape[1:]), conditioning=cond,
                              x_T=x_T, eta=0.0, verbose=False, unconditional_guidance_scale=scale,
                              unconditional_conditioning=uncond)
    return z
