"""Reference attribution graphs from circuit-tracer 0.5.0 on a tiny random Gemma 3.

Needs torch, transformers<=4.57.3, nnsight==0.6.3 and circuit-tracer==0.5.0 (a scratch
environment; they are not project dependencies)::

    python3 -m venv /tmp/ct && /tmp/ct/bin/pip install torch==2.13.0
    /tmp/ct/bin/pip install torch==2.13.0 circuit-tracer==0.5.0 "transformers<=4.57.3" nnsight==0.6.3
    /tmp/ct/bin/python scripts/reference_circuit_tracer.py

Writes ``tests/data/circuit_tracer/``: ``model/`` (a 4-layer random Gemma 3 saved by
transformers, with a 64-token word-level tokenizer), ``transcoders.safetensors`` (random JumpReLU
transcoders in our layout: w_enc [d, n], w_dec [n, d], w_skip [d_in, d_out], and a random
JumpReLU CLT with skips, w_dec.{i} [n, n_layers - i, d]) and, per case,
``graph_<case>.npz`` with circuit-tracer's active features, activations, selected features,
adjacency matrix, logit tokens and probabilities, plus the model's logits on the prompt.
``tests/test_circuits_reference.py`` compares `gemma_scope_pz.circuits.attribute` against them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "circuit_tracer"
PROMPT = [2, 5, 9, 13, 7, 22, 31, 4, 17, 40]
D_MODEL, D_SAE, N_LAYERS, VOCAB = 32, 40, 4, 64
CASES = {"skip": True, "noskip": False, "clt": True}


def _tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}
    vocab.update({f"t{i}": i for i in range(4, VOCAB)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
        unk_token="<unk>",
    )  # fmt: skip
    fast.save_pretrained(folder)


def _model(folder: Path):
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=D_MODEL, intermediate_size=48, num_hidden_layers=N_LAYERS,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
        sliding_window=4, max_position_embeddings=128, rope_theta=1_000_000.0,
        rope_local_base_freq=10_000.0, rms_norm_eps=1e-6,
        layer_types=["sliding_attention", "full_attention"] * (N_LAYERS // 2),
        final_logit_softcapping=None, attn_logit_softcapping=None, tie_word_embeddings=True,
        pad_token_id=0, eos_token_id=1, bos_token_id=2,
    )  # fmt: skip
    config.architectures = ["Gemma3ForCausalLM"]
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(0.1 * torch.randn_like(p))
            elif "embed" in name:
                p.copy_(torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / p.shape[1] ** 0.5)
    model.save_pretrained(folder, safe_serialization=True)
    return model


def _transcoders(skip: bool) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    out = {}
    for layer in range(N_LAYERS):
        out[f"{layer}.w_enc"] = rng.normal(size=(D_MODEL, D_SAE)) / np.sqrt(D_MODEL)
        out[f"{layer}.b_enc"] = 0.1 * rng.normal(size=D_SAE)
        out[f"{layer}.threshold"] = rng.uniform(0.2, 0.4, size=D_SAE)
        out[f"{layer}.w_dec"] = 0.1 * rng.normal(size=(D_SAE, D_MODEL))
        out[f"{layer}.b_dec"] = 0.1 * rng.normal(size=D_MODEL)
        w_skip = 0.05 * rng.normal(size=(D_MODEL, D_MODEL))
        if skip:
            out[f"{layer}.w_skip"] = w_skip
    return {k: v.astype(np.float32) for k, v in out.items()}


def _clt_arrays() -> dict[str, np.ndarray]:
    """A random JumpReLU CLT with affine skips: w_dec.{i} is [n, N_LAYERS - i, d]."""
    rng = np.random.default_rng(1)
    out = {}
    for i in range(N_LAYERS):
        out[f"w_enc.{i}"] = rng.normal(size=(D_MODEL, D_SAE)) / np.sqrt(D_MODEL)
        out[f"b_enc.{i}"] = 0.1 * rng.normal(size=D_SAE)
        out[f"threshold.{i}"] = rng.uniform(0.2, 0.4, size=D_SAE)
        out[f"w_dec.{i}"] = 0.1 * rng.normal(size=(D_SAE, N_LAYERS - i, D_MODEL))
        out[f"b_dec.{i}"] = 0.1 * rng.normal(size=D_MODEL)
        out[f"w_skip.{i}"] = 0.05 * rng.normal(size=(D_MODEL, D_MODEL))
    return {k: v.astype(np.float32) for k, v in out.items()}


def _clt(arrays: dict[str, np.ndarray]):
    import torch
    from circuit_tracer.transcoder.cross_layer_transcoder import CrossLayerTranscoder

    clt = CrossLayerTranscoder(
        N_LAYERS, D_SAE, D_MODEL, activation_function="jump_relu", skip_connection=True,
        lazy_decoder=False, lazy_encoder=False, feature_input_hook="mlp.hook_in",
        feature_output_hook="hook_mlp_out", device=torch.device("cpu"), dtype=torch.float32,
    )  # fmt: skip

    def stack(name):
        return torch.tensor(np.stack([arrays[f"{name}.{i}"] for i in range(N_LAYERS)]))

    with torch.no_grad():
        clt.W_enc.copy_(stack("w_enc").transpose(1, 2))
        clt.b_enc.copy_(stack("b_enc"))
        clt.b_dec.copy_(stack("b_dec"))
        clt.W_skip.copy_(stack("w_skip"))  # circuit-tracer's CLT computes x @ W_skip[layer]
        clt.activation_function.threshold.copy_(stack("threshold")[:, None, :])
        for i in range(N_LAYERS):
            clt.W_dec[i].copy_(torch.tensor(arrays[f"w_dec.{i}"]))
    return clt


def _transcoder_set(arrays: dict[str, np.ndarray], skip: bool):
    import torch
    from circuit_tracer.transcoder import SingleLayerTranscoder, TranscoderSet
    from circuit_tracer.transcoder.activation_functions import JumpReLU

    def t(x):
        return torch.tensor(np.ascontiguousarray(x))

    layers = {}
    for layer in range(N_LAYERS):
        a = {k.split(".", 1)[1]: v for k, v in arrays.items() if k.startswith(f"{layer}.")}
        tc = SingleLayerTranscoder(
            D_MODEL, D_SAE, JumpReLU(t(a["threshold"])), layer, skip_connection=skip,
            device=torch.device("cpu"), dtype=torch.float32,
        )  # fmt: skip
        with torch.no_grad():
            tc.W_enc.copy_(t(a["w_enc"].T))
            tc.b_enc.copy_(t(a["b_enc"]))
            tc.W_dec.copy_(t(a["w_dec"]))
            tc.b_dec.copy_(t(a["b_dec"]))
            if skip:
                tc.W_skip.copy_(t(a["w_skip"].T))  # circuit-tracer computes x @ W_skip.T
        layers[layer] = tc
    return TranscoderSet(
        layers, feature_input_hook="mlp.hook_in", feature_output_hook="hook_mlp_out"
    )


def main() -> None:
    import torch
    from circuit_tracer import ReplacementModel, attribute
    from safetensors.numpy import save_file

    model_dir = OUT / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    _tokenizer(model_dir)
    hf = _model(model_dir)
    with torch.no_grad():
        hf_logits = hf(torch.tensor([PROMPT])).logits[0].numpy()
    all_arrays = {}
    for case, skip in CASES.items():
        arrays = _clt_arrays() if case == "clt" else _transcoders(skip)
        all_arrays.update({f"{case}.{k}": v for k, v in arrays.items()})
        transcoders = _clt(arrays) if case == "clt" else _transcoder_set(arrays, skip)
        rm = ReplacementModel.from_pretrained_and_transcoders(
            str(model_dir), transcoders, backend="nnsight",
            device=torch.device("cpu"), dtype=torch.float32,
        )  # fmt: skip
        graph = attribute(torch.tensor(PROMPT), rm, max_n_logits=10, desired_logit_prob=0.999)
        logit_ids = [t.vocab_idx for t in graph.logit_targets]
        np.savez_compressed(
            OUT / f"graph_{case}.npz",
            input_tokens=np.asarray(PROMPT),
            active_features=graph.active_features.numpy(),
            activation_values=graph.activation_values.float().numpy(),
            selected_features=graph.selected_features.numpy(),
            adjacency_matrix=graph.adjacency_matrix.float().numpy(),
            logit_tokens=np.asarray(logit_ids),
            logit_probabilities=graph.logit_probabilities.float().numpy(),
            hf_logits=hf_logits,
        )
        print(case, graph.adjacency_matrix.shape, len(graph.active_features), logit_ids)
    save_file(all_arrays, str(OUT / "transcoders.safetensors"))
    (OUT / "versions.json").write_text(
        json.dumps({"circuit_tracer": _version("circuit-tracer"), "torch": torch.__version__,
                    "transformers": _version("transformers"), "nnsight": _version("nnsight")})
    )  # fmt: skip


def _version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


if __name__ == "__main__":
    main()
