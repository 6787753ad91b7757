"""weights_io: safetensors parsing, sharded folders, find_weights, torch files via read_state_dict."""
import json
import os

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import save_file as save_torch

from ldm_jax.convert.errors import CheckpointError
from ldm_jax.convert.weights_io import find_weights, read_json, read_safetensors, read_state_dict


def _tensors(rng):
    return {
        "conv.weight": rng.standard_normal((8, 4, 3, 3)).astype(np.float32),
        "norm.bias": rng.standard_normal(8).astype(np.float16),
        "ids": rng.integers(-2**40, 2**40, (3,)).astype(np.int64),
        "mask": rng.standard_normal(5) > 0,
        "scalar": np.array(2.5, np.float32),
        "empty": np.zeros((0, 4), np.float32),
    }


def test_safetensors_round_trip_f32_f16_int_bool(tmp_path, rng):
    want = _tensors(rng)
    path = str(tmp_path / "model.safetensors")
    save_numpy(want, path, metadata={"format": "np"})
    got = read_state_dict(path)
    assert sorted(got) == sorted(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
        np.testing.assert_array_equal(got[k], v)


def test_safetensors_round_trip_bf16_and_float8_from_torch(tmp_path):
    g = torch.Generator().manual_seed(0)
    want = {"bf": torch.randn(3, 5, generator=g).bfloat16(),
            "f8": torch.randn(4, generator=g).to(torch.float8_e4m3fn),
            "u16": torch.arange(4).to(torch.uint16)}
    path = str(tmp_path / "bf16.safetensors")
    save_torch(want, path)
    got = read_safetensors(path)
    assert got["bf"].dtype == ml_dtypes.bfloat16 and got["f8"].dtype == ml_dtypes.float8_e4m3fn
    np.testing.assert_array_equal(got["bf"].astype(np.float32), want["bf"].float().numpy())
    np.testing.assert_array_equal(got["f8"].astype(np.float32), want["f8"].float().numpy())
    np.testing.assert_array_equal(got["u16"], np.arange(4, dtype=np.uint16))


def test_truncated_and_garbage_safetensors(tmp_path, rng):
    path = tmp_path / "model.safetensors"
    save_numpy(_tensors(rng), str(path))
    blob = path.read_bytes()
    cut = tmp_path / "cut.safetensors"
    for keep in (len(blob) - 10, 200, 12, 3):  # in the data, in the header, in the length
        cut.write_bytes(blob[:keep])
        with pytest.raises(CheckpointError) as info:
            read_state_dict(str(cut))
        msg = str(info.value)
        assert str(cut) in msg and ("truncated" in msg or keep < 8), (keep, msg)

    bad = tmp_path / "bad.safetensors"
    for content in (b"garbage, not a weight file at all" * 10, b"",
                    (2).to_bytes(8, "little") + b"[]",  # a JSON header that is not an object
                    (8).to_bytes(8, "little") + b"\xff\xfe{{{{{{",  # undecodable header
                    ):
        bad.write_bytes(content)
        with pytest.raises(CheckpointError, match="bad.safetensors"):
            read_state_dict(str(bad))
    # offsets that disagree with shape x dtype
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}).encode()
    bad.write_bytes(len(header).to_bytes(8, "little") + header + bytes(16))
    with pytest.raises(CheckpointError, match="header is corrupt"):
        read_state_dict(str(bad))


def _write_sharded(folder, rng, index_name="diffusion_pytorch_model.safetensors.index.json"):
    shard1 = {"a.weight": rng.standard_normal((3, 2)).astype(np.float32)}
    shard2 = {"b.weight": rng.standard_normal(4).astype(np.float16),
              "b.bias": rng.standard_normal(4).astype(np.float16)}
    save_numpy(shard1, str(folder / "model-00001-of-00002.safetensors"))
    save_numpy(shard2, str(folder / "model-00002-of-00002.safetensors"))
    weight_map = {**{k: "model-00001-of-00002.safetensors" for k in shard1},
                  **{k: "model-00002-of-00002.safetensors" for k in shard2}}
    (folder / index_name).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return {**shard1, **shard2}, weight_map


