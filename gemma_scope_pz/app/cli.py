"""``gemma-scope-pz``: the command line, built on the public facade (``import gemma_scope_pz as gs``).

    gemma-scope-pz tour                         the whole story on the offline Gemma 3 270M
    gemma-scope-pz generate "The capital of France is"
    gemma-scope-pz inspect --sae DIR_OR_REPO:FOLDER "some text"
    gemma-scope-pz train --config sae.yaml --sae.k 64
    gemma-scope-pz eval --sae DIR_OR_REPO:FOLDER
    gemma-scope-pz features --sae DIR_OR_REPO:FOLDER --out cards.html
    gemma-scope-pz steer --sae DIR_OR_REPO:FOLDER --feature 123 --coeff 0.5 "I think that"

Every command takes ``--model`` (default: the offline Gemma 3 270M; or a .gguf, a Hugging Face
directory / ``hf:REPO``, an orbax directory / ``kaggle:HANDLE``). Errors print one line
``error: …`` and exit with status 2 (bad input: options, files, config values) or 1 (a failure
while running); ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import sys
from collections.abc import Callable

import numpy as np

import gemma_scope_pz as gs
from gemma_scope_pz.app import overrides

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

_IT_MODEL = re.compile(r"(^|[-_/.:])it($|[-_/.])")


class UsageError(Exception):
    """Bad input on the command line (exit status 2)."""


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the examples' line breaks and shows every option's default."""


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line ``error: …`` (exit 2) instead of the usage block."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see: {self.prog} --help)\n")


# ------------------------------------------------------------------------------------- helpers
def _load(args, need_sae: bool = False):
    model = gs.load_model(args.model)
    tok = gs.load_tokenizer(
        args.model if args.model and str(args.model).endswith(".gguf") else None
    )
    sae = gs.load_sae(args.sae) if need_sae else None
    return model, tok, sae


def _contexts(tok, spec, n_contexts: int) -> np.ndarray:
    """Evaluation contexts. The default corpora are read from their END, so that dictionaries
    trained on their beginning (the tour, short training runs) are evaluated on held-out text."""
    from_end = spec is None or str(spec).startswith("default")
    return gs.corpus_contexts(tok, spec, n_contexts, from_end=from_end)


def is_instruction_tuned(source: str | None) -> bool:
    """Whether a model source names an instruction-tuned (``-it``) checkpoint."""
    return bool(source) and bool(_IT_MODEL.search(str(source).lower()))


# ------------------------------------------------------------------------------------ commands
def cmd_tour(args) -> None:
    from gemma_scope_pz.app.tour import TourSettings, run_tour

    make = TourSettings.quick_settings if args.quick else TourSettings
    run_tour(
        make(
            out_dir=pathlib.Path(args.out),
            model=args.model,
            sae=args.sae,
            transcoder=args.transcoder,
            cache=not args.no_cache,
        )
    )


def cmd_generate(args) -> None:
    if args.chat and not is_instruction_tuned(args.model):
        print(
            f"note: --chat wraps the prompt in the chat template of instruction-tuned (-it) models, "
            f"but {args.model or 'the offline Gemma 3 270M'} is a base (pretrained) model: it "
            "continues the template instead of answering (try --model hf:google/gemma-3-270m-it)",
            file=sys.stderr,
        )
    model, tok, _ = _load(args)
    text = gs.format_chat(args.prompt) if args.chat else args.prompt
    out = gs.generate(
        model,
        [tok.encode(text)],
        args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
    )[0]
    print(args.prompt + tok.decode(out))


def cmd_inspect(args) -> None:
    model, tok, sae = _load(args, need_sae=True)
    ids = tok.encode(args.text)
    feats = gs.top_features(model, sae, ids, k=args.k)
    strings = tok.token_strings(ids)
    print(f"{'token':>20}  top {args.k} features (id activation)")
    for pos in range(1, len(ids)):
        cells = "  ".join(
            f"#{int(f)} {v:.2f}" for f, v in zip(feats["ids"][pos], feats["values"][pos]) if v > 0
        )
        print(f"{strings[pos]!r:>20}  {cells or '-'}")


