"""Fine-tuning the released semantic-synthesis and layout-to-image files (``init.checkpoint`` = an
original ``.ckpt`` with its YAML), and ``sample.py --layout`` on such a released file.

The files are tiny original-format checkpoints built as the loading tests build theirs: semantic
synthesis from the original ``LatentDiffusion`` of tiny-semantic-synthesis-kl.yaml (its cond stage the
reference ``SpatialRescaler``: n_stages 2, 5 classes -> 3 channels; test_original_concat.py); layout
from sdkit's U-Net / first stage and diffusers' ``LDMBertModel`` under the CompVis BERTEmbedder names
(tiny-layout2img-ldm-bert.yaml with a 64-token vocabulary and length 14, the runlocal preset's
layouts: 4 objects + crop; test_ldm_bert.py). Training starts from them with the runlocal presets of
configs/ldm_semantic_synthesis.py / ldm_layout2img.py on a 2x4 mesh of 8 virtual CPU devices.
"""
import json
import os
from types import SimpleNamespace

import jax
import numpy as np
import pytest
import yaml
from PIL import Image

import ldm_jax
import sample as sample_cli
from ldm_jax.convert.errors import CheckpointError
from ldm_jax.data.layout_tokens import LayoutObject, LayoutTokenBuilder
from ldm_jax.image_io import to_uint8
from ldm_jax.training import loop
from ldm_jax.training import scene_conditioning as scene_lib
from ldm_jax.training import sharding as shd
from ldm_jax.training.ldm_task import LDMTask
from original_ckpt import CONFIGS, first_stage, latent_diffusion, ldm_state_dict, save_ckpt, unet_model
from test_concat_training import load_config
from test_ldm_bert import compvis_bert_state_dict, ldm_bert_torch
from test_training import _compilation_cache, host, mesh_of  # noqa: F401  (module-scoped compilation cache)

SEMANTIC_YAML = os.path.join(CONFIGS, "tiny-semantic-synthesis-kl.yaml")
RESCALER = dict(n_stages=2, method="bilinear", multiplier=0.5, in_channels=5, out_channels=3, bias=False)


def assert_same(a, b):
    a, b = host(a), host(b)
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)


def first_step(task, cfg):
    """The first state (on the host), and one sharded step on the family's built-in data."""
    state = task.init_state(jax.random.PRNGKey(0))
    state0 = host(state)
    batch = shd.shard_batch(task.prepare_batch(next(loop.make_dataset(cfg, 0, task))), task.mesh)
    state1, metrics = task.train_step(state, batch)
    return state0, host(state1), float(metrics["loss"])


# ------------------------------------------------------------------ semantic synthesis
@pytest.fixture(scope="module")
def semantic_file(tmp_path_factory):
    model = latent_diffusion(SEMANTIC_YAML, seed=80)  # its LitEma copies (model_ema.*) differ from the weights
    sd = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    path = save_ckpt(str(tmp_path_factory.mktemp("semantic_ft") / "semantic.ckpt"), sd)
    return dict(path=path, sd=sd, pipe=ldm_jax.load_pipeline(path, config=SEMANTIC_YAML, use_ema=True))


def _with_changes(cfg, changes):
    """``cfg`` with ``section__name=value`` keyword changes applied."""
    for key, value in changes.items():
        section, name = key.split("__")
        cfg[section][name] = value
    return cfg


def semantic_config(path, **changes):
    """configs/ldm_semantic_synthesis.py:runlocal (synthetic 5-class scenes at 16x16) on the file: its U-Net and
    rescaler taken (model.unet = model.cond_stage = {}), its KL-f4 first stage (4x4x3 latents, scale 1)."""
    cfg = load_config("ldm_semantic_synthesis")
    cfg.model.unet, cfg.model.cond_stage = {}, {}
    cfg.first_stage.scale_by_std, cfg.first_stage.scale_factor = False, None
    cfg.init.checkpoint, cfg.init.original_config, cfg.init.use_ema = path, SEMANTIC_YAML, True
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.min_fsdp_size = 2, 4, 2 ** 10
    return _with_changes(cfg, changes)


