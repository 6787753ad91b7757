"""train.py's config keys beyond the loop's (``model.*``, ``diffusion.*``, ``data.*``, ``first_stage.*``,
``text_encoder.*``, ``init.*``, ``mesh.*``, ``sample.*``, ``eval.*``, ``loss.*``), overridden as a user does
on the command line: a wrong type, an out-of-range value or an unknown name is a ValueError / OSError from
``loop.prepare`` that names the key (``config key a.b=VALUE: what is allowed``), in a few lines, before
anything is written to the workdir; values the reference code accepts keep working.

The overrides go through ml_collections' flag parser in-process (the CLI's types: ``abc`` for a tuple field
is ``('abc',)``); two cases run train.py itself."""
import os
import re
import subprocess
import sys

import pytest
from absl import flags
from ml_collections import config_flags

from ldm_jax.training import loop, optim
from ldm_jax.training.config_access import check_train_config, config_flag_error
from ldm_jax.training.config_keys import check_config_keys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")


def _parse(spec, *overrides):
    """The ConfigDict train.py gets for ``--config=configs/SPEC --config.a.b=v ...``."""
    argv = ["train.py", f"--config={os.path.join(CONFIGS, spec)}", *overrides]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True, sys_argv=argv)
    fv(argv)
    return fv.config


LDM, AE, VQ = "emoji_ldm.py:runlocal", "emoji_autoencoder.py:runlocal", "emoji_autoencoder.py:vq,runlocal"
SR, INPAINT = "ldm_sr.py:runlocal", "sd_inpainting_finetune.py:runlocal"
SEG, LAYOUT = "ldm_semantic_synthesis.py:runlocal", "ldm_layout2img.py:runlocal"