def test_sharded_index_folder(tmp_path, rng):
    want, weight_map = _write_sharded(tmp_path, rng)
    index = find_weights(str(tmp_path), ["diffusion_pytorch_model"])
    assert os.path.basename(index) == "diffusion_pytorch_model.safetensors.index.json"
    got = read_state_dict(index)
    assert sorted(got) == sorted(want)
    for k, v in want.items():
        np.testing.assert_array_equal(got[k], v)

    # the diffusers/transformers variant naming puts the variant before ".json"
    os.rename(index, tmp_path / "diffusion_pytorch_model.safetensors.index.fp16.json")
    vindex = find_weights(str(tmp_path), ["diffusion_pytorch_model"], variant="fp16")
    assert vindex.endswith("diffusion_pytorch_model.safetensors.index.fp16.json")
    assert sorted(read_state_dict(vindex)) == sorted(want)

    broken = tmp_path / "broken.index.json"
    broken.write_text(json.dumps({"weight_map": {**weight_map, "c.weight": weight_map["a.weight"]}}))
    with pytest.raises(CheckpointError, match=r"broken\.index\.json: shards lack 1 indexed .*c\.weight"):
        read_state_dict(str(broken))
    broken.write_text("{not json")
    with pytest.raises(CheckpointError, match="invalid JSON"):
        read_state_dict(str(broken))
    broken.write_text(json.dumps({"weight_map": {"a.weight": "../outside.safetensors"}}))
    with pytest.raises(CheckpointError, match="not a file in its folder"):
        read_state_dict(str(broken))
    broken.write_text(json.dumps({"weight_map": {"a.weight": "gone.safetensors"}}))
    with pytest.raises(CheckpointError, match=r"gone\.safetensors: no such file"):
        read_state_dict(str(broken))


def test_find_weights_preference_and_error(tmp_path, rng):
    w = {"w": np.ones(2, np.float32)}
    stems = ["diffusion_pytorch_model", "model"]
    folder = str(tmp_path)
    with pytest.raises(CheckpointError) as info:
        find_weights(folder, stems)
    msg = str(info.value)
    assert msg.startswith(f"{folder}: no weight file found")
    for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
                 "diffusion_pytorch_model.safetensors.index.json", "model.bin.index.json"):
        assert name in msg

    # later candidates are found, and each earlier one takes over when it appears
    # (diffusers: a sharded safetensors index before the single files; transformers: model.safetensors
    # before its index; the tests below check both against the libraries themselves)
    order = ["model.bin.index.json", "model.bin", "model.safetensors.index.json",
             "model.safetensors", "diffusion_pytorch_model.bin.index.json", "diffusion_pytorch_model.bin",
             "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json"]
    for name in order:
        save_numpy(w, str(tmp_path / name))
        assert os.path.basename(find_weights(folder, stems)) == name

    with pytest.raises(CheckpointError, match="fp16"):
        find_weights(folder, stems, variant="fp16")
    torch.save({"w": torch.ones(2)}, str(tmp_path / "model.fp16.bin"))
    assert os.path.basename(find_weights(folder, stems, variant="fp16")) == "model.fp16.bin"
    save_numpy(w, str(tmp_path / "model.fp16.safetensors"))
    assert os.path.basename(find_weights(folder, stems, variant="fp16")) == "model.fp16.safetensors"

    with pytest.raises(CheckpointError, match="not a directory"):
        find_weights(str(tmp_path / "model.bin"), stems)


def test_read_state_dict_on_torch_files(tmp_path):
    torch.manual_seed(0)
    sd = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3)).state_dict()
    bin_path = str(tmp_path / "pytorch_model.bin")
    torch.save(sd, bin_path)
    ckpt_path = str(tmp_path / "model.ckpt")
    torch.save({"state_dict": sd, "global_step": 3, "epoch": 1}, ckpt_path)
    for path in (bin_path, ckpt_path):
        got = read_state_dict(path)
        assert list(got) == list(sd)
        for k, v in sd.items():
            np.testing.assert_array_equal(got[k], v.numpy())

    not_tensors = str(tmp_path / "meta.pt")
    torch.save({"global_step": 3}, not_tensors)
    with pytest.raises(CheckpointError, match="holds no tensors"):
        read_state_dict(not_tensors)
    with pytest.raises(CheckpointError, match="no such file"):
        read_state_dict(str(tmp_path / "absent.bin"))