def test_fine_tuning_from_a_semantic_synthesis_file(semantic_file):
    """init.checkpoint = an original semantic-synthesis .ckpt (init.use_ema) with diffusion.concat="segmentation":
    the task takes the file's U-Net (6 = 3 latent + 3 rescaled channels in) and SpatialRescaler settings; the first
    state (params and EMA) is {"unet": the file's EMA U-Net, "cond_stage": the file's channel_mapper} (checked against
    the torch weights too); the frozen first stage is the file's; one sharded step runs and trains the rescaler."""
    pipe, sd = semantic_file["pipe"], semantic_file["sd"]
    cfg = semantic_config(semantic_file["path"])
    task = LDMTask(cfg, mesh_of(2, 4))
    assert task.unet.config.in_channels == 6 and task.unet.config.block_out_channels == (32, 64)
    assert {k: getattr(task.cond_stage, k) for k in scene_lib.RESCALER_FIELDS} == RESCALER
    assert task.scale_factor == 1.0 and task.vae.config.downsample_factor == 4
    assert_same(task.frozen["vae"], pipe.params["vae"])
    state0, state1, loss = first_step(task, cfg)
    assert set(state0.params) == {"unet", "cond_stage"}
    for tree in (state0.params, state0.ema_params):
        assert_same(tree["unet"], pipe.params["unet"])
        assert_same(tree["cond_stage"], pipe.params["cond_stage"])
    # against the torch weights: the U-Net's EMA copy (LitEma keys without dots), the rescaler's 1x1 conv
    ema_conv_in = sd["model_ema.diffusion_modelinput_blocks00weight"]
    assert np.abs(ema_conv_in - sd["model.diffusion_model.input_blocks.0.0.weight"]).max() > 1e-3
    np.testing.assert_array_equal(state0.params["unet"]["conv_in"]["kernel"], ema_conv_in.transpose(2, 3, 1, 0))
    kernel0 = state0.params["cond_stage"]["channel_mapper"]["kernel"]
    np.testing.assert_array_equal(kernel0, sd["cond_stage_model.channel_mapper.weight"].transpose(2, 3, 1, 0))
    moved = np.abs(state1.params["cond_stage"]["channel_mapper"]["kernel"] - kernel0).max()
    print(f"semantic synthesis fine-tuning step on 2x4: loss {loss:.5f}, rescaler kernel moved by {moved:.1e}")
    assert np.isfinite(loss) and int(state1.step) == 1 and moved > 0


def test_semantic_synthesis_file_mismatches(semantic_file, tmp_path):
    path, mesh = semantic_file["path"], mesh_of(1, 1)
    # model.cond_stage given: must be the file's settings (here the file's with one field changed)
    for field, value in (("n_stages", 1), ("method", "nearest"), ("out_channels", 4), ("bias", True)):
        with pytest.raises(ValueError, match=rf"model.cond_stage does not describe init.checkpoint=.*semantic.ckpt's "
                                             rf"SpatialRescaler: {field}={value!r} \(the file's: "):
            LDMTask(semantic_config(path, model__cond_stage=dict(RESCALER, **{field: value})), mesh)
    LDMTask(semantic_config(path, model__cond_stage=dict(RESCALER)), mesh)  # the file's settings, given: accepted
    with pytest.raises(ValueError, match=r"data.num_classes=6 but model.cond_stage.in_channels=5"):
        LDMTask(semantic_config(path, data__num_classes=6), mesh)
    with pytest.raises(ValueError, match=r"semantic.ckpt is a semantic-synthesis model .*train it with "
                                         r"diffusion.concat='segmentation', got 'none'"):
        LDMTask(semantic_config(path, diffusion__concat="none"), mesh)
    # a file without a SpatialRescaler (stand-in pipelines: an SD-like file, a rescaler without weights)
    with pytest.raises(ValueError, match=r"sd.ckpt is not a semantic-synthesis model \(its cond stage: clip\)"):
        scene_lib.init_rescaler_fields(SimpleNamespace(cond_stage="clip", cond_stage_model=None, source="sd.ckpt",
                                                       text_encoder=object()))
    no_mapper = SimpleNamespace(out_channels=None)
    with pytest.raises(ValueError, match=r"its SpatialRescaler has no channel mapper"):
        scene_lib.init_rescaler_fields(SimpleNamespace(cond_stage="rescaler", cond_stage_model=no_mapper,
                                                       source="s.ckpt", text_encoder=None))


