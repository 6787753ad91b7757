"""The files ``save_unet`` / ``save_vae`` / ``save_text_encoder`` leave in a component folder, what
``read_state_dict`` takes a file to be, and what a VQ export cannot carry over to diffusers.

* Exporting into a folder that already holds weights (another variant, a sharded checkpoint with its
  index, a torch ``.bin``, written by diffusers / transformers ``save_pretrained``): diffusers reads a
  sharded safetensors index before the single file, and any loader given ``variant=`` or
  ``use_safetensors=False`` reads those other copies. After an export every loader (diffusers /
  transformers ``from_pretrained`` in its default, variant and .bin modes, ldm_jax's ``load_*``) must
  read the new weights or find none; other files in the folder stay as they were.
* ``read_state_dict`` reads safetensors and torch.save files by their content, whatever their names.
* diffusers' ``VQModel`` fixes its quantizer at beta 0.25 with the legacy loss: other values export
  with identical encode / decode and a warning naming the field and what changes (the commitment loss).
"""
import dataclasses
import json
import os
import pickle
import warnings

import jax
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file as save_numpy

from ldm_jax.convert import export
from ldm_jax.convert.clip_transformers import load_text_encoder, text_abstract_params
from ldm_jax.convert.errors import CheckpointError
from ldm_jax.convert.unet_diffusers import load_unet, unet_abstract_params
from ldm_jax.convert.vae_diffusers import load_vae
from ldm_jax.convert.weights_io import read_state_dict
from ldm_jax.models.autoencoder import AutoencoderConfig, abstract_params, build_autoencoder
from ldm_jax.models.clip import CLIPTextConfig, CLIPTextModel
from ldm_jax.models.unet import UNet, UNetConfig

UNRELATED = {"README.md": b"notes", "ema.safetensors": b"not ours", "notes.bin": b"x", "model.onnx": b"onnx"}


