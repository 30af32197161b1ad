"""Record what the real SAELens computes on our exports (run in a scratch environment, not the project's).

The folders under ``tests/data/saelens/`` are written by our own writers
(``tests/test_formats_saelens.py::write_reference_folders``). This script loads each of them with
SAELens itself and writes ``tests/data/saelens_reference.json``:

* for every SAELens folder: the class SAELens built, the hook names and model name it read, whether
  ``HookedSAETransformer.add_sae`` attached it on a small random TransformerLens model with the same
  hook layout as Gemma 3 (it silently skips unknown hook names), and ``encode`` / ``decode`` /
  ``forward`` on the fixed inputs in ``tests/data/saelens/inputs.json``;
* for every Gemma Scope 2 folder under ``gs2/``: the same outputs through SAELens's own Gemma Scope 2
  loader (``gemma_3``), with its Hub access pointed at the local folder.

Set up once (torch first, pinned, CPU wheel; never a project dependency)::

    python3 -m venv /work/scratch/saelens
    /work/scratch/saelens/bin/pip install torch==2.13.0
    /work/scratch/saelens/bin/pip install torch==2.13.0 sae-lens==6.54.12
    /work/scratch/saelens/bin/python scripts/reference_saelens.py

It needs only torch, numpy and sae-lens; not this package.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import sae_lens
import torch
from sae_lens import SAE, HookedSAETransformer
from sae_lens.loading import pretrained_sae_loaders as loaders
from transformer_lens import HookedTransformerConfig

REPO = Path(__file__).resolve().parents[1]
FOLDERS = REPO / "tests" / "data" / "saelens"
OUTPUT = REPO / "tests" / "data" / "saelens_reference.json"
GS2_REPO = "google/gemma-scope-2-270m-pt"
D_MODEL, N_HEADS = 16, 4


def rounded(t: torch.Tensor) -> list:
    """Floats with 9 significant digits (float32 round-trips) to keep the JSON small and exact."""
    return np.vectorize(lambda v: float(f"{v:.9g}"))(t.detach().double().numpy()).tolist()


def tiny_model() -> HookedSAETransformer:
    """A random 6-layer TransformerLens model whose hook names are those of Gemma 3 in TL."""
    cfg = HookedTransformerConfig(
        n_layers=6, d_model=D_MODEL, n_ctx=16, d_head=D_MODEL // N_HEADS, n_heads=N_HEADS, d_mlp=32, d_vocab=50,
        act_fn="gelu", normalization_type="RMS", use_hook_mlp_in=True,
    )  # fmt: skip
    return HookedSAETransformer(cfg)


def attaches(model: HookedSAETransformer, sae: SAE) -> bool:
    model.reset_saes()
    model.add_sae(sae)
    return bool(model.acts_to_saes)


def outputs(sae: SAE, x: torch.Tensor) -> dict:
    """encode / decode / forward on ``x`` [batch, d_in] (as [batch, heads, d_head] for hook_z SAEs)."""
    n = x.shape[0]
    if sae.cfg.reshape_activations == "hook_z":
        x = x.reshape(n, N_HEADS, -1)
    with torch.no_grad():
        f = sae.encode(x)
        return {
            "encode": rounded(f),
            "decode": rounded(sae.decode(f).reshape(n, -1)),
            "forward": rounded(sae(x).reshape(n, -1)),
        }


def runs_in_model(model: HookedSAETransformer, sae: SAE) -> bool | None:
    """Whether a forward pass with the SAE spliced in runs (None: widths differ from the model's)."""
    if sae.cfg.d_in != D_MODEL or getattr(sae.cfg, "d_out", D_MODEL) != D_MODEL:
        return None
    with torch.no_grad():
        logits = model.run_with_saes(torch.tensor([[1, 2, 3, 4, 5]]), saes=[sae])
    return bool(torch.isfinite(logits).all())


def record_saelens_folders(x: torch.Tensor) -> dict:
    model = tiny_model()
    out = {}
    for folder in sorted(p for p in FOLDERS.iterdir() if (p / "cfg.json").exists()):
        sae = SAE.load_from_disk(folder)
        meta = sae.cfg.metadata
        out[folder.name] = {
            "class": type(sae).__name__,
            "architecture": sae.cfg.architecture(),
            "hook_name": meta.hook_name,
            "hook_name_out": meta.hook_name_out,
            "hf_hook_name": meta.hf_hook_name,
            "model_name": meta.model_name,
            "l0": meta.l0,
            "attached": attaches(model, sae),
            "runs_in_model": runs_in_model(model, sae),
            "reshape_activations": sae.cfg.reshape_activations,
            **outputs(sae, x),
        }
    return out


def record_gemma_scope_2_folders(x: torch.Tensor) -> dict:
    root = FOLDERS / "gs2"

    def local_download(repo_id, filename, subfolder=None, **_):
        assert repo_id == GS2_REPO, repo_id
        return str(root / (f"{subfolder}/{filename}" if subfolder else filename))

    def local_shapes(repo_id, filename):
        from safetensors import safe_open

        with safe_open(local_download(repo_id, filename), "np") as f:
            return {k: list(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118

    loaders.hf_hub_download = local_download
    loaders.get_safetensors_tensor_shapes = local_shapes
    out = {}
    for config in sorted(root.rglob("config.json")):
        folder = str(config.parent.relative_to(root))

        def convert(path, device="cpu", cfg_overrides=None, folder=folder):
            cfg, state, _ = loaders.gemma_3_sae_huggingface_loader(GS2_REPO, folder, device)
            return cfg, state

        sae = SAE.load_from_disk(root / folder, converter=convert)
        meta = sae.cfg.metadata
        out[folder] = {
            "class": type(sae).__name__,
            "hook_name": meta.hook_name,
            "hook_name_out": meta.hook_name_out,
            "model_name": meta.model_name,
            **outputs(sae, x),
        }
    return out


def main() -> None:
    logging.getLogger("sae_lens").setLevel(logging.ERROR)
    torch.manual_seed(0)
    x_list = json.loads((FOLDERS / "inputs.json").read_text())["x"]
    x = torch.tensor(x_list, dtype=torch.float32)
    reference = {
        "sae_lens_version": sae_lens.__version__,
        "torch_version": torch.__version__,
        "inputs": x_list,
        "saelens": record_saelens_folders(x),
        "gemma_scope_2": record_gemma_scope_2_folders(x),
    }
    OUTPUT.write_text(json.dumps(reference, indent=1) + "\n")
    for name, entry in {**reference["saelens"], **reference["gemma_scope_2"]}.items():
        print(
            f"{name:50s} {entry['class']:24s} {entry['hook_name']:28s} attached={entry.get('attached')} runs={entry.get('runs_in_model')}"
        )
    print(f"wrote {OUTPUT} ({OUTPUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