# ------------------------------------------------------------------ layout-to-image
LAYOUT_VOCAB, LAYOUT_LENGTH = 64, 14  # configs/ldm_layout2img.py:runlocal's data.layout: 8x8 grid, 4 objects + crop


@pytest.fixture(scope="module")
def layout_file(tmp_path_factory):
    """A tiny original layout-to-image .ckpt (+ its YAML) with model_ema.* copies of the U-Net."""
    from ldm.modules.diffusionmodules.util import make_beta_schedule

    root = tmp_path_factory.mktemp("layout_ft")
    with open(os.path.join(CONFIGS, "tiny-layout2img-ldm-bert.yaml")) as f:
        original = yaml.safe_load(f)
    p = original["model"]["params"]
    p["cond_stage_config"]["params"].update(vocab_size=LAYOUT_VOCAB, max_seq_len=LAYOUT_LENGTH)
    yaml_file = str(root / "tiny-layout2img.yaml")
    with open(yaml_file, "w") as f:
        yaml.safe_dump(original, f)
    bert = ldm_bert_torch(90, vocab_size=LAYOUT_VOCAB, max_position_embeddings=LAYOUT_LENGTH)
    unet = unet_model(91, **p["unet_config"]["params"])
    first = first_stage(92, p["first_stage_config"]["params"]["ddconfig"], 4)
    betas = np.asarray(make_beta_schedule("linear", 1000, linear_start=p["linear_start"],
                                          linear_end=p["linear_end"]), np.float64)
    sd = ldm_state_dict(unet, first, None, betas=betas, ema_seed=93)
    sd.update(compvis_bert_state_dict(bert.state_dict(), p["cond_stage_config"]["params"]["n_layer"]))
    path = save_ckpt(str(root / "layout.ckpt"), sd)
    return dict(path=path, yaml=yaml_file, bert=bert, pipe=ldm_jax.load_pipeline(path, config=yaml_file))


def layout_config(file, **changes):
    """configs/ldm_layout2img.py:runlocal (synthetic scenes, layouts of 4 objects on an 8x8 grid + crop = 14 ids)
    on the file: its U-Net (model.unet = {}) and LDMBert (text_encoder.ldm_bert = {}), KL-f8 (2x2 latents),
    scale 0.18215 (first_stage.scale_factor None: the file's)."""
    cfg = load_config("ldm_layout2img")
    cfg.model.unet, cfg.text_encoder.ldm_bert = {}, {}
    cfg.first_stage.scale_by_std, cfg.first_stage.scale_factor = False, None
    cfg.init.checkpoint, cfg.init.original_config = file["path"], file["yaml"]
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.min_fsdp_size = 2, 4, 2 ** 10
    return _with_changes(cfg, changes)


