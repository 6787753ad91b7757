"""ldm_jax/executable_store.py: with the persistent compilation cache on, a pipeline's compiled
sampling chain is stored whole and a later pipeline (a later process) runs it without tracing,
with bit-identical output; any change to what the program depends on is a new entry; a bad
entry is compiled again."""
import glob
import os

import jax
import numpy as np
import pytest

import ldm_jax
from ldm_jax import executable_store
from ldm_jax.compile_cache import disable_compilation_cache, enable_compilation_cache
from ldm_jax.diffusion import samplers
from tiny_sd import tiny_sd_pipeline

H = W = 16


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_sd_store")
    tiny_sd_pipeline(str(folder))
    return str(folder)


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A fresh persistent cache (and so a fresh store) for one test; the previous settings after."""
    monkeypatch.delenv(executable_store.ENV_VAR, raising=False)
    previous = (jax.config.jax_enable_compilation_cache, jax.config.jax_compilation_cache_dir)
    enable_compilation_cache(str(tmp_path / "cache"))
    yield os.path.join(str(tmp_path / "cache"), executable_store.SUBDIR)
    if previous[1] and previous[0]:
        enable_compilation_cache(previous[1])
    else:
        disable_compilation_cache()


@pytest.fixture
def traces(monkeypatch):
    """How many times the sampling chain is traced (samplers.sample runs only while tracing)."""
    count = []
    original = samplers.sample

    def counting(*args, **kwargs):
        count.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(samplers, "sample", counting)
    return count


def run(pipe, **kw):
    args = dict(num_inference_steps=3, guidance_scale=7.5, height=H, width=W, sampler="ddim", seed=3)
    return pipe(["a red apple"], **{**args, **kw})


def entries(folder):
    return sorted(glob.glob(os.path.join(folder, "*.bin")))


def test_a_stored_chain_runs_in_a_new_pipeline_without_tracing(sd_folder, store, traces):
    first = ldm_jax.load_pipeline(sd_folder)
    want = run(first)
    assert len(traces) == 1 and len(entries(store)) == 1

    second = ldm_jax.load_pipeline(sd_folder)  # a new pipeline: nothing compiled in it yet
    got = run(second)
    program = [fn for key, fn in second._jit_cache.items() if key[0] == "generate"][0]
    assert program.loaded_from_store == 1
    assert len(traces) == 1  # not traced again
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(run(second, seed=4), run(first, seed=4))  # the seed is an input
    assert len(traces) == 1 and len(entries(store)) == 1


def test_what_changes_the_program_is_a_new_entry(sd_folder, store, traces):
    pipe = ldm_jax.load_pipeline(sd_folder)
    run(pipe)
    run(pipe, guidance_scale=1.0)  # another static switch of the chain (no CFG branch)
    run(pipe, num_inference_steps=4)  # other argument shapes
    other = ldm_jax.load_pipeline(sd_folder)
    other.unet = other.unet.clone(attention_impl="blocked")  # another module configuration
    run(other)
    assert len(entries(store)) == 4 and len(traces) == 4


def test_the_call_signature_holds_static_fields_and_placement():
    """Cheaper than compiling each: what distinguishes two calls with the same array shapes."""
    from ldm_jax.diffusion.schedule import NoiseSchedule

    schedule = NoiseSchedule.from_diffusers_config({})
    eps = samplers.make_plan("ddim", schedule, 4)
    v = eps.replace(prediction_type="v_prediction")  # same arrays, another static field
    sig = executable_store.call_signature
    assert sig((eps,)) == sig((eps.replace(),)) and sig((eps,)) != sig((v,))
    x = np.zeros((2, 3), np.float32)
    assert sig((x,)) != sig((x.astype(np.float16),)) and sig((x,)) != sig((x[:1],))
    on = [jax.device_put(x, d) for d in jax.devices()[:2]]
    assert sig((on[0],)) != sig((on[1],))  # another device


def test_a_bad_entry_is_compiled_again(sd_folder, store, traces, caplog):
    want = run(ldm_jax.load_pipeline(sd_folder))
    (path,) = entries(store)
    with open(path, "r+b") as f:
        f.truncate(100)
    got = run(ldm_jax.load_pipeline(sd_folder))
    np.testing.assert_array_equal(got, want)
    assert len(traces) == 2
    assert "cannot load the stored executable" in caplog.text
    assert os.path.getsize(path) > 100  # written again


def test_the_store_follows_the_persistent_cache(sd_folder, tmp_path, monkeypatch, traces):
    previous = (jax.config.jax_enable_compilation_cache, jax.config.jax_compilation_cache_dir)
    try:
        disable_compilation_cache()
        assert executable_store.store_dir() is None
        enable_compilation_cache(str(tmp_path / "c"))
        monkeypatch.setenv(executable_store.ENV_VAR, "off")
        assert executable_store.store_dir() is None
        run(ldm_jax.load_pipeline(sd_folder))
        assert not os.path.exists(tmp_path / "c" / executable_store.SUBDIR)
    finally:
        if previous[1] and previous[0]:
            enable_compilation_cache(previous[1])
        else:
            disable_compilation_cache()


def test_parameter_shapes_are_read_back_without_tracing(sd_folder, store, monkeypatch):
    """Loading traces each module's init for its parameter shapes; with the store on a second
    load reads them back (one small JSON file per module) and builds the same parameters."""
    first = ldm_jax.load_pipeline(sd_folder)
    assert len(glob.glob(os.path.join(store, "*.shapes.json"))) == 3  # U-Net, VAE, text encoder
    calls = []
    original = jax.eval_shape
    monkeypatch.setattr(jax, "eval_shape", lambda *a, **k: calls.append(1) or original(*a, **k))
    second = ldm_jax.load_pipeline(sd_folder)
    assert not calls
    same = jax.tree_util.tree_map(lambda a, b: a.dtype == b.dtype and np.array_equal(a, b),
                                  first.params, second.params)
    assert jax.tree_util.tree_structure(first.params) == jax.tree_util.tree_structure(second.params)
    assert all(jax.tree_util.tree_leaves(same))
    other = second.unet.clone(attention_impl="blocked")  # another module repr: traced again
    executable_store.stored_param_shapes(other, unet_inputs(other))
    assert calls  # traced (nested eval_shape calls inside the U-Net count too)


def unet_inputs(unet):
    from ldm_jax.models.unet import unet_dummy_inputs

    return unet_dummy_inputs(unet.config)


def test_subclasses_still_choose_how_the_chain_is_jitted(sd_folder):
    """Pipeline._jit is the extension point for every program, the sampling chain included (the
    training sampler replicates its outputs over the mesh there; multi-process runs read them)."""
    import dataclasses

    seen = []

    from ldm_jax.pipeline import Pipeline

    class Custom(Pipeline):
        def _jit(self, key, fn):
            seen.append(key)
            return jax.jit(fn)

    pipe = ldm_jax.load_pipeline(sd_folder)
    custom = Custom(**{f.name: getattr(pipe, f.name) for f in dataclasses.fields(pipe) if f.name != "_jit_cache"})
    fn = custom._generate_fn("txt2img", True, 0, False, False, None)  # builds, compiles nothing
    assert seen and seen[-1][0] == "generate" and not isinstance(fn, executable_store.StoredProgram)
