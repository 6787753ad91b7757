"""ldm_jax: Latent Diffusion Models and Stable Diffusion in JAX/Flax.

    import ldm_jax
    pipe = ldm_jax.load_pipeline("path/to/model")
    images = pipe("a red apple")        # (B, H, W, 3) float32 in [0, 1]
"""

__version__ = "0.1.0"
__all__ = ["Pipeline", "load_pipeline", "__version__"]


def __getattr__(name):
    # Imported on first use, so `import ldm_jax.models.unet` stays light.
    if name in ("Pipeline", "load_pipeline"):
        from ldm_jax import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'ldm_jax' has no attribute {name!r}")
