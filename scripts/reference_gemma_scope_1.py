"""Gemma Scope 1 reference data from SAELens (run in a scratch environment, not the project's).

Two sub-commands, both needing only numpy, torch and sae-lens (6.54.12 in /work/scratch/saelens)::

    /work/scratch/saelens/bin/python scripts/reference_gemma_scope_1.py record
    /work/scratch/saelens/bin/python scripts/reference_gemma_scope_1.py canonical

``record`` writes small random ``params.npz`` files laid out as the Hub repos are
(``tests/data/gemma_scope_1/<repo>/<sae id>/params.npz``: a residual, an MLP-output, an attention
and an embedding SAE, and a transcoder), loads each with SAELens's own Gemma Scope 1 loaders
(``gemma_2`` / ``gemma_2_transcoder``, their Hub access pointed at the local file) and records in
``tests/data/gemma_scope_1_reference.json`` the hook names and model name SAELens reads and its
``encode`` / ``decode(encode)`` on fixed inputs. SAELens's loaders take the widths from the repo
name (d_in = 2304 for 2b); the small files need ``cfg_overrides`` d_in / d_sae (/ d_out), which
its loaders apply before the embedding rescaling, so the rescaling uses the file's width as ours.

``canonical`` writes ``gemma_scope_pz/scope/formats/gemma_scope_1_canonical.json``: for every
Gemma Scope 1 "-canonical" release in SAELens's ``pretrained_saes.yaml``, which ``average_l0_N``
folder each ``layer_L/width_W/canonical`` id names (the Hub repos hold only the L0 folders).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import sae_lens
import torch
import yaml
from sae_lens import SAE
from sae_lens.loading import pretrained_sae_loaders as loaders

REPO = Path(__file__).resolve().parents[1]
FOLDER = REPO / "tests" / "data" / "gemma_scope_1"
OUTPUT = REPO / "tests" / "data" / "gemma_scope_1_reference.json"
CANONICAL = REPO / "gemma_scope_pz" / "scope" / "formats" / "gemma_scope_1_canonical.json"
D_MODEL, D_ATT, D_SAE, N_ROWS, N_HEADS = 24, 16, 40, 6, 4

# (repo, SAE id, SAELens loader, input width)
CASES = [
    ("google/gemma-scope-2b-pt-res", "layer_3/width_16k/average_l0_82", "gemma_2", D_MODEL),
    ("google/gemma-scope-2b-pt-mlp", "layer_1/width_16k/average_l0_119", "gemma_2", D_MODEL),
    ("google/gemma-scope-2b-pt-att", "layer_2/width_16k/average_l0_104", "gemma_2", D_ATT),
    ("google/gemma-scope-2b-pt-res", "embedding/width_4k/average_l0_6", "gemma_2", D_MODEL),
    (
        "google/gemma-scope-2b-pt-transcoders",
        "layer_2/width_16k/average_l0_76",
        "gemma_2_transcoder",
        D_MODEL,
    ),
    ("google/gemma-scope-9b-it-res", "layer_1/width_16k/average_l0_88", "gemma_2", D_MODEL),
]


def rounded(t: torch.Tensor) -> list:
    """Floats with 9 significant digits (float32 round-trips exactly)."""
    return np.vectorize(lambda v: float(f"{v:.9g}"))(t.detach().double().numpy()).tolist()


def write_npz(path: Path, d_in: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    d_out = d_in  # SAEs reconstruct their input; the transcoder's d_in is D_MODEL too
    arrays = {
        "W_enc": rng.normal(size=(d_in, D_SAE)) / np.sqrt(d_in),
        "b_enc": rng.normal(size=D_SAE) * 0.1,
        "W_dec": rng.normal(size=(D_SAE, d_out)) / np.sqrt(D_SAE),
        "b_dec": rng.normal(size=d_out) * 0.1,
        "threshold": np.abs(rng.normal(size=D_SAE)) * 0.3,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **{k: v.astype(np.float32) for k, v in arrays.items()})


def local_download(repo_id: str, filename: str, subfolder: str | None = None, **_) -> str:
    return str(FOLDER / repo_id / (subfolder or "") / filename)


def saelens_sae(repo: str, sae_id: str, loader: str, d_in: int) -> tuple[dict, SAE]:
    """The config dict and SAE that SAELens's own loader builds from the local file."""
    overrides = {"d_in": d_in, "d_sae": D_SAE, "device": "cpu", "dtype": "float32"}
    if loader == "gemma_2_transcoder":
        overrides["d_out"] = D_MODEL
    cfg, state, _ = loaders.NAMED_PRETRAINED_SAE_LOADERS[loader](
        repo_id=repo, folder_name=sae_id, device="cpu", cfg_overrides=overrides
    )
    cfg_cls = SAE.get_sae_config_class_for_architecture(cfg["architecture"])
    sae_cfg = cfg_cls.from_dict(loaders.handle_config_defaulting(dict(cfg)))
    sae = SAE.get_sae_class_for_architecture(sae_cfg.architecture())(sae_cfg)
    sae.process_state_dict_for_loading(state)
    sae.load_state_dict(state)
    return cfg, sae.eval()