def train_config(path: str | None, given: dict[str, str]):
    """The TrainConfig of ``path`` (JSON or YAML) with the ``--section.field`` overrides applied."""
    if path is None:
        raise UsageError("train needs --config FILE (JSON or YAML with TrainConfig sections)")
    file = pathlib.Path(path)
    if not file.is_file():
        raise UsageError(f"config file {file} not found (JSON or YAML with TrainConfig sections)")
    load = (
        gs.TrainConfig.from_yaml if file.suffix in (".yaml", ".yml") else gs.TrainConfig.from_json
    )
    try:
        config = load(file)
        if given:
            config = gs.TrainConfig.from_overrides(config, [f"{k}={v}" for k, v in given.items()])
    except (ValueError, TypeError) as err:
        raise UsageError(" ".join(str(err).split())) from None
    if not config.sae.site_in:
        raise UsageError(f"{file} must set sae.site_in (e.g. blocks.9.resid_post)")
    for key in ("site_in", "site_out"):
        if getattr(config.sae, key):
            try:
                gs.Site.parse(getattr(config.sae, key))
            except ValueError as err:
                raise UsageError(f"{file}: sae.{key}: {err}") from None
    return config


def cmd_train(args) -> None:
    config = train_config(args.config, overrides.collect_overrides(args))
    model = gs.load_model(args.model)
    tok = gs.load_tokenizer(None)
    sites = list(dict.fromkeys([config.sae.site_in, config.sae.site_out or config.sae.site_in]))
    for site in sites:
        try:
            gs.Site.parse(site).check(model.config)
        except ValueError as err:
            raise UsageError(f"{args.config}: {err}") from None
    if not config.run.model_name:
        config = gs.TrainConfig.from_overrides(config, [f"run.model_name={model.config.name}"])
    out = pathlib.Path(args.out)
    n_tokens = args.tokens or config.run.batch_size * (config.run.total_steps or 1000)
    cache = gs.harvest_to_cache(
        model, tok, args.corpus, sites, out / "activations", n_tokens=n_tokens
    )
    trained = gs.train_dictionary(config, cache, out, reuse=False, saelens=True)
    print(f"exported Gemma Scope 2 folder: {trained.folder} (SAELens format: {out / 'saelens'})")


def cmd_eval(args) -> None:
    model, tok, sae = _load(args, need_sae=True)
    batches = _contexts(tok, args.corpus, args.contexts)
    result = gs.evaluate_sae(model, sae, [batches[i : i + 4] for i in range(0, len(batches), 4)])
    print(json.dumps(result.to_dict(), indent=2))


def cmd_features(args) -> None:
    model, tok, sae = _load(args, need_sae=True)
    for f in args.features or []:
        if not 0 <= f < sae.meta.d_sae:
            raise UsageError(f"--features: {f} is not in [0, {sae.meta.d_sae})")
    batches = _contexts(tok, args.corpus, args.contexts)
    examples = gs.collect_examples(
        [
            (b, gs.token_mask(b, pad_id=tok.pad_id))
            for b in np.split(batches, range(8, len(batches), 8))
        ],
        gs.latent_encoder(model, sae),
        sae.meta.d_sae,
        k=args.k,
        window=10,
    )
    stats = gs.feature_stats(examples)
    feats = args.features or [int(f) for f in np.argsort(-np.asarray(stats.density))[: args.n]]
    lens = {
        r.feature: tuple(r.with_strings(tok.token_strings)[k] for k in ("top", "bottom"))
        for r in gs.logit_lens(model, sae, feats, k=8)
    }
    path = gs.write_cards(
        args.out,
        feats,
        examples,
        stats,
        tok.token_strings,
        lens,
        title=f"Feature cards: {args.sae}",
        meta={"site": sae.meta.site_in},
    )
    print(f"wrote {path}")


