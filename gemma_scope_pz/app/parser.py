"""The ``gemma-scope-pz`` argument parser: every subcommand and option, with help and defaults.

Every option shows its default; ``train`` gets one ``--section.field`` option per ``TrainConfig``
field (:mod:`gemma_scope_pz.app.overrides`); usage errors are one line ``error: …`` with exit status 2.
The commands themselves are in :mod:`gemma_scope_pz.app.cli`.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import gemma_scope_pz as gs
from gemma_scope_pz.app import overrides
from gemma_scope_pz.backend import CPU_MATMULS
from gemma_scope_pz.circuits.cli import add_attribute_parser

DESCRIPTION = "gemma-scope-pz: Gemma 3 and Gemma Scope 2 on the command line."

EXAMPLES = """\
examples:
  gemma-scope-pz tour --quick                 # the whole story on the offline model, ~3 minutes
  gemma-scope-pz generate "The capital of France is" --max-new-tokens 16
  gemma-scope-pz inspect --sae runs/sae/gemma_scope_2 "Energy cannot be created or destroyed."
  gemma-scope-pz train --config configs/resid_post_l9_4096.yaml --sae.k 64 --out runs/sae
  gemma-scope-pz eval --sae google/gemma-scope-2-270m-pt:resid_post/layer_9_width_16k_l0_medium \\
      --model hf:google/gemma-3-270m-pt
  gemma-scope-pz features --sae runs/sae/gemma_scope_2 --out cards.html

Errors print one line `error: ...` (exit 2: bad input, 1: failure while running); add --debug
anywhere for the traceback. `gemma-scope-pz COMMAND --help` lists every option with its default.
"""


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the examples' line breaks and shows every option's default."""


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line ``error: …`` (exit 2) instead of the usage block."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see: {self.prog} --help)\n")


def _model_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default=None,
        help="checkpoint source: a .gguf file, a Hugging Face folder or hf:REPO, an orbax folder "
        "or kaggle:HANDLE (None: the offline Gemma 3 270M)",
    )


def _sae_option(p: argparse.ArgumentParser, required: bool = True, what: str = "SAE") -> None:
    p.add_argument(
        f"--{what.lower()}",
        required=required,
        default=None,
        help=f"{what} folder (config.json + params.safetensors) or REPO:FOLDER of a Gemma Scope 2 "
        "release" + ("" if required else " (None: train one on the offline corpus, cached)"),
    )


def _corpus_option(p: argparse.ArgumentParser, contexts: int) -> None:
    p.add_argument(
        "--corpus",
        default=None,
        help="text files (glob), *.jsonl, hf:DATASET:SPLIT or default+deps (None: the offline "
        "default corpus, read from its end so tour/training text is held out)",
    )
    p.add_argument("--contexts", type=int, default=contexts, help="128-token contexts to use")


def _add_tour(sub) -> None:
    p = sub.add_parser(
        "tour", help="run the whole story on the offline model, write an HTML report"
    )
    _model_option(p)
    _sae_option(p, required=False)
    _sae_option(p, required=False, what="Transcoder")
    p.add_argument("--out", default="gemma_scope_pz_tour", help="report directory")
    p.add_argument("--quick", action="store_true", help="tiny settings (smoke test, ~3 minutes)")
    p.add_argument("--no-cache", action="store_true", help="retrain instead of reusing the cache")


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="continue a prompt (KV-cached, jitted)")
    _model_option(p)
    p.add_argument("prompt", help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k likeliest tokens")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument(
        "--chat",
        action="store_true",
        help="wrap the prompt in the Gemma 3 chat template (-it models)",
    )


def _add_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="table of the top SAE features per token of a text")
    _model_option(p)
    _sae_option(p)
    p.add_argument("text", help="text to inspect (BOS is added and skipped)")
    p.add_argument("--k", type=int, default=5, help="features shown per token")