def random_params(shapes, seed):
    """Nonzero numpy parameters of the abstract shapes (a stale copy differs in every tensor)."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda s: (0.1 + 0.1 * rng.standard_normal(s.shape)).astype(np.float32), shapes)


def _components():
    import diffusers
    import transformers

    CA, CU, D, U = "CrossAttnDownBlock2D", "CrossAttnUpBlock2D", "DownBlock2D", "UpBlock2D"
    unet = UNet(UNetConfig(block_out_channels=(8, 16), norm_num_groups=4, layers_per_block=1,
                           down_block_types=(CA, D), up_block_types=(U, CU), num_heads=2, cross_attention_dim=8))
    vae = build_autoencoder(AutoencoderConfig(block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=4))
    te = CLIPTextModel(CLIPTextConfig(vocab_size=50, hidden_size=16, intermediate_size=24, num_layers=1,
                                      num_heads=2, max_position_embeddings=8))
    # name -> (module, abstract params, ldm_jax save, reference class, ldm_jax loader)
    return {
        "unet": (unet, unet_abstract_params(unet), lambda m, p, f: export.save_unet(m, p, f, 8),
                 diffusers.UNet2DConditionModel, load_unet),
        "vae": (vae, abstract_params(vae), lambda m, p, f: export.save_vae(m, p, f, 8), diffusers.AutoencoderKL,
                load_vae),
        "text_encoder": (te, text_abstract_params(te), lambda m, p, f: export.save_text_encoder(m, p, f, 0),
                         transformers.CLIPTextModel, load_text_encoder),
    }


# The layouts an earlier save left: the reference's save_pretrained arguments ("legacy_fp16_shards": its
# fp16 shards renamed to diffusers' legacy STEM-00001-of-0000N.fp16.safetensors / STEM.safetensors.fp16.index.json).
LAYOUTS = {
    "shards": dict(max_shard_size="1KB"),  # diffusers loads the index before the new single file
    "fp16": dict(variant="fp16"),
    "fp16_shards": dict(variant="fp16", max_shard_size="1KB"),
    "legacy_fp16_shards": dict(variant="fp16", max_shard_size="1KB"),
    "bin": dict(safe_serialization=False),
    "bin_shards": dict(safe_serialization=False, max_shard_size="1KB"),
    "fp16_bin": dict(variant="fp16", safe_serialization=False),
}


def _old_files(model, layout, tmp):
    """{name: bytes} of ``model`` saved by its library in ``layout`` (config files left out)."""
    os.makedirs(tmp)
    kw = dict(LAYOUTS[layout])
    bin_te = not hasattr(model, "save_config") and kw.pop("safe_serialization", True) is False
    if bin_te:  # transformers 5 writes safetensors only: torch.save, as transformers 4 did
        sd = {k: v.clone() for k, v in model.state_dict().items()}
        if "max_shard_size" in kw:
            keys = sorted(sd)
            weight_map = {k: f"pytorch_model-0000{1 + (i >= len(keys) // 2)}-of-00002.bin" for i, k in enumerate(keys)}
            for shard in sorted(set(weight_map.values())):
                torch.save({k: sd[k] for k in keys if weight_map[k] == shard}, os.path.join(tmp, shard))
            with open(os.path.join(tmp, "pytorch_model.bin.index.json"), "w") as f:
                json.dump({"metadata": {}, "weight_map": weight_map}, f)
        else:
            torch.save(sd, os.path.join(tmp, f"pytorch_model{'.' + kw['variant'] if 'variant' in kw else ''}.bin"))
    else:
        model.save_pretrained(tmp, **kw)
    out = {}
    for name in sorted(os.listdir(tmp)):
        if name.endswith(("config.json",)) and ".index" not in name:
            continue
        with open(os.path.join(tmp, name), "rb") as f:
            data = f.read()
        if layout == "legacy_fp16_shards":
            if name.endswith(".index.fp16.json"):
                name = name.replace(".index.fp16.json", ".fp16.index.json")
                data = data.replace(b".fp16-", b"-").replace(b".safetensors\"", b".fp16.safetensors\"")
            else:
                name = name.replace(".fp16-", "-").replace(".safetensors", ".fp16.safetensors")
        out[name] = data
    return out


@pytest.fixture(scope="module")
def setups(tmp_path_factory):
    """Per component: module, old and new parameters, the reference model's new state dict, and the
    old weights in every layout."""
    root = tmp_path_factory.mktemp("component_files")
    out = {}
    for name, (module, shapes, save, ref_cls, load) in _components().items():
        old, new = random_params(shapes, 1), random_params(shapes, 2)
        save(module, old, str(root / f"{name}_old"))
        save(module, new, str(root / f"{name}_new"))
        old_model = ref_cls.from_pretrained(str(root / f"{name}_old"))
        new_sd = {k: v.clone() for k, v in ref_cls.from_pretrained(str(root / f"{name}_new")).state_dict().items()}
        files = {layout: _old_files(old_model, layout, str(root / f"{name}_{layout}")) for layout in LAYOUTS}
        out[name] = dict(module=module, old=old, new=new, save=save, ref_cls=ref_cls, load=load, new_sd=new_sd,
                         files=files)
    return out


def _fill(folder, files):
    os.makedirs(folder, exist_ok=True)
    for name, data in files.items():
        with open(os.path.join(folder, name), "wb") as f:
            f.write(data)


def _ref_reads_new_or_nothing(s, folder, **kw):
    """The reference loader reads the new weights, or (kw naming files that are gone) raises."""
    try:
        model = s["ref_cls"].from_pretrained(folder, **kw)
    except (OSError, ValueError, EnvironmentError):
        assert kw, "the default load must succeed"
        return
    got = model.state_dict()
    stale = [k for k, v in s["new_sd"].items() if not torch.equal(got[k], v)]
    assert not stale, f"from_pretrained({kw}) read earlier weights: {stale[:3]}"


def _ldm_reads_new_or_nothing(s, folder, **kw):
    try:
        _, params = s["load"](folder, **kw)
    except CheckpointError:
        assert kw, "the default load must succeed"
        return
    for got, want in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(s["new"])):
        np.testing.assert_array_equal(np.asarray(got), want, err_msg=f"{s['load'].__name__}({kw}) read stale weights")


def _assert_only_new(s, folder, component, others=()):
    """Every loader reads the new weights (or none), and the folder holds the new files and ``others``."""
    _ref_reads_new_or_nothing(s, folder)
    _ref_reads_new_or_nothing(s, folder, variant="fp16")
    if component != "text_encoder":  # transformers 5 reads safetensors only
        _ref_reads_new_or_nothing(s, folder, use_safetensors=False)
    _ldm_reads_new_or_nothing(s, folder)
    _ldm_reads_new_or_nothing(s, folder, variant="fp16")
    written = "model.safetensors" if component == "text_encoder" else "diffusion_pytorch_model.safetensors"
    assert sorted(os.listdir(folder)) == sorted({"config.json", written, *others})


@pytest.mark.parametrize("layout", list(LAYOUTS) + ["all"])
@pytest.mark.parametrize("component", ["unet", "vae", "text_encoder"])
def test_export_replaces_every_earlier_weight_file(setups, component, layout, tmp_path):
    s = setups[component]
    folder = str(tmp_path / component)
    layouts = list(LAYOUTS) if layout == "all" else [layout]
    for name in layouts:
        _fill(folder, s["files"][name])
    _fill(folder, UNRELATED)
    os.makedirs(os.path.join(folder, "diffusion_pytorch_model.safetensors.index.json.d"))  # a folder: kept
    s["save"](s["module"], s["new"], folder)
    _assert_only_new(s, folder, component, [*UNRELATED, "diffusion_pytorch_model.safetensors.index.json.d"])
    for name, data in UNRELATED.items():
        with open(os.path.join(folder, name), "rb") as f:
            assert f.read() == data, name
    assert os.path.isdir(os.path.join(folder, "diffusion_pytorch_model.safetensors.index.json.d"))


def test_stale_index_with_other_shard_names_links_and_broken_json(setups, tmp_path):
    """An index naming shards of any name (they go with it), a corrupt variant index, stale weights that
    are links into a cache's blobs (the links go, the blobs stay), and a text encoder folder's file of
    another library's stem (not the text encoder's: stays)."""
    s = setups["unet"]
    folder = tmp_path / "unet"
    folder.mkdir()
    old_model = s["ref_cls"].from_pretrained(str(_saved(s, "old", tmp_path)))
    old_sd = {k: v.numpy() for k, v in old_model.state_dict().items()}
    keys = sorted(old_sd)
    weight_map = {k: ("old-1.safetensors" if i % 2 else "old-2.safetensors") for i, k in enumerate(keys)}
    for shard in ("old-1.safetensors", "old-2.safetensors"):
        save_numpy({k: old_sd[k] for k in keys if weight_map[k] == shard}, str(folder / shard))
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (folder / "diffusion_pytorch_model.safetensors.index.fp16.json").write_text("{not json")
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    save_numpy(old_sd, str(blobs / "blob"))
    os.symlink("../blobs/blob", folder / "diffusion_pytorch_model.fp16.safetensors")
    os.symlink("../blobs/gone", folder / "diffusion_pytorch_model.bin")  # dangling
    s["save"](s["module"], s["new"], str(folder))
    _assert_only_new(s, str(folder), "unet")
    assert sorted(read_state_dict(str(blobs / "blob"))) == keys  # the cache blob itself untouched

    t = setups["text_encoder"]
    te = tmp_path / "te"
    _fill(str(te), {"diffusion_pytorch_model.safetensors": b"another stem", **t["files"]["fp16"]})
    t["save"](t["module"], t["new"], str(te))
    _assert_only_new(t, str(te), "text_encoder", ["diffusion_pytorch_model.safetensors"])
    assert (te / "diffusion_pytorch_model.safetensors").read_bytes() == b"another stem"


def test_config_link_is_replaced_not_written_through(setups, tmp_path):
    """config.json as a link into a cache blob (Hugging Face snapshots link every file): the export
    replaces the link; the blob, which other snapshots may share, keeps its contents."""
    s = setups["vae"]
    folder = tmp_path / "vae"
    folder.mkdir()
    blob = tmp_path / "config_blob"
    blob.write_text('{"_class_name": "AutoencoderKL"}')
    os.symlink(str(blob), folder / "config.json")
    s["save"](s["module"], s["new"], str(folder))
    assert blob.read_text() == '{"_class_name": "AutoencoderKL"}'
    assert not os.path.islink(folder / "config.json")
    _assert_only_new(s, str(folder), "vae")


def _saved(s, which, tmp_path):
    folder = tmp_path / f"saved_{which}"
    s["save"](s["module"], s[which], str(folder))
    return folder


def test_failed_export_leaves_no_folder_that_loads(setups, tmp_path, monkeypatch):
    """A save that fails half way over an earlier one (here: writing the weights) leaves no config.json,
    so neither diffusers nor ldm_jax loads the folder: never the new config.json over the old weights
    (a model of the new configuration with the earlier weights), as save_diffusers leaves no
    model_index.json."""
    s = setups["unet"]
    folder = str(tmp_path / "unet")
    s["save"](s["module"], s["old"], folder)

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export, "write_safetensors", fail)
    with pytest.raises(OSError, match="No space left"):
        s["save"](s["module"], s["new"], folder)
    monkeypatch.undo()
    with pytest.raises(OSError):
        s["ref_cls"].from_pretrained(folder)
    with pytest.raises(CheckpointError, match="config.json"):
        s["load"](folder)
    s["save"](s["module"], s["new"], folder)  # and a new save succeeds
    _assert_only_new(s, folder, "unet")


def test_refused_export_removes_nothing(setups, tmp_path):
    """A configuration diffusers cannot express is refused before the folder is touched."""
    unet = UNet(UNetConfig(block_out_channels=(8, 16), norm_num_groups=4, layers_per_block=1,
                           down_block_types=("CrossAttnDownBlock2D", "AttnDownBlock2D"),
                           up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), num_heads=2, cross_attention_dim=8))
    folder = str(tmp_path / "unet")
    _fill(folder, setups["unet"]["files"]["fp16"])
    before = sorted(os.listdir(folder))
    with pytest.raises(ValueError, match="mixes cross-attention and self-attention"):
        export.save_unet(unet, random_params(unet_abstract_params(unet), 0), folder, 8)
    assert sorted(os.listdir(folder)) == before


# ----------------------------------------------------------------------------- read_state_dict by content

STATE = {"a.weight": np.arange(6, dtype=np.float32).reshape(3, 2), "b": np.array([1.5, -2.0], np.float16)}


def _safetensors(path):
    save_numpy(STATE, path, metadata={"format": "pt"})


def _safetensors_header_0x80(path):
    """A header size whose first byte is 0x80, a pickle's PROTO opcode."""
    for n in range(300):
        save_numpy(STATE, path, metadata={"format": "pt", "pad": "x" * n})
        with open(path, "rb") as f:
            if f.read(1) == b"\x80":
                return
    raise AssertionError("no header size starting with 0x80")


