"""Every name table of the dictionary formats: our sites <-> Gemma Scope 2 / SAELens hook names.

This package names places in Gemma 3 by site (``"blocks.9.resid_post"``, see
:mod:`gemma_scope_pz.scope.sites`). Gemma Scope 2 configs name the same places by Hugging Face module
path (``"model.layers.9.output"``), and SAELens by TransformerLens hook name
(``"blocks.9.hook_resid_post"``). The SAELens names follow SAELens's own Gemma 3 / Gemma Scope 2
loader (``gemma_3`` in ``sae_lens/loading/pretrained_sae_loaders.py``, sae-lens 6.54):

==============  ==================================================  ============================
site kind       Gemma Scope 2 hook point (HF module path)           SAELens hook name
==============  ==================================================  ============================
resid_pre       ``model.layers.L.input``                            ``blocks.L.hook_resid_pre``
resid_post      ``model.layers.L.output``                           ``blocks.L.hook_resid_post``
attn_out        ``model.layers.L.self_attn.o_proj.input``           ``blocks.L.attn.hook_z``
mlp_in          ``model.layers.L.pre_feedforward_layernorm.output`` ``blocks.L.hook_mlp_in``
mlp_out         ``model.layers.L.post_feedforward_layernorm.output`` ``blocks.L.hook_mlp_out``
==============  ==================================================  ============================

Released CLT configs use a placeholder for the layer (``model.layers.{all}.pre_feedforward_layernorm
.output``); `site_kind_from_hook` accepts those. ``ARCHITECTURE_NAMES`` maps every architecture
spelling we read to our activation name.
"""

from __future__ import annotations

import re

__all__ = [
    "ARCHITECTURE_NAMES",
    "SAELENS_HOOKS",
    "check_model_family",
    "hf_hook_point",
    "hf_model_id",
    "hook_from_site",
    "model_family",
    "saelens_hook_name",
    "site_from_hook",
    "site_kind_from_hook",
]

# Architecture names in Gemma Scope 2 configs (and our older exports) -> our activation names.
ARCHITECTURE_NAMES: dict[str, str] = {
    "jump_relu": "jumprelu",
    "jumprelu": "jumprelu",
    "relu": "relu",
    "topk": "topk",
}

# Site kind -> Gemma Scope 2 hook point ("{}" is the layer).
_GS2_HOOKS: dict[str, str] = {
    "resid_post": "model.layers.{}.output",
    "resid_pre": "model.layers.{}.input",
    "attn_out": "model.layers.{}.self_attn.o_proj.input",
    "mlp_in": "model.layers.{}.pre_feedforward_layernorm.output",
    "mlp_out": "model.layers.{}.post_feedforward_layernorm.output",
}
# Site kind -> SAELens (TransformerLens) hook name ("{}" is the layer).
SAELENS_HOOKS: dict[str, str] = {
    "resid_pre": "blocks.{}.hook_resid_pre",
    "resid_post": "blocks.{}.hook_resid_post",
    "attn_out": "blocks.{}.attn.hook_z",
    "mlp_in": "blocks.{}.hook_mlp_in",
    "mlp_out": "blocks.{}.hook_mlp_out",
}
# The optional "language_model." covers the multimodal Gemma 3 module tree (4B and up).
_LAYER = r"([0-9]+|\{all\}|\{layer\}|\{\}|\*)"
_HOOK_PATTERNS: tuple[tuple[re.Pattern, str], ...] = tuple(
    (
        re.compile(
            r"model\.(?:language_model\.)?layers\."
            + _LAYER
            + re.escape(template[len("model.layers.{}") :])
        ),
        kind,
    )
    for kind, template in _GS2_HOOKS.items()
)
_SITE_RE = re.compile(r"blocks\.([0-9]+)\.(resid_pre|resid_post|attn_out|mlp_in|mlp_out)")


def _known_forms() -> str:
    return ", ".join(template.format("L") for template in _GS2_HOOKS.values())


def site_kind_from_hook(name: str) -> tuple[str, int | None]:
    """(site kind, layer) of a hook point; the layer is None for a placeholder (``{all}``).

    Raises:
      ValueError: naming the hook when it is not a known form.
    """
    for pattern, kind in _HOOK_PATTERNS:
        match = pattern.fullmatch(name)
        if match:
            layer = match.group(1)
            return kind, int(layer) if layer.isdigit() and layer.isascii() else None
    match = _SITE_RE.fullmatch(name)
    if match and match.group(1).isascii():
        return match.group(2), int(match.group(1))
    raise ValueError(f"unknown Gemma Scope hook point {name!r}; known forms: {_known_forms()}")