def test_read_json_errors(tmp_path):
    bad = tmp_path / "config.json"
    bad.write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(CheckpointError, match="invalid JSON"):
        read_json(str(bad))
    with pytest.raises(CheckpointError, match="no such file"):
        read_json(str(tmp_path / "missing.json"))


def test_loaded_parameters_do_not_share_memory_with_the_file(tmp_path):
    """read_safetensors maps files instead of reading them; a loaded pipeline must still own its
    parameters: overwriting the files afterwards (e.g. save_diffusers into the same folder) must not
    change them. On CPU, jax.device_put may alias suitably aligned host memory, mapped pages too."""
    import glob

    import jax

    import ldm_jax
    from tests.tiny_sd import tiny_sd_pipeline

    from safetensors.numpy import load_file

    folder = str(tmp_path / "sd")
    tiny_sd_pipeline(folder)
    files = glob.glob(os.path.join(folder, "*", "*.safetensors"))
    assert len(files) == 3
    for path in files:  # rewrite each file so its data section starts 64-byte aligned (aliasable)
        tensors = load_file(path)
        for pad in range(64):
            save_numpy(tensors, path, metadata={"pad": "x" * pad})
            if (8 + _header_len(path)) % 64 == 0:
                break
        assert sum(v.ctypes.data % 64 == 0 for v in read_safetensors(path).values()) >= 3
    pipe = ldm_jax.load_pipeline(folder)
    before = jax.tree_util.tree_map(np.array, pipe.params)  # private copies
    for path in files:  # overwrite every tensor's bytes in place (same size, same inode)
        with open(path, "r+b") as f:
            f.seek(8 + _header_len(path))
            f.write(np.full(os.path.getsize(path) - 8 - _header_len(path), 0x7F, np.uint8).tobytes())
    after = jax.tree_util.tree_map(np.asarray, pipe.params)
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(before)[0]]
    changed = [p for p, a, b in zip(paths, jax.tree_util.tree_leaves(before), jax.tree_util.tree_leaves(after))
               if not np.array_equal(a, b)]
    assert not changed, f"{len(changed)} of {len(paths)} parameters follow the file, e.g. {changed[:3]}"


def _header_len(path: str) -> int:
    with open(path, "rb") as f:
        return int(np.frombuffer(f.read(8), "<u8")[0])


def test_write_safetensors_replaces_a_mapped_file_without_touching_its_readers(tmp_path, rng):
    """read_safetensors returns views on the mapped file; write_safetensors writes a new file and
    renames it over the old one, so such views keep the old tensors (an in-place rewrite would
    change them, or crash the reader with SIGBUS when the file got shorter)."""
    from ldm_jax.convert.export import write_safetensors

    path = str(tmp_path / "w.safetensors")
    old = {"w": rng.standard_normal((64, 64)).astype(np.float32)}
    write_safetensors(path, old)
    views = read_safetensors(path)
    write_safetensors(path, {"w": np.zeros((2,), np.float32)})  # shorter file, same name
    np.testing.assert_array_equal(views["w"], old["w"])
    np.testing.assert_array_equal(read_safetensors(path)["w"], np.zeros(2, np.float32))
    assert sorted(os.listdir(tmp_path)) == ["w.safetensors"]  # no temporary file left


def test_place_params_keeps_every_leaf_in_place(rng):
    """The copies run on a thread pool: each leaf must come back at its own path with its own values
    (transposed and sliced views, owned arrays, scalars and device arrays mixed)."""
    import jax

    from ldm_jax.convert.weights_io import place_params

    def kernel(i):  # a different array per leaf, so a mix-up between leaves shows
        oihw = rng.standard_normal((6, 5, 3, 3)).astype(np.float32)
        return (oihw.copy(),                     # owned
                oihw.transpose(2, 3, 1, 0),      # strided view (an OIHW -> HWIO conversion)
                oihw[2:5, :, 1])[i % 3]          # sliced view

    tree = {f"layer{i}": {"kernel": kernel(i), "bias": rng.standard_normal(i + 1).astype(np.float32)}
            for i in range(40)}
    tree["scalar"] = np.float32(3.0)
    tree["on_device"] = jax.numpy.arange(4.0)
    want = jax.tree_util.tree_map(np.array, tree)
    got = place_params(tree)
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(want)[0], jax.tree_util.tree_leaves(got)):
        assert isinstance(b, jax.Array), jax.tree_util.keystr(path)
        np.testing.assert_array_equal(np.asarray(b), a, err_msg=jax.tree_util.keystr(path))