def _torch(path, **kw):
    torch.save({k: torch.from_numpy(v) for k, v in STATE.items()}, path, **kw)


FORMATS = {
    "safetensors": _safetensors,
    "safetensors_header_0x80": _safetensors_header_0x80,
    "torch_zip": _torch,
    "torch_legacy": lambda p: _torch(p, _use_new_zipfile_serialization=False),
    "lightning": lambda p: torch.save({"state_dict": {k: torch.from_numpy(v) for k, v in STATE.items()},
                                       "global_step": 3}, p),
}
NAMES = ["w.safetensors", "w.SAFETENSORS", "w.bin", "w.ckpt", "w"]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_read_state_dict_reads_by_content(fmt, name, tmp_path):
    path = str(tmp_path / name)
    FORMATS[fmt](path)
    got = read_state_dict(path)
    assert sorted(got) == sorted(STATE)
    for key, value in STATE.items():
        assert got[key].dtype == value.dtype
        np.testing.assert_array_equal(got[key], value)


def test_sharded_index_with_renamed_shards(tmp_path):
    _safetensors(str(tmp_path / "part-1.bin"))  # safetensors content under a .bin name
    _torch(str(tmp_path / "part-2.safetensors"))  # and the other way round
    weight_map = {"a.weight": "part-1.bin", "b": "part-2.safetensors"}
    (tmp_path / "w.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    got = read_state_dict(str(tmp_path / "w.safetensors.index.json"))
    for key, value in STATE.items():
        np.testing.assert_array_equal(got[key], value)


class _RunsCode:
    def __reduce__(self):
        return (os.remove, (self.victim,))


@pytest.mark.parametrize("name", ["w.safetensors", "w.bin", "w"])
@pytest.mark.parametrize("content", ["garbage", "empty", "plain_pickle", "code_pickle", "json"])
def test_read_state_dict_refuses_other_files_naming_them(content, name, tmp_path):
    path = tmp_path / name
    victim = tmp_path / "victim"
    victim.write_text("still here")
    if content == "garbage":
        path.write_bytes(b"not a weight file at all " * 4)
    elif content == "empty":
        path.write_bytes(b"")
    elif content == "json":
        path.write_text('{"weight_map": {}}')
    else:
        obj = {"a": 1}
        if content == "code_pickle":
            obj = _RunsCode()
            obj.victim = str(victim)
        path.write_bytes(pickle.dumps(obj, protocol=2))
    with pytest.raises(CheckpointError) as info:
        read_state_dict(str(path))
    assert str(path) in str(info.value)
    assert victim.read_text() == "still here"  # nothing in the file was run


# ----------------------------------------------------------------------------- VQ quantizer fields

VQ = AutoencoderConfig(kind="vq", block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=4,
                       num_vq_embeddings=8, mid_block_attention=False)


@pytest.mark.parametrize("beta,legacy,fields", [(0.25, True, []), (0.5, True, ["beta=0.5"]),
                                                (0.25, False, ["legacy=False"]),
                                                (1.0, False, ["beta=1.0", "legacy=False"])],
                         ids=["diffusers_values", "beta", "legacy", "both"])
def test_vq_quantizer_fields_diffusers_fixes_warn(beta, legacy, fields, tmp_path):
    """diffusers' VQModel builds VectorQuantizer(beta=0.25) with legacy=True whatever its config: the
    export warns for each other field, names the field and says what differs (only the commitment loss);
    the folder decodes exactly as the ldm_jax model does."""
    import diffusers

    vae = build_autoencoder(dataclasses.replace(VQ, beta=beta, legacy=legacy))
    params = random_params(abstract_params(vae), 3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        export.save_vae(vae, params, str(tmp_path), 8)
    msgs = [str(w.message) for w in caught if str(w.message).startswith("save_vae:")]
    assert len(msgs) == len(fields), msgs
    for field, msg in zip(fields, msgs):
        assert f"AutoencoderConfig.{field}" in msg and "decode" in msg and "loss" in msg, msg
    assert all(w.filename == __file__ for w in caught if str(w.message).startswith("save_vae:"))

    model = diffusers.VQModel.from_pretrained(str(tmp_path)).eval()
    z = np.random.default_rng(0).standard_normal((1, 3, 3, 4)).astype(np.float32)
    with torch.no_grad():
        out = model.decode(torch.from_numpy(z.transpose(0, 3, 1, 2)))
    got = np.asarray(vae.apply({"params": params}, z, method="decode"))
    np.testing.assert_allclose(got, out.sample.permute(0, 2, 3, 1).numpy(), atol=1e-4)
    # both loss forms have the value (1 + beta) * mean((z_q - z)^2): diffusers' with its beta 0.25
    zq, loss, _ = vae.apply({"params": params}, z, method=lambda m, x: m.quantize(x))
    mse = float(np.mean((np.asarray(zq) - z) ** 2))
    np.testing.assert_allclose(float(loss), (1 + beta) * mse, rtol=1e-5)
    np.testing.assert_allclose(float(out.commit_loss.mean()), 1.25 * mse, rtol=1e-5)


def test_kl_autoencoder_ignores_quantizer_fields(tmp_path):
    vae = build_autoencoder(AutoencoderConfig(block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=4,
                                              beta=0.5, legacy=False))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="save_vae")
        export.save_vae(vae, random_params(abstract_params(vae), 0), str(tmp_path), 8)
