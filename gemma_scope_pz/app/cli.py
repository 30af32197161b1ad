"""``gemma-scope-pz``: the command line, built on the public facade (``import gemma_scope_pz as gs``).

    gemma-scope-pz tour                         the whole story on the offline Gemma 3 270M
    gemma-scope-pz generate "The capital of France is"
    gemma-scope-pz inspect --sae DIR_OR_REPO:FOLDER "some text"
    gemma-scope-pz train --config sae.yaml --sae.k 64
    gemma-scope-pz eval --sae DIR_OR_REPO:FOLDER
    gemma-scope-pz features --sae DIR_OR_REPO:FOLDER --out cards.html
    gemma-scope-pz steer --sae DIR_OR_REPO:FOLDER --feature 123 --coeff 0.5 "I think that"
    gemma-scope-pz attribute "The capital of France is" --transcoders DIR_9 DIR_12 --out graphs/

Every command takes ``--model`` (default: the offline Gemma 3 270M; or a .gguf, a Hugging Face
directory / ``hf:REPO``, an orbax directory / ``kaggle:HANDLE``). Errors print one line
``error: …`` and exit with status 2 (bad input: options, files, config values) or 1 (a failure
while running); ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import json
import pathlib
import re
import sys
from collections.abc import Callable

import numpy as np

import gemma_scope_pz as gs
from gemma_scope_pz.app import overrides
from gemma_scope_pz.app.parser import build_parser
from gemma_scope_pz.circuits.cli import cmd_attribute

_IT_MODEL = re.compile(r"(^|[-_/.:])it($|[-_/.])")


class UsageError(Exception):
    """Bad input on the command line (exit status 2)."""


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
    if args.stream:
        _train_streaming(config, model, tok, args, out)
        return
    n_tokens = args.tokens or config.run.batch_size * (config.run.total_steps or 1000)
    cache = gs.harvest_to_cache(
        model, tok, args.corpus, sites, out / "activations", n_tokens=n_tokens,
        packing=args.packing, model_dtype=args.model_dtype,
    )  # fmt: skip
    trained = gs.train_dictionary(config, cache, out, reuse=False, saelens=True)
    print(f"exported Gemma Scope 2 folder: {trained.folder} (SAELens format: {out / 'saelens'})")
    print(f"skipped steps (non-finite data or gradients): {trained.n_skipped}")


def _train_streaming(config, model, tok, args, out: pathlib.Path) -> None:
    """``train --stream``: train_streaming, then the same exports as the cached path."""
    from gemma_scope_pz.train.export import export_gemma_scope_2, export_saelens
    from gemma_scope_pz.train.streaming import StreamConfig, train_streaming

    out.mkdir(parents=True, exist_ok=True)
    config.to_json(out / "train_config.json")
    result = train_streaming(
        model,
        {"dictionary": config},
        args.corpus,
        tokenizer=tok,
        stream=StreamConfig(packing=args.packing, model_dtype=args.model_dtype),
        checkpoint_dir=out / "stream_checkpoints",
    )
    trained = result.dictionaries["dictionary"]
    export_gemma_scope_2(trained, out / "gemma_scope_2")
    export_saelens(trained, out / "saelens")
    print(
        f"exported Gemma Scope 2 folder: {out / 'gemma_scope_2'} (SAELens format: {out / 'saelens'})"
    )
    print(
        f"streamed {result.tokens} tokens at {result.tokens_per_second:.0f} tokens/s; "
        f"non-finite activation rows dropped: {result.n_nonfinite_rows}; "
        f"skipped steps: {trained.n_skipped}"
    )


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


# ---------------------------------------------------------------------------------------- main
COMMANDS: dict[str, Callable] = {
    "tour": cmd_tour,
    "generate": cmd_generate,
    "inspect": cmd_inspect,
    "train": cmd_train,
    "eval": cmd_eval,
    "features": cmd_features,
    "steer": cmd_steer,
    "attribute": cmd_attribute,
}
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
        if args.cpu_matmul:
            gs.set_cpu_matmul(args.cpu_matmul)  # before JAX starts
        COMMANDS[args.command](args)
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