def record() -> None:
    loaders.hf_hub_download = local_download
    out = {"sae_lens": sae_lens.__version__, "torch": torch.__version__, "cases": []}
    for seed, (repo, sae_id, loader, d_in) in enumerate(CASES):
        write_npz(FOLDER / repo / sae_id / "params.npz", d_in, seed)
        cfg, sae = saelens_sae(repo, sae_id, loader, d_in)
        x = np.random.default_rng(100 + seed).normal(size=(N_ROWS, d_in)).astype(np.float32)
        x_in = torch.tensor(x)
        if cfg["hook_name"].endswith("attn.hook_z"):  # SAELens flattens [.., heads, d_head]
            x_in = x_in.reshape(N_ROWS, N_HEADS, d_in // N_HEADS)
        with torch.no_grad():
            feats = sae.encode(x_in)
            recon = sae.decode(feats).reshape(N_ROWS, -1)
        out["cases"].append(
            {
                "repo": repo,
                "sae_id": sae_id,
                "loader": loader,
                "saelens_class": type(sae).__name__,
                "hook_name": cfg["hook_name"],
                "hook_name_out": cfg.get("hook_name_out"),
                "model_name": cfg["model_name"],
                "x": rounded(torch.tensor(x)),
                "encode": rounded(feats),
                "decode": rounded(recon),
                "active": int((feats > 0).sum()),
            }
        )
        print(repo, sae_id, type(sae).__name__, cfg["hook_name"], file=sys.stderr)
    OUTPUT.write_text(json.dumps(out) + "\n")


def canonical() -> None:
    releases = yaml.safe_load((Path(sae_lens.__file__).parent / "pretrained_saes.yaml").read_text())
    table: dict[str, dict[str, str]] = {}
    for name, release in sorted(releases.items()):
        if not (name.startswith("gemma-scope-") and name.endswith("-canonical")):
            continue
        if name.startswith("gemma-scope-2-"):
            continue  # Gemma Scope 2 has no canonical aliases in SAELens
        entries = table.setdefault(release["repo_id"], {})
        for sae in release["saes"]:
            sae_id, path = sae["id"], sae["path"]
            assert sae_id.endswith("/canonical"), sae_id
            assert path.rsplit("/", 1)[0] == sae_id.rsplit("/", 1)[0], (sae_id, path)
            entries[sae_id.removesuffix("/canonical")] = path.rsplit("/", 1)[1]
    lines = ",\n".join(
        f"  {json.dumps(repo)}: {json.dumps(entries, separators=(',', ':'))}"
        for repo, entries in table.items()
    )
    header = f"generated by scripts/reference_gemma_scope_1.py from sae-lens {sae_lens.__version__}"
    CANONICAL.write_text(f'{{\n  "_source": {json.dumps(header)},\n{lines}\n}}\n')
    print("wrote", CANONICAL, sum(len(e) for e in table.values()), "entries", file=sys.stderr)


if __name__ == "__main__":
    {"record": record, "canonical": canonical}[sys.argv[1]]()
