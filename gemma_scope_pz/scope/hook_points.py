"""Gemma Scope 2 hook points (Hugging Face module paths) <-> our site names.

Gemma Scope 2 configs name where a dictionary reads and writes by HF module path, e.g.
``"model.layers.9.output"``; this package names the same places ``"blocks.9.resid_post"``.
"""

from __future__ import annotations

import re

__all__ = ["hook_from_site", "site_from_hook"]

# (HF module path pattern in Gemma Scope 2 configs, our site kind). The optional
# "language_model." covers the multimodal Gemma 3 module tree (4B and up).
_HOOK_TABLE: tuple[tuple[str, str], ...] = (
    (r"model\.(?:language_model\.)?layers\.(\d+)\.output", "resid_post"),
    (r"model\.(?:language_model\.)?layers\.(\d+)\.input", "resid_pre"),
    (r"model\.(?:language_model\.)?layers\.(\d+)\.self_attn\.o_proj\.input", "attn_out"),
    (r"model\.(?:language_model\.)?layers\.(\d+)\.pre_feedforward_layernorm\.output", "mlp_in"),
    (r"model\.(?:language_model\.)?layers\.(\d+)\.post_feedforward_layernorm\.output", "mlp_out"),
    (r"blocks\.(\d+)\.(?:resid_pre|resid_post|attn_out|mlp_in|mlp_out)", ""),  # already a site
)
_SITE_TO_HOOK = {
    "resid_post": "model.layers.{}.output",
    "resid_pre": "model.layers.{}.input",
    "attn_out": "model.layers.{}.self_attn.o_proj.input",
    "mlp_in": "model.layers.{}.pre_feedforward_layernorm.output",
    "mlp_out": "model.layers.{}.post_feedforward_layernorm.output",
}


def site_from_hook(name: str) -> str:
    """Our site name ("blocks.9.resid_post") for a Gemma Scope 2 hook point.

    Raises:
      ValueError: naming the hook when it is not in the table.
    """
    for pattern, kind in _HOOK_TABLE:
        match = re.fullmatch(pattern, name)
        if match:
            return name if not kind else f"blocks.{int(match.group(1))}.{kind}"
    known = ", ".join(template.format("L") for template in _SITE_TO_HOOK.values())
    raise ValueError(f"unknown Gemma Scope hook point {name!r}; known forms: {known}")


def hook_from_site(site: str) -> str:
    """Inverse of `site_from_hook`: "blocks.9.resid_post" -> "model.layers.9.output"."""
    match = re.fullmatch(r"blocks\.(\d+)\.(\w+)", site)
    if not match or match.group(2) not in _SITE_TO_HOOK:
        raise ValueError(f"unknown site {site!r}; expected 'blocks.<layer>.<kind>'")
    return _SITE_TO_HOOK[match.group(2)].format(int(match.group(1)))