def _copies(model, folder, names, marker_key, index_prefix):
    """Write one copy of ``model``'s weights per file name in ``names`` (a single safetensors
    file, a sharded safetensors index or a pickled .bin), copy k with ``marker_key`` set to k + 1."""
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    for k, name in enumerate(names):
        marked = dict(state, **{marker_key: torch.full_like(state[marker_key], float(k + 1))})
        if name.endswith(".index.json"):
            keys = sorted(marked)
            shards = {f"{index_prefix}-0000{i + 1}-of-00002.safetensors": keys[i::2] for i in range(2)}
            for shard, shard_keys in shards.items():
                save_torch({key: marked[key] for key in shard_keys}, os.path.join(folder, shard))
            weight_map = {key: shard for shard, shard_keys in shards.items() for key in shard_keys}
            with open(os.path.join(folder, name), "w") as f:
                json.dump({"metadata": {}, "weight_map": weight_map}, f)
        elif name.endswith(".safetensors"):
            save_torch(marked, os.path.join(folder, name))
        else:
            torch.save(marked, os.path.join(folder, name))


DIFFUSERS_COPIES = ["diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json",
                    "diffusion_pytorch_model.bin"]
TRANSFORMERS_COPIES = ["model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"]


@pytest.mark.parametrize("present", [(0, 1, 2), (1, 2), (0, 2), (0, 1), (2,)])
def test_folder_with_several_copies_loads_the_copy_diffusers_loads(tmp_path, present):
    """diffusers reads a sharded safetensors index before the single files (ModelMixin.from_pretrained);
    ldm_jax must load the same copy when a folder holds several (e.g. old .bin files beside new shards)."""
    from diffusers import AutoencoderKL

    from ldm_jax.convert.vae_diffusers import load_vae

    torch.manual_seed(0)
    ref = AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), norm_num_groups=4, latent_channels=2)
    ref.save_pretrained(str(tmp_path))
    for name in DIFFUSERS_COPIES:
        os.remove(tmp_path / name) if (tmp_path / name).exists() else None
    _copies(ref, str(tmp_path), [DIFFUSERS_COPIES[i] for i in present], "decoder.conv_out.bias",
            "diffusion_pytorch_model")
    marker_of = {DIFFUSERS_COPIES[i]: float(k + 1) for k, i in enumerate(present)}
    diffusers_marker = float(AutoencoderKL.from_pretrained(str(tmp_path)).state_dict()["decoder.conv_out.bias"][0])
    _, params = load_vae(str(tmp_path))
    ours = float(np.asarray(params["decoder"]["conv_out"]["bias"])[0])
    assert ours == diffusers_marker
    assert diffusers_marker == marker_of[DIFFUSERS_COPIES[min(present, key=[1, 0, 2].index)]]


@pytest.mark.parametrize("present", [(0, 1, 2), (1, 2), (0, 2), (0, 1)])
def test_folder_with_several_copies_loads_the_copy_transformers_loads(tmp_path, present):
    """transformers reads model.safetensors, then its sharded index, then pytorch_model.bin."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from ldm_jax.convert.clip_transformers import load_text_encoder

    torch.manual_seed(0)
    ref = CLIPTextModel(CLIPTextConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, max_position_embeddings=8,
                                       bos_token_id=48, eos_token_id=49, pad_token_id=1))
    ref.save_pretrained(str(tmp_path))
    os.remove(tmp_path / "model.safetensors")
    _copies(ref, str(tmp_path), [TRANSFORMERS_COPIES[i] for i in present],
            "final_layer_norm.bias", "model")
    marker_of = {TRANSFORMERS_COPIES[i]: float(k + 1) for k, i in enumerate(present)}
    reference_marker = float(CLIPTextModel.from_pretrained(str(tmp_path)).state_dict()["final_layer_norm.bias"][0])
    _, params = load_text_encoder(str(tmp_path))
    ours = [float(np.asarray(leaf).ravel()[0]) for path, leaf in
            jax.tree_util.tree_flatten_with_path(params)[0] if "final_layer_norm" in jax.tree_util.keystr(path)
            and "bias" in jax.tree_util.keystr(path)]
    assert ours == [reference_marker]
    assert reference_marker == marker_of[TRANSFORMERS_COPIES[min(present)]]
