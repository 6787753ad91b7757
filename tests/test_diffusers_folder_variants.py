"""``ldm_jax.load_pipeline(folder)`` on diffusers folders as users have them on disk: weights as
.safetensors or torch .bin, stored in float16 / bfloat16, ``variant="fp16"`` files (alone or next to
the plain ones), sharded with an index json, model_index.json with null / missing / extra entries,
old and new unet config keys, Hugging Face cache-style symlinks, SD2-v; and the folders that must
be refused with an error naming the file or component (SDXL, missing folders, truncated files).

All folders derive from one tiny random-weight SD pipeline (tiny_sd.py), saved per component with
diffusers / transformers ``save_pretrained``. A lossless variant must give exactly the parameters
of the plain folder (whose outputs test_pipeline.py checks against diffusers); float16 / bfloat16
folders those parameters rounded through the stored dtype; forward passes are compared with the
diffusers / transformers models that ``from_pretrained`` loads from the same folder.
"""
import copy
import json
import os
import shutil

import jax
import ml_dtypes
import numpy as np
import pytest
import torch

import ldm_jax
from ldm_jax.convert.errors import CheckpointError
from ldm_jax.convert.unet_diffusers import load_unet
from tiny_sd import nchw, nhwc, tiny_sd_pipeline

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".json")
COMPONENTS = ("unet", "vae", "text_encoder")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("sd_variants")


@pytest.fixture(scope="module")
def ref(root):
    """The float32 diffusers pipeline the plain folder was saved from."""
    return tiny_sd_pipeline(str(root / "base"), seed=1)


@pytest.fixture(scope="module")
def base_params(root, ref):
    return jax.tree_util.tree_map(np.asarray, ldm_jax.load_pipeline(str(root / "base")).params)


def _clear_weights(folder):
    for name in os.listdir(folder):
        if name != "config.json" and name.endswith(WEIGHT_SUFFIXES):
            os.remove(os.path.join(folder, name))


def derive(root, ref, name, dtype=None, keep_plain=False, components=COMPONENTS, **save_kw):
    """A copy of the base folder whose ``components`` are re-saved with ``save_pretrained(**save_kw)``
    (cast to ``dtype`` first); ``keep_plain`` leaves the plain weight files next to them."""
    folder = root / name
    if folder.exists():
        return str(folder)
    shutil.copytree(root / "base", folder)
    for comp in components:
        sub = str(folder / comp)
        if not keep_plain:
            _clear_weights(sub)
        model = copy.deepcopy(getattr(ref, comp))
        if dtype is not None:
            model = model.to(dtype)
        if comp == "text_encoder" and save_kw.get("safe_serialization") is False:
            # transformers 5 always writes safetensors; older versions wrote pytorch_model.bin
            torch.save(model.state_dict(), os.path.join(sub, "pytorch_model.bin"))
            model.config.save_pretrained(sub)
        else:
            model.save_pretrained(sub, **save_kw)
    return str(folder)


def _assert_params(got, want, cast=None):
    flat_got = jax.tree_util.tree_flatten_with_path(got)[0]
    flat_want = dict(jax.tree_util.tree_flatten_with_path(want)[0])
    assert len(flat_got) == len(flat_want)
    for path, leaf in flat_got:
        expect = flat_want[path]
        if cast is not None:
            expect = expect.astype(cast).astype(np.float32)
        assert leaf.dtype == np.float32, path
        np.testing.assert_array_equal(np.asarray(leaf), expect, err_msg=jax.tree_util.keystr(path))


# --- lossless and lossy storage formats: the parameters of the plain folder ---------------------

FORMATS = {
    "bin": dict(safe_serialization=False),
    "sharded": dict(max_shard_size="20KB"),
    "sharded_bin": dict(max_shard_size="20KB", safe_serialization=False),
    "fp16": dict(dtype=torch.float16),
    "bf16": dict(dtype=torch.bfloat16),
    "fp16_bin": dict(dtype=torch.float16, safe_serialization=False),
    "bf16_sharded": dict(dtype=torch.bfloat16, max_shard_size="20KB"),
}
CASTS = {torch.float16: np.float16, torch.bfloat16: ml_dtypes.bfloat16}


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_storage_formats_give_the_plain_parameters(root, ref, base_params, fmt):
    kw = dict(FORMATS[fmt])
    folder = derive(root, ref, fmt, **kw)
    pipe = ldm_jax.load_pipeline(folder)
    _assert_params(pipe.params, base_params, cast=CASTS.get(kw.get("dtype")))