def test_fine_tuning_from_a_layout_to_image_file(layout_file):
    """init.checkpoint = an original layout-to-image .ckpt with diffusion.conditioning="layout": the task's LDMBert
    is the file's (config and, as the start of the trained encoder, weights) and its layout builder makes the
    file's 14 ids of 64 tokens; the first state (params and EMA) is {"unet": the file's U-Net, "text_encoder": the
    file's LDMBert} (the token table checked against the torch module); one sharded step trains both."""
    pipe, bert = layout_file["pipe"], layout_file["bert"]
    cfg = layout_config(layout_file)
    task = LDMTask(cfg, mesh_of(2, 4))
    assert task.text_encoder.config == pipe.text_encoder.config and task.text_encoder.config.num_heads == 8
    assert (task.layout_builder.no_tokens, task.layout_builder.embedding_dim) == (LAYOUT_VOCAB, LAYOUT_LENGTH)
    assert task.frozen["text_encoder"] is None and task.scale_factor == np.float32(0.18215)
    assert_same(task.frozen["vae"], pipe.params["vae"])
    state0, state1, loss = first_step(task, cfg)
    assert set(state0.params) == {"unet", "text_encoder"}
    for tree in (state0.params, state0.ema_params):
        assert_same(tree["unet"], pipe.params["unet"])
        assert_same(tree["text_encoder"], pipe.params["text_encoder"])
    table0 = state0.params["text_encoder"]["embed_tokens"]["embedding"]
    np.testing.assert_array_equal(table0, bert.model.embed_tokens.weight.detach().numpy())
    moved = np.abs(state1.params["text_encoder"]["embed_tokens"]["embedding"] - table0).max()
    print(f"layout fine-tuning step on 2x4: loss {loss:.5f}, LDMBert token table moved by {moved:.1e}")
    assert np.isfinite(loss) and int(state1.step) == 1 and moved > 0


def test_layout_to_image_file_mismatches(layout_file, semantic_file):
    mesh = mesh_of(1, 1)
    runlocal_bert = load_config("ldm_layout2img").text_encoder.ldm_bert  # 2 heads of 16, MLP 64
    with pytest.raises(ValueError, match=r"text_encoder.ldm_bert does not describe init.checkpoint=.*layout.ckpt's "
                                         r"LDMBert: num_heads=2 \(the file's: 8\); head_dim=16 \(the file's: 64\); "
                                         r"intermediate_size=64 \(the file's: 128\)"):
        LDMTask(layout_config(layout_file, text_encoder__ldm_bert=dict(runlocal_bert)), mesh)
    given = dict(runlocal_bert, num_heads=8, head_dim=64, intermediate_size=128)  # the file's, given: accepted
    LDMTask(layout_config(layout_file, text_encoder__ldm_bert=given), mesh)
    layout = dict(load_config("ldm_layout2img").data.layout)
    with pytest.raises(ValueError, match=r"data.layout builds 14 ids \(3 x no_max_objects=4 \+ 2 crop tokens\) over "
                                         r"no_tokens=100, but init.checkpoint=.*layout.ckpt's LDMBert takes 14 ids "
                                         r"\(max_position_embeddings\) of a 64-token vocabulary \(vocab_size\): set "
                                         r"data.layout.no_tokens=64 and no_max_objects=4, encode_crop=True"):
        LDMTask(layout_config(layout_file, data__layout=dict(layout, no_tokens=100)), mesh)
    with pytest.raises(ValueError, match=r"data.layout builds 17 ids .* takes 14 ids .*no_max_objects=4"):
        LDMTask(layout_config(layout_file, data__layout=dict(layout, no_max_objects=5)), mesh)
    with pytest.raises(ValueError, match=r"data.layout builds 12 ids \(3 x no_max_objects=4\) .*encode_crop=True"):
        LDMTask(layout_config(layout_file, data__layout=dict(layout, encode_crop=False)), mesh)
    # each family's file with the other family's config
    with pytest.raises(ValueError, match=r"layout.ckpt is a layout-to-image model .*train it with "
                                         r"diffusion.conditioning='layout', got 'none'"):
        LDMTask(semantic_config(layout_file["path"], init__original_config=layout_file["yaml"]), mesh)
    with pytest.raises(ValueError, match=r"semantic.ckpt is a semantic-synthesis model .*got 'none'"):
        LDMTask(layout_config(dict(path=semantic_file["path"], yaml=SEMANTIC_YAML)), mesh)
    # a text-to-image BERT file (stand-in: a tokenizer) is not a layout model
    builder = scene_lib.model_layout_builder(layout_config(layout_file))
    with pytest.raises(ValueError, match=r"txt2img.ckpt is not a layout-to-image model \(its text encoder: "
                                         r"LDMBertModel with a tokenizer"):
        te = layout_file["pipe"].text_encoder
        scene_lib._init_layout_bert(SimpleNamespace(text_encoder=te, tokenizer=object(), source="txt2img.ckpt"),
                                    {}, builder)
    with pytest.raises(CheckpointError, match=r"U-Net does not match config.model.unet"):
        LDMTask(layout_config(layout_file, model__unet=dict(load_config("ldm_layout2img").model.unet)), mesh)