# (config, override, key named in the message, a fragment of what is allowed)
CASES = [
    # U-Net
    (LDM, "model.unet.block_out_channels=abc", "model.unet.block_out_channels=('abc',)", "tuple of integers"),
    (LDM, "model.unet.block_out_channels=(0,64)", "model.unet.block_out_channels=", ">= 1"),
    (LDM, "model.unet.block_out_channels=(32,64,64)", "model.unet.down_block_types=", "expected 3 block types"),
    (LDM, "model.unet.down_block_types=abc", "model.unet.down_block_types=('abc',)", "'CrossAttnDownBlock2D'"),
    (LDM, "model.unet.up_block_types=()", "model.unet.up_block_types=()", "'UpBlock2D'"),
    (LDM, "model.unet.mid_block_type=Mid", "model.unet.mid_block_type='Mid'", "'UNetMidBlock2D'"),
    (LDM, "model.unet.norm_num_groups=0", "model.unet.norm_num_groups=0", ">= 1"),
    (LDM, "model.unet.norm_num_groups=24", "model.unet.norm_num_groups=24", "divisible"),
    (LDM, "model.unet.num_heads=0", "model.unet.num_heads=0", ">= 1"),
    (LDM, "model.unet.layers_per_block=-1", "model.unet.layers_per_block=-1", ">= 0"),
    (LDM, "model.unet.out_channels=0", "model.unet.out_channels=0", ">= 1"),
    (LDM, "model.unet.conv_impl=cuda", "model.unet.conv_impl='cuda'", "'matmul'"),
    (SR, "model.unet.head_dim=0", "model.unet.head_dim=0", ">= 1"),
    (LDM, "model.attention_impl=flash", "model.attention_impl='flash'", "'splash'"),
    # first stage / autoencoders
    (LDM, "first_stage.autoencoder.block_out_channels=abc", "first_stage.autoencoder.block_out_channels=('abc',)",
     "tuple of integers"),
    (LDM, "first_stage.autoencoder.latent_channels=0", "first_stage.autoencoder.latent_channels=0", ">= 1"),
    (LDM, "first_stage.autoencoder.norm_num_groups=-1", "first_stage.autoencoder.norm_num_groups=-1", ">= 1"),
    (LDM, "first_stage.autoencoder.kind=gan", "first_stage.autoencoder.kind='gan'", "'vq'"),
    (LDM, "first_stage.random_init=False", "first_stage.random_init=False", "first_stage.checkpoint"),
    (LDM, "first_stage.checkpoint=/nonexistent/vae", "first_stage.checkpoint='/nonexistent/vae'", "no such file"),
    (AE, "model.autoencoder.block_out_channels=(0,)", "model.autoencoder.block_out_channels=(0,)", ">= 1"),
    (AE, "model.autoencoder.num_vq_embeddings=0", "model.autoencoder.num_vq_embeddings=0", ">= 1"),
    (AE, "model.autoencoder.scaling_factor=-1.0", "model.autoencoder.scaling_factor=-1.0", "> 0"),
    (AE, "model.kind=vae", "model.kind='vae'", "'kl'"),
    (VQ, "model.codebook_init=random", "model.codebook_init='random'", "'uniform'"),
    (AE, "data.image_size=33", "data.image_size=33", "factor 2"),
    (LDM, "data.image_size=17", "data.image_size=17", "factor 2"),
    # the autoencoders' loss and evaluation
    (AE, "loss.disc_start=-1", "loss.disc_start=-1", ">= 0"),
    (AE, "loss.disc_norm_groups=0", "loss.disc_norm_groups=0", ">= 1"),
    (AE, "loss.disc_norm_groups=12", "loss.disc_norm_groups=12", "divisible"),
    (AE, "loss.disc_ndf=0", "loss.disc_ndf=0", ">= 1"),
    (AE, "loss.disc_loss=wgan", "loss.disc_loss='wgan'", "'hinge'"),
    (AE, "loss.disc_norm=layer", "loss.disc_norm='layer'", "'actnorm'"),
    (AE, "loss.lpips_weights=/nonexistent.ckpt", "loss.lpips_weights='/nonexistent.ckpt'", "no such file"),
    (VQ, "loss.codebook_weight=-1.0", "loss.codebook_weight=-1.0", ">= 0"),
    (AE, "eval.batch_size=0", "eval.batch_size=0", ">= 1"),
    (AE, "eval.num_images=-1", "eval.num_images=-1", ">= 0"),
    # text encoder
    (LDM, "text_encoder.clip.hidden_size=0", "text_encoder.clip.hidden_size=0", ">= 1"),
    (LDM, "text_encoder.clip.num_heads=3", "text_encoder.clip.num_heads=3", "not divisible by num_heads"),
    (LDM, "text_encoder.clip.max_position_embeddings=-1", "text_encoder.clip.max_position_embeddings=-1", ">= 1"),
    (LDM, "text_encoder.max_length=40", "text_encoder.max_length=40", "max_position_embeddings=16"),
    (LDM, "text_encoder.pad_token_id=-1", "text_encoder.pad_token_id=-1", ">= 0"),
    (LDM, "text_encoder.tokenizer=/nonexistent/tok", "text_encoder.tokenizer='/nonexistent/tok'", "no such file"),
    (LDM, "text_encoder.checkpoint=/nonexistent/te", "text_encoder.checkpoint='/nonexistent/te'", "no such file"),
    (LAYOUT, "text_encoder.ldm_bert.head_dim=0", "text_encoder.ldm_bert.head_dim=0", ">= 1"),
    (LAYOUT, "text_encoder.ldm_bert.hidden_act=swish", "text_encoder.ldm_bert.hidden_act='swish'", "'gelu'"),
    # init
    (LDM, "init.checkpoint=/nonexistent.ckpt", "init.checkpoint='/nonexistent.ckpt'", "no such file"),
    (LDM, f"init.original_config={os.path.join(ROOT, 'pyproject.toml')}", "init.original_config=",
     "init.checkpoint"),
    # objective
    (LDM, "diffusion.prediction_type=eps", "diffusion.prediction_type='eps'", "'v_prediction'"),
    (LDM, "diffusion.conditioning=txt", "diffusion.conditioning='txt'", "'class_crossattn'"),
    (LDM, "diffusion.conditioning=class", "diffusion.conditioning='class'", "model.unet.num_class_embeds"),
    (LDM, "diffusion.concat=depth", "diffusion.concat='depth'", "'inpainting'"),
    (LDM, "diffusion.beta_schedule=sigmoid", "diffusion.beta_schedule='sigmoid'", "'squaredcos_cap_v2'"),
    (LDM, "diffusion.beta_end=1.5", "diffusion.beta_end=1.5", "[0, 1)"),
    (LDM, "diffusion.num_train_timesteps=0", "diffusion.num_train_timesteps=0", ">= 2"),
    (LDM, "diffusion.cond_drop_prob=1.5", "diffusion.cond_drop_prob=1.5", "[0, 1]"),
    (SEG, "diffusion.loss_type=huber", "diffusion.loss_type='huber'", "'l1'"),
    (INPAINT, "diffusion.inpainting_masks.box_size=abc", "diffusion.inpainting_masks.box_size=('abc',)",
     "(min, max)"),
    (INPAINT, "diffusion.inpainting_masks.stroke_width=(0.5,0.1)", "diffusion.inpainting_masks.stroke_width=",
     "min <= max"),
    (INPAINT, "diffusion.inpainting_masks.full_prob=2.0", "diffusion.inpainting_masks.full_prob=2.0", "[0, 1]"),
    (INPAINT, "diffusion.inpainting_masks.stroke_vertices=1", "diffusion.inpainting_masks.stroke_vertices=1",
     ">= 2"),
    # cond stage (semantic synthesis), layouts
    (SEG, "model.cond_stage.method=cubic", "model.cond_stage.method='cubic'", "'bicubic'"),
    (SEG, "model.cond_stage.multiplier=-0.5", "model.cond_stage.multiplier=-0.5", "> 0"),
    (SEG, "model.cond_stage.n_stages=-1", "model.cond_stage.n_stages=-1", ">= 0"),
    (SEG, "data.num_examples=0", "data.num_examples=0", ">= 1"),
    (LAYOUT, "data.layout.no_tokens=0", "data.layout.no_tokens=0", ">= 1"),
    (LAYOUT, "data.layout.min_object_area=2.0", "data.layout.min_object_area=2.0", "[0, 1]"),
    # data, sample grids, mesh
    (LDM, "data.name=nosuchdataset", "data.name='nosuchdataset'", "tfds.list_builders()"),  # (not TFDS's catalogue)
    (AE, "data.name=nosuchdataset", "data.name='nosuchdataset'", "'synthetic', 'folder', 'emoji'"),
    (LDM, "data.name=folder", "data.path=None", "needs data.path"),
    (LDM, "data.name=folder --config.data.path=/nonexistent/images", "data.path='/nonexistent/images'",
     "does not exist"),
    (LDM, "data.exclude_captions=(", "data.exclude_captions='('", "regular expression"),
    (LDM, "sample.num_inference_steps=0", "sample.num_inference_steps=0", ">= 1"),
    (LDM, "sample.prompts=() --config.train.sample_every=2", "sample.prompts=()", "at least one prompt"),
    (SR, "sample.images=/nonexistent.png", "sample.images=('/nonexistent.png',)", "no such file"),
    (SR, "sample.num_images=0", "sample.num_images=0", ">= 1"),
    (LDM, "mesh.min_fsdp_size=-1", "mesh.min_fsdp_size=-1", ">= 0"),
    (LDM, "mesh.rules=abc", "mesh.rules=('abc',)", "(regex, PartitionSpec tuple)"),
    (LDM, "mesh.data=0", "mesh.data=0", "-1"),
    (LDM, "mesh.data=-1 --config.mesh.fsdp=-1", "mesh.data=-1", "at most one"),
    (LDM, "mesh.data=3", "mesh.data=3", "devices"),  # 8 virtual devices (conftest)
]