def cmd_steer(args) -> None:
    model, tok, sae = _load(args, need_sae=True)
    if not 0 <= args.feature < sae.meta.d_sae:
        raise UsageError(f"--feature {args.feature} is not in [0, {sae.meta.d_sae})")
    ids = tok.encode(args.prompt)
    direction = sae.to_arrays()["w_dec"][args.feature]
    plain = gs.generate(model, [ids], args.max_new_tokens)[0]
    steered = gs.generate(
        gs.steer(model, sae.meta.site_in, direction, args.coeff), [ids], args.max_new_tokens
    )[0]
    print(f"without: {args.prompt}{tok.decode(plain)}")
    print(f"with #{args.feature} × {args.coeff}: {args.prompt}{tok.decode(steered)}")


# -------------------------------------------------------------------------------------- parser
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
    p.set_defaults(func=cmd_tour)


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
    p.set_defaults(func=cmd_generate)


def _add_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="table of the top SAE features per token of a text")
    _model_option(p)
    _sae_option(p)
    p.add_argument("text", help="text to inspect (BOS is added and skipped)")
    p.add_argument("--k", type=int, default=5, help="features shown per token")
    p.set_defaults(func=cmd_inspect)


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
    overrides.add_dataclass_options(p, gs.TrainConfig, title="config fields (override --config)")
    p.set_defaults(func=cmd_train)


def _add_eval(sub) -> None:
    p = sub.add_parser(
        "eval", help="FVU, L0, delta loss, CE recovered and KL of an SAE on a corpus"
    )
    _model_option(p)
    _sae_option(p)
    _corpus_option(p, contexts=16)
    p.set_defaults(func=cmd_eval)


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
    p.set_defaults(func=cmd_features)


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
    p.set_defaults(func=cmd_steer)


COMMANDS: dict[str, Callable] = {
    "tour": _add_tour,
    "generate": _add_generate,
    "inspect": _add_inspect,
    "train": _add_train,
    "eval": _add_eval,
    "features": _add_features,
    "steer": _add_steer,
}


def build_parser() -> argparse.ArgumentParser:
    """The ``gemma-scope-pz`` parser: one subcommand per entry of :data:`COMMANDS`."""
    parser = _Parser(
        prog="gemma-scope-pz",
        description=__doc__.split("\n\n")[0].replace("``", ""),
        epilog=EXAMPLES,
        formatter_class=_Formatter,
    )
    parser.add_argument(
        "--debug", action="store_true", help="show tracebacks (accepted anywhere on the line)"
    )
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=_Parser
    )
    for add in COMMANDS.values():
        add(_SubParsers(sub))
    return parser


class _SubParsers:
    """``sub.add_parser`` with the shared formatter."""

    def __init__(self, sub):
        self._sub = sub

    def add_parser(self, name: str, **kwargs) -> argparse.ArgumentParser:
        kwargs.setdefault("description", kwargs.get("help"))
        return self._sub.add_parser(name, formatter_class=_Formatter, **kwargs)


# ---------------------------------------------------------------------------------------- main
_USAGE = (
    UsageError,
    ValueError,
    IndexError,
    FileNotFoundError,
    NotADirectoryError,
    IsADirectoryError,
)


def error_line(err: BaseException) -> str:
    """The one-line message for ``err``: its text (whitespace collapsed), typed when not obvious."""
    text = " ".join(str(err).split())
    if isinstance(err, UsageError | ValueError | OSError) and text:
        return f"error: {text}"
    return f"error: {type(err).__name__}: {text}" if text else f"error: {type(err).__name__}"


def main(argv: list[str] | None = None) -> int:
    """Runs the command line; returns the exit status (0 ok, 1 runtime failure, 2 bad input)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    args = build_parser().parse_args([a for a in argv if a != "--debug"])
    try:
        args.func(args)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if debug:
            raise
        usage = isinstance(err, _USAGE)
        hint = "" if usage else " (rerun with --debug for the traceback)"
        print(error_line(err) + hint, file=sys.stderr)
        return 2 if usage else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