# ------------------------------------------------------------------ sample.py --layout on the released file
def write_json(path, value):
    path.write_text(json.dumps(value))
    return str(path)


def cli_error(capsys, argv):
    code = sample_cli.main(argv)
    err = capsys.readouterr().err
    errors = [line[line.index("error: "):] for line in err.splitlines() if "error: " in line]
    assert code == 2 and len(errors) == 1, err
    return errors[0]


def test_sample_cli_layout_on_the_released_file(layout_file, semantic_file, tmp_path, capsys):
    """--layout on an original layout-to-image file: its ids come from taming's builder with the file's vocabulary
    (64 tokens) and length (14 = 3 x 4 objects + 2 crop tokens); the PNGs equal pipe(context_ids=those ids), one
    batch per layout, seed + batch. The file does not record its object-class count: is_group_of is refused."""
    layouts = [[{"category": 2, "bbox": [0.1, 0.2, 0.5, 0.4]}, {"category": 62, "bbox": [0.5, 0.5, 0.5, 0.5]}],
               [{"category": 0, "bbox": [0.0, 0.0, 1.0, 1.0]}]]
    path = write_json(tmp_path / "layouts.json", layouts)
    base = ["--checkpoint", layout_file["path"], "--config", layout_file["yaml"], "--steps", "2", "--H", "16",
            "--W", "16", "--seed", "5"]
    out = tmp_path / "out"
    assert sample_cli.main(base + ["--layout", path, "--n_samples", "1", "--outdir", str(out)]) == 0
    builder = LayoutTokenBuilder(1, 4, LAYOUT_VOCAB, True, True)  # (the class count only matters for flags)
    pipe = layout_file["pipe"]
    for b, layout in enumerate(layouts):
        ids = builder.build([(o["category"], tuple(o["bbox"])) for o in layout])[None]
        want = to_uint8(pipe(context_ids=ids, num_inference_steps=2, height=16, width=16, seed=5 + b)[0])
        got = Image.open(out / "samples" / f"{b:05d}.png")
        np.testing.assert_array_equal(np.asarray(got), want)
        assert json.loads(got.text["layout"]) == layout and got.text["scale"] == "1.0"
    assert not np.array_equal(*[np.asarray(Image.open(out / "samples" / f"{b:05d}.png")) for b in (0, 1)])

    grouped = write_json(tmp_path / "grouped.json", [{"category": 2, "bbox": [0.1, 0.2, 0.5, 0.4],
                                                      "is_group_of": True}])
    err = cli_error(capsys, base + ["--layout", grouped, "--outdir", str(tmp_path / "g")])
    assert "grouped.json: layout 0, object 0: is_group_of needs the model's number of object classes" in err
    big = write_json(tmp_path / "big.json", [{"category": 63, "bbox": [0.1, 0.2, 0.5, 0.4]}])
    err = cli_error(capsys, base + ["--layout", big, "--outdir", str(tmp_path / "b")])
    assert "big.json: layout 0, object 0: category 63 is outside the model's 63 layout tokens below the padding" in err
    err = cli_error(capsys, base + ["--prompt", "a cat", "--outdir", str(tmp_path / "p")])
    assert "layout.ckpt is a layout-to-image model: it takes object layouts, not text" in err and "--layout" in err
    err = cli_error(capsys, ["--checkpoint", semantic_file["path"], "--config", SEMANTIC_YAML, "--layout", path,
                             "--steps", "2", "--outdir", str(tmp_path / "s")])
    assert "--layout is for layout-to-image models" in err and "semantic.ckpt is not one" in err

    # The released layout2img file's LDMBert (configs/ldm_layout2img.py's, = its YAML's): taming's scene settings.
    from ldm_jax.convert.original_pipeline import released_layout_builder
    from ldm_jax.models.ldm_bert import LDMBertConfig

    released = released_layout_builder(LDMBertConfig(**load_config("ldm_layout2img", "").text_encoder.ldm_bert))
    assert (released.no_max_objects, released.no_tokens, released.encode_crop, released.use_group_parameter,
            released.use_additional_parameters, released.no_object_classes) == (30, 8192, True, True, False, None)
    assert released_layout_builder(LDMBertConfig(vocab_size=64, max_position_embeddings=13)) is None  # 3k+1