def _ids(case):
    return f"{case[0].split('.')[0]}:{case[1].split('=')[0]}={case[1].split('=', 1)[1][:20]}"


@pytest.mark.parametrize("spec, override, key, fragment", CASES, ids=[_ids(c) for c in CASES])
def test_bad_value_is_one_short_error_naming_the_key(spec, override, key, fragment, tmp_path):
    config = _parse(spec, *("--config." + o for o in override.split(" --config.")))
    workdir = tmp_path / "run"
    with pytest.raises((ValueError, OSError)) as info:
        loop.prepare(config, str(workdir))
    message = str(info.value)
    assert f"config key {key}" in message or (f"config keys " in message and key in message), message
    assert fragment in message, message
    assert len(message) < 400 and len(message.splitlines()) == 1, message
    assert not workdir.exists()


def test_unet_out_channels_must_match_the_latents(tmp_path):
    """Found on the built task (the first stage may come from a checkpoint): still before any write,
    not at the first step's shape error."""
    workdir = tmp_path / "run"
    with pytest.raises(ValueError) as info:
        loop.prepare(_parse(LDM, "--config.model.unet.out_channels=3"), str(workdir))
    assert "config key model.unet.out_channels=3: must equal the first stage's 4 latent channels" in str(info.value)
    assert not workdir.exists()


