"""Reading training configuration values (``ml_collections.ConfigDict`` or plain dicts).

ConfigDict raises on a missing key, and many optional keys are ``None`` placeholders;
the trainers read both with ``config_get(cfg, key, default)``.
"""
from __future__ import annotations

from typing import Any, Dict


def config_get(cfg, key: str, default: Any = None) -> Any:
    """``cfg[key]``; ``default`` when the key is missing, its value is None, or cfg is None."""
    try:
        value = cfg[key]
    except (KeyError, AttributeError, TypeError):
        return default
    return default if value is None else value


def config_as_dict(cfg) -> Dict[str, Any]:
    """A ConfigDict / mapping as a plain dict ({} for None)."""
    if cfg is None:
        return {}
    return cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