def test_layout_file_errors_name_the_file_and_entry(tmp_path, capsys):
    """Structure errors stop sample.py before the model is loaded (no such checkpoint here), naming the entry."""
    cases = [
        ([{"category": 1, "bbox": [0.5, 0.2, 0.6, 0.4]}], "layout 0, object 0: 'bbox' [0.5, 0.2, 0.6, 0.4] is not a "
                                                          "box relative to the image"),
        ([{"category": 1, "bbox": [10, 20, 50, 40]}], "(a box in pixels: divide x and w by the image width"),
        ([[{"category": 0, "bbox": [0, 0, 1, 1]}], [{"category": -1, "bbox": [0, 0, 1, 1]}]],
         "layout 1, object 0: 'category' must be an int >= 0"),
        ([{"category": 1, "box": [0, 0, 1, 1]}], "layout 0, object 0: unknown keys ['box']"),
        ([{"category": 1}], "layout 0, object 0: 'bbox' is missing"),
        ([{"category": 1, "bbox": [0, 0, 1]}], "'bbox' must be [x0, y0, w, h], four numbers"),
        ([{"category": 1, "bbox": [0, 0, 1, 1], "is_group_of": 1}], "'is_group_of' must be true or false"),
        ([], "expected a list of objects"),
        ({"category": 1}, "expected a list of objects"),
        ([{"category": 1, "bbox": [0, 0, 1, 1]}, [{"category": 1, "bbox": [0, 0, 1, 1]}]], "objects and lists mixed"),
    ]
    base = ["--checkpoint", str(tmp_path / "missing.ckpt"), "--outdir", str(tmp_path / "o")]
    for i, (value, message) in enumerate(cases):
        path = write_json(tmp_path / f"bad{i}.json", value)
        err = cli_error(capsys, base + ["--layout", path])
        assert f"bad{i}.json: " in err and message in err, (i, err)
    (tmp_path / "broken.json").write_text('[{"category": 1,')
    assert "broken.json: not valid JSON" in cli_error(capsys, base + ["--layout", str(tmp_path / "broken.json")])
    good = write_json(tmp_path / "good.json", [{"category": 1, "bbox": [0, 0, 1, 1]}])
    err = cli_error(capsys, base + ["--layout", good, "--prompt", "a cat"])
    assert "--layout is the condition of a layout-to-image model; it does not go with --prompt" in err
    # (the builder side of a file's layouts: more objects than the model's layouts hold)
    from ldm_jax.data.layout_file import layout_file_ids, read_layout_file

    five = write_json(tmp_path / "five.json", [{"category": 0, "bbox": [0.1 * k, 0, 0.1, 0.1]} for k in range(5)])
    with pytest.raises(ValueError, match=r"five.json: layout 0 has 5 objects; the model's layouts hold at most 4"):
        layout_file_ids(read_layout_file(five), LayoutTokenBuilder(None, 4, 64, True, True), five)
    assert LayoutObject(0, (0.0, 0.0, 0.1, 0.1)) == read_layout_file(five)[0][0]