def test_every_config_and_preset_passes_the_checks(tmp_path):
    """As a user runs them: the full-size configs are templates whose image folder or released checkpoint
    is given on the command line (an error names that key until it is)."""
    specs = []
    for name in sorted(os.listdir(CONFIGS)):
        if not name.endswith(".py"):
            continue
        text = open(os.path.join(CONFIGS, name), encoding="utf-8").read()
        presets = [""] + [p for p in ("runlocal", "demo") if f'"{p}"' in text]
        if name == "emoji_autoencoder.py":
            presets += ["vq", "vq,runlocal"]
        specs += [name + (f":{p}" if p else "") for p in presets]
    assert len(specs) >= 29
    (tmp_path / "images").mkdir()
    (tmp_path / "model.ckpt").write_bytes(b"")
    inputs = {"data.path": f"--config.data.path={tmp_path / 'images'}",
              "first_stage.random_init": f"--config.init.checkpoint={tmp_path / 'model.ckpt'}"}
    for spec in specs:
        given = []
        while True:
            config = _parse(spec, *given)
            check_train_config(config)
            try:
                check_config_keys(config)
                break
            except ValueError as e:
                key = str(e).split("config key ", 1)[-1].split("=", 1)[0]
                assert key in inputs and inputs[key] not in given, f"{spec}: {e}"
                given.append(inputs[key])


def test_values_the_references_accept_pass_the_checks():
    """Non-default but valid: not refused (diffusers / CompVis take them)."""
    cfg = _parse(LDM, "--config.sample.guidance_scale=-1.0", "--config.model.unet.layers_per_block=0",
                 "--config.data.image_size=18", "--config.diffusion.offset_noise=-0.1",
                 "--config.text_encoder.max_length=0", "--config.text_encoder.pad_token_id=0",
                 "--config.mesh.min_fsdp_size=0", "--config.sample.seed=-1",
                 "--config.model.unet.num_heads=1", "--config.sample.sampler=euler_a",
                 "--config.diffusion.prediction_type=sample", "--config.text_encoder.clip.num_layers=0")
    check_config_keys(cfg)
    as_dict = cfg.to_dict()  # (keys the CLI cannot type: None placeholders, per-block tuples)
    as_dict["diffusion"]["min_snr_gamma"] = 5.0
    as_dict["first_stage"]["scale_factor"] = 0.5
    as_dict["model"]["unet"]["num_heads"] = (1, 2)
    as_dict["model"]["unet"]["cross_attention_dim"] = 32
    check_config_keys(as_dict)
    for key, value, fragment in (("min_snr_gamma", 0.0, "> 0"), ("min_snr_gamma", "5", "finite number")):
        bad = {**as_dict, "diffusion": {**as_dict["diffusion"], key: value}}
        with pytest.raises(ValueError, match=f"config key diffusion.{key}=.*{fragment}"):
            check_config_keys(bad)
    bad = {**as_dict, "model": {**as_dict["model"], "unet": {**as_dict["model"]["unet"], "num_heads": (1, 2, 4)}}}
    with pytest.raises(ValueError, match=r"config key model.unet.num_heads=\(1, 2, 4\): expected one integer or 2"):
        check_config_keys(bad)
    # taming's use_actnorm: ActNorm, so GroupNorm's groups (16 here) need not divide the widths (20, 40, 80)
    ae = _parse(AE).to_dict()
    check_config_keys({**ae, "loss": {**ae["loss"], "use_actnorm": True, "disc_ndf": 20}})
    with pytest.raises(ValueError, match=r"loss.disc_norm_groups=16: DiscriminatorConfig: width 40"):
        check_config_keys({**ae, "loss": {**ae["loss"], "disc_ndf": 20}})
    # the LDM sample grids' default prompts (None) are the task's own; a class-conditional run's grids
    # need a label (an empty tuple crashed at the first grid, after the workdir was written)
    check_config_keys({**as_dict, "sample": {**as_dict["sample"], "prompts": None}})
    by_class = {**as_dict, "diffusion": {**as_dict["diffusion"], "conditioning": "class_crossattn", "num_classes": 4},
                "train": {**as_dict["train"], "sample_every": 2}}
    check_config_keys({**by_class, "sample": {**as_dict["sample"], "class_labels": (0, 3)}})
    with pytest.raises(ValueError, match=r"config key sample.class_labels=\(\): the sample grids"):
        check_config_keys({**by_class, "sample": {**as_dict["sample"], "class_labels": ()}})


