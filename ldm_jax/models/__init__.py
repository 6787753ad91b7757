"""Flax Linen modules (NHWC)."""