_JITTED = {}


def _apply(module, params, *args, **kw):
    """``module.apply`` jitted once per module configuration (cheaper than eager apply here, and
    shared by the folders of one architecture)."""
    key = (repr(module), tuple(sorted(kw.items())))
    if key not in _JITTED:
        _JITTED[key] = jax.jit(lambda p, *a: module.apply({"params": p}, *a, **kw))
    return _JITTED[key](params, *args)


def _forward_errors(pipe, unet, vae, text_encoder, seed=0):
    """Max abs differences of the U-Net, VAE encode/decode and text encoder outputs (float32)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
    t = np.array([3, 911], np.int32)
    ctx = rng.standard_normal((2, 5, 32)).astype(np.float32)
    img = rng.uniform(-1, 1, (1, 16, 16, 3)).astype(np.float32)
    ids = np.array([[49406, 320, 1000, 49407, 49407], [49406, 5, 6, 7, 49407]], np.int32)
    p = pipe.params
    with torch.no_grad():
        errs = {
            "unet": _apply(pipe.unet, p["unet"], x, t, ctx)
            - nhwc(unet(nchw(x), torch.from_numpy(t).long(), torch.from_numpy(ctx)).sample),
            "encode": _apply(pipe.vae, p["vae"], img, method="encode").mean
            - nhwc(vae.encode(nchw(img)).latent_dist.mean),
            "decode": _apply(pipe.vae, p["vae"], x[:1], method="decode") - nhwc(vae.decode(nchw(x[:1])).sample),
            "text": _apply(pipe.text_encoder, p["text_encoder"], ids)
            - text_encoder(torch.from_numpy(ids).long())[0].numpy(),
        }
    return {k: float(np.abs(np.asarray(v)).max()) for k, v in errs.items()}


def test_fp16_folder_matches_diffusers_loading_it(root, ref):
    import diffusers

    folder = derive(root, ref, "fp16", dtype=torch.float16)
    theirs = diffusers.StableDiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float32, safety_checker=None,
                                                               requires_safety_checker=False)
    errs = _forward_errors(ldm_jax.load_pipeline(folder), theirs.unet, theirs.vae, theirs.text_encoder)
    assert max(errs.values()) < 1e-4, errs


# --- variants ------------------------------------------------------------------------------------

def test_variant_files_next_to_plain_ones(root, ref):
    """The U-Net's fp16 variant holds other weights than its plain file; the VAE and text encoder
    have no variant. variant="fp16" loads the U-Net variant and falls back to the plain files
    elsewhere (diffusers' variant_compatible_siblings); no variant loads the plain files."""
    import diffusers

    folder = root / "variant_mixed"
    if not folder.exists():
        shutil.copytree(root / "base", folder)
        other = copy.deepcopy(ref.unet)
        with torch.no_grad():
            for i, q in enumerate(other.parameters()):
                q.mul_(0.5 + 0.01 * (i % 7))
        other.half().save_pretrained(str(folder / "unet"), variant="fp16")
    folder = str(folder)
    theirs = diffusers.StableDiffusionPipeline.from_pretrained(
        folder, variant="fp16", torch_dtype=torch.float32, safety_checker=None, requires_safety_checker=False)
    ours = ldm_jax.load_pipeline(folder, variant="fp16")
    errs = _forward_errors(ours, theirs.unet, theirs.vae, theirs.text_encoder)
    assert max(errs.values()) < 1e-4, errs
    plain = ldm_jax.load_pipeline(folder)
    errs = _forward_errors(plain, ref.unet, ref.vae, ref.text_encoder)
    assert max(errs.values()) < 1e-4, errs


def test_variant_only_folder(root, ref, base_params):
    folder = derive(root, ref, "variant_only", dtype=torch.float16, variant="fp16")
    # the U-Net alone: diffusion_pytorch_model.fp16.safetensors
    _, unet_params = load_unet(os.path.join(folder, "unet"), variant="fp16")
    _assert_params(jax.tree_util.tree_map(np.asarray, unet_params), base_params["unet"], cast=np.float16)
    # without variant=: refused (as by diffusers), naming the file and the argument to pass
    with pytest.raises(CheckpointError, match=r"unet: no weight file found .*diffusion_pytorch_model\.fp16\."
                                              r"safetensors: load it with variant='fp16'"):
        ldm_jax.load_pipeline(folder)
    # a variant that no component has: refused, naming what is there
    with pytest.raises(CheckpointError, match=r"no weight files of variant='bf16'.*variants present: fp16"):
        ldm_jax.load_pipeline(folder, variant="bf16")
    with pytest.raises(CheckpointError, match=r"no weight files of variant='fp16'.*only plain files"):
        ldm_jax.load_pipeline(str(root / "base"), variant="fp16")
    with pytest.raises(ValueError, match="variant must be a file-name tag"):
        ldm_jax.load_pipeline(folder, variant="../fp16")


def test_variant_only_pipeline_loads(root, ref, base_params):
    folder = derive(root, ref, "variant_only", dtype=torch.float16, variant="fp16")
    _assert_params(ldm_jax.load_pipeline(folder, variant="fp16").params, base_params, cast=np.float16)


def test_sharded_variant_new_and_legacy_index_names(root, ref, base_params):
    folder = derive(root, ref, "sharded_variant", dtype=torch.float16, variant="fp16", max_shard_size="20KB",
                    components=("unet", "vae"))
    unet_dir = os.path.join(folder, "unet")
    assert os.path.isfile(os.path.join(unet_dir, "diffusion_pytorch_model.safetensors.index.fp16.json"))
    pipe = ldm_jax.load_pipeline(folder, variant="fp16")  # text_encoder: no variant, plain files
    _assert_params(pipe.params["unet"], base_params["unet"], cast=np.float16)
    _assert_params(pipe.params["vae"], base_params["vae"], cast=np.float16)
    _assert_params(pipe.params["text_encoder"], base_params["text_encoder"])
    # the pre-0.28 diffusers name that diffusers still reads (_fetch_index_file_legacy)
    os.rename(os.path.join(unet_dir, "diffusion_pytorch_model.safetensors.index.fp16.json"),
              os.path.join(unet_dir, "diffusion_pytorch_model.safetensors.fp16.index.json"))
    _, unet_params = load_unet(unet_dir, variant="fp16")
    _assert_params(jax.tree_util.tree_map(np.asarray, unet_params), base_params["unet"], cast=np.float16)


# --- folders as users edit and store them ----------------------------------------------------------

def _edit_json(path, fn):
    with open(path) as f:
        data = json.load(f)
    fn(data)
    with open(path, "w") as f:
        json.dump(data, f, indent=2)


def _hf_cache_style(folder):
    """Every file a relative symlink into a blobs/ folder, as in a Hugging Face cache snapshot."""
    blobs = os.path.join(os.path.dirname(folder), "blobs")
    os.makedirs(blobs, exist_ok=True)
    for i, (d, _, files) in enumerate(os.walk(folder)):
        for j, name in enumerate(files):
            path, blob = os.path.join(d, name), os.path.join(blobs, f"{i}_{j}")
            shutil.move(path, blob)
            os.symlink(os.path.relpath(blob, d), path)


def test_edited_index_and_configs_and_symlinks(root, ref, base_params):
    folder = str(root / "snapshot" / "edited")
    shutil.copytree(root / "base", folder)

    def index(d):
        for key in ("safety_checker", "feature_extractor", "requires_safety_checker"):
            d.pop(key)  # missing optional entries
        d["image_encoder"] = ["transformers", "CLIPVisionModelWithProjection"]  # listed, no folder: unused
        d["controlnet_like_extra"] = ["diffusers", "SomethingElse"]

    old_keys = ("_diffusers_version", "use_linear_projection", "upcast_attention", "class_embed_type",
                "num_class_embeds", "resnet_time_scale_shift", "only_cross_attention", "dual_cross_attention",
                "num_attention_heads", "mid_block_type", "addition_embed_type", "encoder_hid_dim",
                "time_embedding_type", "conv_in_kernel", "conv_out_kernel", "time_cond_proj_dim",
                "attention_type", "dropout", "transformer_layers_per_block", "time_embedding_act_fn")

    def unet(d):  # an old diffusers' config (absent keys take the defaults), plus a future key
        for key in old_keys:
            d.pop(key, None)
        d.update(_diffusers_version="9.0.0", a_future_key={"x": 1}, attention_head_dim=[4, 4])

    _edit_json(os.path.join(folder, "model_index.json"), index)
    _edit_json(os.path.join(folder, "unet", "config.json"), unet)
    _hf_cache_style(folder)
    pipe = ldm_jax.load_pipeline(folder + os.sep)  # trailing slash
    _assert_params(pipe.params, base_params)
    linked = str(root / "linked")
    os.symlink(folder, linked)  # the folder itself a symlink
    _assert_params(ldm_jax.load_pipeline(linked).params, base_params)


def test_sd2_v_prediction_folder():
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        ref = tiny_sd_pipeline(folder, sd2=True, prediction_type="v_prediction", seed=2)
        pipe = ldm_jax.load_pipeline(folder)
        assert pipe.scheduler_config["prediction_type"] == "v_prediction"
        errs = _forward_errors(pipe, ref.unet, ref.vae, ref.text_encoder, seed=2)
    assert max(errs.values()) < 1e-4, errs


# --- refusals name the file or component ------------------------------------------------------------

def _broken(root, name, edit):
    folder = root / "broken" / name
    shutil.copytree(root / "base", folder)
    edit(str(folder))
    return str(folder)


def _sdxl_index(folder):
    _edit_json(os.path.join(folder, "model_index.json"), lambda d: d.update(
        _class_name="StableDiffusionXLPipeline", text_encoder_2=["transformers", "CLIPTextModelWithProjection"],
        tokenizer_2=["transformers", "CLIPTokenizer"]))


def _truncate(rel, keep):
    """Keep the first ``keep`` bytes (negative: drop the last ``-keep``)."""
    def edit(folder):
        path = os.path.join(folder, rel)
        with open(path, "rb") as f:
            blob = f.read()
        with open(path, "wb") as f:
            f.write(blob[:keep])
    return edit


def _dangling(folder):
    path = os.path.join(folder, "vae", "diffusion_pytorch_model.safetensors")
    os.remove(path)
    os.symlink("../../blobs/gone", path)


REFUSED = {
    "sdxl": (_sdxl_index, r"model_index\.json: StableDiffusionXLPipeline has component\(s\) text_encoder_2, "
                          r"tokenizer_2 \(Stable Diffusion XL\)"),
    "sdxl_unet": (lambda f: _edit_json(os.path.join(f, "unet", "config.json"), lambda d: d.update(
        addition_embed_type="text_time")), r"unet/config\.json: unsupported value addition_embed_type='text_time'"),
    "no_tokenizer_folder": (lambda f: shutil.rmtree(os.path.join(f, "tokenizer")),
                            r"model_index\.json: lists component 'tokenizer' \(transformers/CLIPTokenizer\) but "
                            r"its folder .*tokenizer is missing"),
    "no_unet_folder": (lambda f: shutil.rmtree(os.path.join(f, "unet")),
                       r"lists component 'unet' .* is missing"),
    "no_unet_entry": (lambda f: _edit_json(os.path.join(f, "model_index.json"), lambda d: d.pop("unet")),
                      r"model_index\.json: no 'unet' component"),
    "null_text_encoder": (lambda f: _edit_json(os.path.join(f, "model_index.json"),
                                               lambda d: d.update(text_encoder=[None, None])),
                          r"model_index\.json: the U-Net has cross-attention .* no text_encoder"),
    "truncated_unet": (_truncate("unet/diffusion_pytorch_model.safetensors", -100),
                       r"unet/diffusion_pytorch_model\.safetensors: truncated"),
    "truncated_text_encoder": (_truncate("text_encoder/model.safetensors", 30),
                               r"text_encoder/model\.safetensors: not a safetensors file or truncated"),
    "truncated_config": (_truncate("vae/config.json", 20), r"vae/config\.json: invalid JSON"),
    "dangling_symlink": (_dangling, r"vae: no weight file found .*diffusion_pytorch_model\.safetensors is a broken "
                                    r"link to \.\./\.\./blobs/gone"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_refused_with_the_file_named(root, ref, case):
    edit, message = REFUSED[case]
    folder = _broken(root, case, edit)
    with pytest.raises(CheckpointError, match=message):
        ldm_jax.load_pipeline(folder)