@pytest.mark.slow
def test_valid_non_default_values_train_a_step(tmp_path):
    config = _parse(LDM, "--config.train.num_steps=1", "--config.train.batch_size=8", "--config.train.log_every=1",
                    "--config.diffusion.prediction_type=v_prediction", "--config.diffusion.offset_noise=-0.05",
                    "--config.data.image_size=12", "--config.sample.guidance_scale=-1.0",
                    "--config.model.unet.layers_per_block=0", "--config.train.checkpoint_every=0")
    loop.train(config, str(tmp_path / "run"), progress=False)
    assert os.path.isdir(tmp_path / "run" / "checkpoints")


def test_an_override_of_a_none_key_says_how_to_declare_it(tmp_path):
    """A key a config file sets to a plain None has no type: ml_collections refuses any override of it
    (its message was a list of dict keys)."""
    path = tmp_path / "none_key.py"
    path.write_text("import ml_collections\n\ndef get_config():\n    c = ml_collections.ConfigDict()\n"
                    "    c.diffusion = dict(min_snr_gamma=None)\n    return c\n")
    argv = ["train.py", f"--config={path}", "--config.diffusion.min_snr_gamma=5"]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True, sys_argv=argv)
    with pytest.raises(Exception) as info:
        fv(argv)
        fv.config
    message = config_flag_error(argv, info.value)
    assert message.startswith("--config.diffusion.min_snr_gamma=5: ") and "placeholder(float)" in message, message
    assert "dict_keys" not in message


@pytest.mark.parametrize("spec, override, key, value", [
    (LDM, "diffusion.min_snr_gamma=5", ("diffusion", "min_snr_gamma"), 5.0),
    (LDM, "first_stage.scale_factor=0.5", ("first_stage", "scale_factor"), 0.5),
    (SEG, "data.ignore_label=255", ("data", "ignore_label"), 255),
    (LAYOUT, "data.layout.no_object_classes=3", ("data", "layout", "no_object_classes"), 3),
    ("ldm_layout2img.py", "data.layout.no_object_classes=3", ("data", "layout", "no_object_classes"), 3),
    # optional objective / loss keys (were missing from the shipped configs: "unknown config key")
    (LDM, "diffusion.loss_type=l1", ("diffusion", "loss_type"), "l1"),
    (INPAINT, "diffusion.rescale_betas_zero_snr=True", ("diffusion", "rescale_betas_zero_snr"), True),
    (SR, "diffusion.input_perturbation=0.1", ("diffusion", "input_perturbation"), 0.1),
    (SEG, "diffusion.original_elbo_weight=0.5", ("diffusion", "original_elbo_weight"), 0.5),
    (LDM, "diffusion.l_simple_weight=2.0", ("diffusion", "l_simple_weight"), 2.0),
    (LDM, "diffusion.v_posterior=0.1", ("diffusion", "v_posterior"), 0.1),
    (LDM, "diffusion.logvar_init=-1.0", ("diffusion", "logvar_init"), -1.0),
    (AE, "loss.learn_logvar=True", ("loss", "learn_logvar"), True),
    (VQ, "loss.pixel_loss=l2", ("loss", "pixel_loss"), "l2"),
    (LDM, "train.keep_checkpoints=0", ("train", "keep_checkpoints"), 0),
])
def test_the_configs_optional_keys_can_be_overridden(spec, override, key, value):
    """The configs declare their optional (None) keys as typed placeholders, so that a user can set them
    (they were plain Nones, which ml_collections refuses to override)."""
    config = _parse(spec, f"--config.{override}")
    if spec.endswith("runlocal"):  # (the full configs need their released checkpoints for the checks)
        check_config_keys(config)
        check_train_config(config)
    for part in key:
        config = config[part]
    assert config == value and type(config) is type(value)


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(lr=-1e-4), "lr must be a finite number >= 0"), (dict(lr=float("nan")), "lr must be a finite"),
    (dict(b1=1.0), "b1 must be in [0, 1)"), (dict(b2=-0.1), "b2 must be in [0, 1)"),
    (dict(eps=0.0), "eps must be a finite number > 0"), (dict(weight_decay=-0.1), "weight_decay"),
    (dict(grad_clip=-1.0), "grad_clip"), (dict(end_lr_factor=-1.0), "end_lr_factor"),
    (dict(warmup_steps=-1), "warmup_steps must be an integer >= 0"), (dict(warmup_steps=2.5), "warmup_steps"),
    (dict(num_steps=-5), "num_steps"), (dict(grad_accum_steps=0), "grad_accum_steps"),
    (dict(ema_decay=1.0), "ema_decay must be in [0, 1)"), (dict(lr="1e-4"), "lr must be a finite number"),
])
def test_optimizer_config_refuses_out_of_range_values(kwargs, fragment):
    with pytest.raises(ValueError) as info:
        optim.OptimizerConfig(**kwargs)
    assert fragment in str(info.value) and "OptimizerConfig." in str(info.value)