def site_from_hook(name: str) -> str:
    """Our site name ("blocks.9.resid_post") for a Gemma Scope 2 hook point (or a site name).

    Raises:
      ValueError: naming the hook when it is not in the table or has no layer number.
    """
    kind, layer = site_kind_from_hook(name)
    if layer is None:
        raise ValueError(f"hook point {name!r} names all layers; give one layer")
    return f"blocks.{layer}.{kind}"


def _parse_site(site: str) -> tuple[int, str]:
    match = _SITE_RE.fullmatch(site or "")
    if not match or not match.group(1).isascii():
        raise ValueError(
            f"unknown site {site!r}; expected 'blocks.<layer>.<kind>' with kind in "
            f"{tuple(_GS2_HOOKS)}"
        )
    return int(match.group(1)), match.group(2)


def hook_from_site(site: str) -> str:
    """Gemma Scope 2 hook point of a site: "blocks.9.resid_post" -> "model.layers.9.output"."""
    layer, kind = _parse_site(site)
    return _GS2_HOOKS[kind].format(layer)


def saelens_hook_name(site: str) -> str:
    """SAELens's hook name of a site: "blocks.9.resid_post" -> "blocks.9.hook_resid_post"."""
    layer, kind = _parse_site(site)
    return SAELENS_HOOKS[kind].format(layer)


def hf_hook_point(site: str) -> str:
    """Like `hook_from_site`, but a name that is not a standard site is returned unchanged."""
    try:
        return hook_from_site(site)
    except ValueError:
        return site


_MODEL_SIZES = ("270m", "1b", "4b", "12b", "27b")


def hf_model_id(name: str) -> str:
    """The Hugging Face id of a Gemma 3 model named any way we accept.

    "270m", "gemma3-270m", "hf:google/gemma-3-270m" -> "google/gemma-3-270m" (the 270M base model has
    no "-pt" suffix on the Hub); "1b" -> "google/gemma-3-1b-pt"; an "-it" name keeps "-it".

    Raises:
      ValueError: naming ``name`` when no Gemma 3 size can be read from it.
    """
    text = str(name or "").strip().lower()
    text = text.removeprefix("hf:")
    match = re.search(
        r"(?:^|[^0-9a-z])(?:gemma[-_]?3[-_]|gemma[-_]v3[-_])?(270m|1b|4b|12b|27b)\b", text
    )
    if not match or ("gemma" in text and not re.search(r"gemma[-_]?v?3", text)):
        raise ValueError(
            f"model name {name!r} is not a Gemma 3 model; expected e.g. 'google/gemma-3-270m' or "
            f"one of the sizes {_MODEL_SIZES}"
        )
    size = match.group(1)
    instruct = bool(re.search(r"[-_]it\b", text))
    suffix = "-it" if instruct else ("" if size == "270m" else "-pt")
    return f"google/gemma-3-{size}{suffix}"


def model_family(model_name: str | None) -> str | None:
    """ "gemma2" or "gemma3" for a model name in any spelling we meet, None when it names neither.

    "google/gemma-2-2b", "gemma2-9b", "gemma-2-27b-it" -> "gemma2"; "google/gemma-3-270m",
    "gemma3-1b", "270m" -> "gemma3" (the bare sizes are Gemma 3's presets).
    """
    text = str(model_name or "").strip().lower().removeprefix("hf:")
    if re.search(r"gemma[-_]?v?2(?![0-9])", text):
        return "gemma2"
    if re.search(r"gemma[-_]?v?3(?![0-9])", text) or text in _MODEL_SIZES:
        return "gemma3"
    return None


def check_model_family(sae_model: str | None, config, what: str = "dictionary") -> None:
    """Refuses a dictionary trained on one Gemma generation attached to the other.

    Args:
      sae_model: The model the dictionary was trained on (``meta.extra["model_name"]``), or None.
      config: The model's ``Gemma3Config`` (its ``family`` and ``name`` are read).
      what: How to call the dictionary in the message (e.g. its source).

    Raises:
      ValueError: naming both models when their families differ.
    """
    family = model_family(sae_model)
    model_family_ = getattr(config, "family", None)
    if family is None or model_family_ is None or family == model_family_:
        return
    raise ValueError(
        f"{what} was trained on {sae_model} ({family}) but the model is "
        f"{getattr(config, 'name', '?')} ({model_family_}); load a {family} model "
        f"(e.g. gs.load_model('hf:{sae_model}')) or a dictionary for {model_family_}"
    )
