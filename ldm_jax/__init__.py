"""ldm_jax: Latent Diffusion Models and Stable Diffusion in JAX/Flax."""

__version__ = "0.1.0"