def test_optimizer_config_takes_valid_values():
    import numpy as np

    optim.OptimizerConfig(lr=0, b1=0.0, b2=np.float32(0.95), warmup_steps=np.int64(2), num_steps=10,
                          lr_schedule="cosine", grad_clip=0, ema_decay=0.0, end_lr_factor=1)


@pytest.mark.parametrize("override, fragment", [
    ("--config.model.unet.block_out_channels=abc", "model.unet.block_out_channels=('abc',)"),
    ("--config.data.name=nosuchdataset", "data.name='nosuchdataset'"),
], ids=["tuple-abc", "unknown-dataset"])
def test_train_cli_prints_one_line(override, fragment, tmp_path):
    workdir = tmp_path / "run"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    proc = subprocess.run([sys.executable, "train.py", f"--config=configs/{LDM}", f"--workdir={workdir}", override,
                           "--noprogress"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert f"config key {fragment}" in errors[0] and len(errors[0]) < 400, errors[0]
    assert not workdir.exists()


def test_a_tfds_dataset_prepared_without_its_builder_code_is_found(tmp_path):
    """tfds.builder / tfds.data_source read a dataset prepared in data.data_dir from its files when no
    builder code is registered; the data.name check must find it there too (it looked up registered
    builders only), and still refuse the name without that data_dir."""
    import numpy as np
    import tensorflow_datasets as tfds

    from ldm_jax.data.pipeline import check_dataset_name

    class LdmJaxUnregisteredDs(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
                {"label": tfds.features.Tensor(shape=(2,), dtype=np.int64)}))  # (no TensorFlow: no image codec)

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i in range(2):
                yield i, {"label": np.full((2,), i, np.int64)}

    LdmJaxUnregisteredDs(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    check_dataset_name("ldm_jax_unregistered_ds", str(tmp_path))
    with pytest.raises(ValueError, match="config key data.name='ldm_jax_unregistered_ds': neither a built-in"):
        check_dataset_name("ldm_jax_unregistered_ds", str(tmp_path / "elsewhere"))
    # Its splits are known from its files: a split it lacks is named before anything runs.
    check_dataset_name("ldm_jax_unregistered_ds", str(tmp_path), {"data.name": "train", "eval.split": "train[:50%]"})
    with pytest.raises(ValueError, match=r"config key eval.split='validation': dataset 'ldm_jax_unregistered_ds' "
                                         r"has no split 'validation' \(its splits: train\)"):
        check_dataset_name("ldm_jax_unregistered_ds", str(tmp_path), {"data.name": "train", "eval.split": "validation"})


@pytest.mark.parametrize("split,missing", [("test", "test"), ("train+valid", "valid"), ("validation[:10%]", None),
                                           ("train", None), ("all", None), ("all[:50%]", None)])
def test_eval_split_is_checked_before_training(split, missing, tmp_path):
    """eval.split was first read at the first evaluation, after eval_every training steps; a split the
    dataset lacks is now refused with the others (the emoji dataset's splits: train, validation)."""
    config = _parse(AE, "--config.data.name=emoji", f"--config.eval.split={split}")
    if missing is None:
        check_config_keys(config)
        # not read when evaluations are off
        check_config_keys(_parse(AE, "--config.data.name=emoji", "--config.eval.enabled=False",
                                 "--config.eval.split=nonsense"))
        return
    with pytest.raises(ValueError, match=rf"config key eval.split='{re.escape(split)}': dataset 'emoji' has no "
                                         rf"split '{missing}' \(its splits: train, validation\)"):
        check_config_keys(config)