def _add_train(sub) -> None:
    p = sub.add_parser(
        "train",
        help="harvest activations and train an SAE/transcoder from a config file",
        description="Harvest activations, train, and export to OUT/gemma_scope_2 and OUT/saelens. "
        "Every TrainConfig field can be overridden below (--sae.k 64 --optim.lr 5e-4).",
    )
    _model_option(p)
    p.add_argument("--config", default=None, help="TrainConfig as JSON or YAML (required)")
    p.add_argument("--corpus", default=None, help="corpus spec (None: the offline default corpus)")
    p.add_argument(
        "--tokens", type=int, default=None, help="activations to harvest (None: batch × steps)"
    )
    p.add_argument("--out", default="gemma_scope_pz_train", help="output directory")
    p.add_argument(
        "--stream",
        action="store_true",
        help="train from activations made on the device as it goes (no activation cache; "
        "see docs/streaming.md); resumes from OUT/stream_checkpoints",
    )
    p.add_argument(
        "--packing",
        choices=("document", "concat"),
        default="document",
        help="contexts: one document each, tails padded (document), or documents back to back "
        "with a BOS each, no padding, as SAELens packs (concat)",
    )
    p.add_argument(
        "--model-dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="dtype of the model forward that makes the activations (rows stored as float32)",
    )
    overrides.add_dataclass_options(p, gs.TrainConfig, title="config fields (override --config)")


def _add_eval(sub) -> None:
    p = sub.add_parser(
        "eval", help="FVU, L0, delta loss, CE recovered and KL of an SAE on a corpus"
    )
    _model_option(p)
    _sae_option(p)
    _corpus_option(p, contexts=16)


def _add_features(sub) -> None:
    p = sub.add_parser("features", help="HTML feature cards (max-activating examples, logit lens)")
    _model_option(p)
    _sae_option(p)
    _corpus_option(p, contexts=128)
    p.add_argument(
        "--features", type=int, nargs="*", default=None, help="latent ids (None: most frequent)"
    )
    p.add_argument("--n", type=int, default=20, help="features shown when --features is not given")
    p.add_argument("--k", type=int, default=8, help="examples per feature")
    p.add_argument("--out", default="feature_cards.html", help="HTML file to write")


def _add_steer(sub) -> None:
    p = sub.add_parser(
        "steer", help="generate with and without a feature's decoder direction added"
    )
    _model_option(p)
    _sae_option(p)
    p.add_argument("prompt", help="text to continue")
    p.add_argument("--feature", type=int, required=True, help="latent whose decoder row is added")
    p.add_argument("--coeff", type=float, default=0.5, help="norm-scaled strength (coeff × ‖x‖)")
    p.add_argument("--max-new-tokens", type=int, default=24, help="tokens to generate")


SUBCOMMANDS: dict[str, Callable] = {
    "tour": _add_tour,
    "generate": _add_generate,
    "inspect": _add_inspect,
    "train": _add_train,
    "eval": _add_eval,
    "features": _add_features,
    "steer": _add_steer,
    "attribute": add_attribute_parser,
}


def build_parser() -> argparse.ArgumentParser:
    """The ``gemma-scope-pz`` parser; the chosen subcommand's name lands in ``args.command``."""
    parser = _Parser(
        prog="gemma-scope-pz",
        description=DESCRIPTION,
        epilog=EXAMPLES,
        formatter_class=_Formatter,
    )
    parser.add_argument(
        "--debug", action="store_true", help="show tracebacks (accepted anywhere on the line)"
    )
    parser.add_argument(
        "--cpu-matmul",
        choices=CPU_MATMULS,
        default=None,
        help="matmul precision on x86 CPUs with AMX / AVX-512 BF16: bfloat16 products with "
        "float32 sums, ~2.5x faster forwards (see gemma_scope_pz/backend.py; None: as "
        "GEMMA_SCOPE_PZ_CPU_MATMUL says, else float32); goes before the command",
    )
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=_Parser
    )
    for add in SUBCOMMANDS.values():
        add(_SubParsers(sub))
    return parser


class _SubParsers:
    """``sub.add_parser`` with the shared formatter."""

    def __init__(self, sub):
        self._sub = sub

    def add_parser(self, name: str, **kwargs) -> argparse.ArgumentParser:
        kwargs.setdefault("description", kwargs.get("help"))
        return self._sub.add_parser(name, formatter_class=_Formatter, **kwargs)
