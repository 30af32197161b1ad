"""``gemma-scope-pz``: the command line.

    gemma-scope-pz tour                         the whole story on the offline Gemma 3 270M
    gemma-scope-pz generate "The capital of France is"
    gemma-scope-pz inspect --sae DIR_OR_REPO:FOLDER "some text"
    gemma-scope-pz train --config sae.yaml
    gemma-scope-pz eval --sae DIR_OR_REPO:FOLDER
    gemma-scope-pz features --sae DIR_OR_REPO:FOLDER --out cards.html
    gemma-scope-pz steer --sae DIR_OR_REPO:FOLDER --feature 123 --coeff 0.5 "I think that"

Every command takes ``--model`` (default: the offline Gemma 3 270M; or a .gguf, a Hugging Face
directory / ``hf:REPO``, an orbax directory / ``kaggle:HANDLE``).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import numpy as np


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", default=None, help="checkpoint source (default: offline Gemma 3 270M)"
    )


def _add_sae(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument(
        "--sae", required=required, help="SAE folder, or REPO:FOLDER of a Gemma Scope 2 release"
    )


def _load(args, need_sae: bool = False):
    import gemma_scope_pz as gs

    model = gs.load_model(args.model)
    tok = gs.load_tokenizer(
        args.model if args.model and str(args.model).endswith(".gguf") else None
    )
    sae = gs.load_sae(args.sae) if need_sae else None
    return gs, model, tok, sae


def _corpus_batches(tok, spec, n_contexts: int) -> np.ndarray:
    """Evaluation contexts. The default corpora are read from their END, so that dictionaries
    trained on their beginning (the tour, short training runs) are evaluated on held-out text."""
    from gemma_scope_pz.train.harvest import corpus_contexts

    from_end = spec is None or str(spec).startswith("default")
    return corpus_contexts(tok, spec, n_contexts, from_end=from_end)


def cmd_tour(args) -> None:
    from gemma_scope_pz.tour import TourSettings, run_tour

    make = TourSettings.quick_settings if args.quick else TourSettings
    settings = make(
        out_dir=pathlib.Path(args.out),
        model=args.model,
        sae=args.sae,
        transcoder=args.transcoder,
        cache=not args.no_cache,
    )
    run_tour(settings)


def cmd_generate(args) -> None:
    gs, model, tok, _ = _load(args)
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
    gs, model, tok, sae = _load(args, need_sae=True)
    ids = tok.encode(args.text)
    feats = gs.top_features(model, sae, ids, k=args.k)
    strings = tok.token_strings(ids)
    print(f"{'token':>20}  top {args.k} features (id activation)")
    for pos in range(1, len(ids)):
        cells = "  ".join(
            f"#{int(f)} {v:.2f}" for f, v in zip(feats["ids"][pos], feats["values"][pos]) if v > 0
        )
        print(f"{strings[pos]!r:>20}  {cells or '-'}")


def cmd_train(args) -> None:
    import gemma_scope_pz as gs
    from gemma_scope_pz.train.config import TrainConfig
    from gemma_scope_pz.train.pipeline import harvest_to_cache, train_dictionary

    path = pathlib.Path(args.config)
    if not path.exists():
        raise SystemExit(
            f"error: config file {path} not found (JSON or YAML with TrainConfig fields)"
        )
    config = (
        TrainConfig.from_yaml(path)
        if path.suffix in (".yaml", ".yml")
        else TrainConfig.from_json(path)
    )
    if not config.site_in:
        raise SystemExit(f"error: {path} must set site_in (e.g. blocks.9.resid_post)")
    model = gs.load_model(args.model)
    tok = gs.load_tokenizer(None)
    sites = list(dict.fromkeys([config.site_in, config.site_out or config.site_in]))
    config = config.replace(model_name=config.model_name or model.config.name)
    out = pathlib.Path(args.out)
    n_tokens = args.tokens or config.batch_size * (config.total_steps or 1000)
    cache = harvest_to_cache(model, tok, args.corpus, sites, out / "activations", n_tokens=n_tokens)
    trained = train_dictionary(config, cache, out, reuse=False, saelens=True)
    print(f"exported Gemma Scope 2 folder: {trained.folder} (SAELens format: {out / 'saelens'})")


def cmd_eval(args) -> None:
    gs, model, tok, sae = _load(args, need_sae=True)
    batches = _corpus_batches(tok, args.corpus, args.contexts)
    result = gs.evaluate_sae(model, sae, [batches[i : i + 4] for i in range(0, len(batches), 4)])
    print(json.dumps(result.to_dict(), indent=2))


def cmd_features(args) -> None:
    from gemma_scope_pz.analysis.cards import write_feature_cards
    from gemma_scope_pz.analysis.examples import collect_max_activating
    from gemma_scope_pz.analysis.stats import FeatureStats
    from gemma_scope_pz.scope.evaluate import latent_encoder
    from gemma_scope_pz.train.harvest import real_token_mask

    gs, model, tok, sae = _load(args, need_sae=True)
    batches = _corpus_batches(tok, args.corpus, args.contexts)
    ex = collect_max_activating(
        [(b, real_token_mask(b, tok.pad_id)) for b in np.split(batches, range(8, len(batches), 8))],
        latent_encoder(model, sae),
        sae.meta.d_sae,
        k=args.k,
        window=10,
    )
    stats = FeatureStats.from_examples(ex)
    feats = args.features or [int(f) for f in np.argsort(-np.asarray(stats.density))[: args.n]]
    lens = {
        r.feature: tuple(r.with_strings(tok.token_strings)[k] for k in ("top", "bottom"))
        for r in gs.logit_lens(model, sae, feats, k=8)
    }
    path = write_feature_cards(
        args.out,
        feats,
        ex,
        stats,
        tok.token_strings,
        lens,
        title=f"Feature cards: {args.sae}",
        meta={"site": sae.meta.site_in},
    )
    print(f"wrote {path}")


def cmd_steer(args) -> None:
    gs, model, tok, sae = _load(args, need_sae=True)
    if not 0 <= args.feature < sae.meta.d_sae:
        raise SystemExit(f"error: --feature must be in [0, {sae.meta.d_sae})")
    ids = tok.encode(args.prompt)
    direction = sae.to_arrays()["w_dec"][args.feature]
    plain = gs.generate(model, [ids], args.max_new_tokens)[0]
    steered = gs.generate(
        gs.steer(model, sae.meta.site_in, direction, args.coeff), [ids], args.max_new_tokens
    )[0]
    print(f"without: {args.prompt}{tok.decode(plain)}")
    print(f"with #{args.feature} × {args.coeff}: {args.prompt}{tok.decode(steered)}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gemma-scope-pz", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "tour", help="run the whole story on the offline model and write an HTML report"
    )
    _add_model(p)
    _add_sae(p, required=False)
    p.add_argument(
        "--transcoder", default=None, help="transcoder folder or REPO:FOLDER (default: train one)"
    )
    p.add_argument("--out", default="gemma_scope_pz_tour", help="report directory")
    p.add_argument("--quick", action="store_true", help="tiny settings (smoke test, ~3 minutes)")
    p.add_argument(
        "--no-cache", action="store_true", help="retrain instead of reusing cached dictionaries"
    )
    p.set_defaults(func=cmd_tour)

    p = sub.add_parser("generate", help="continue a prompt (KV-cached, jitted)")
    _add_model(p)
    p.add_argument("prompt")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--chat", action="store_true", help="wrap the prompt in the Gemma 3 chat template"
    )
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("inspect", help="table of the top SAE features per token of a text")
    _add_model(p)
    _add_sae(p)
    p.add_argument("text")
    p.add_argument("--k", type=int, default=5)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser(
        "train", help="harvest activations and train an SAE/transcoder from a config file"
    )
    _add_model(p)
    p.add_argument("--config", required=True, help="TrainConfig as JSON or YAML")
    p.add_argument("--corpus", default=None, help="corpus spec (default: offline Python docs)")
    p.add_argument("--tokens", type=int, default=None, help="activations to harvest")
    p.add_argument("--out", default="gemma_scope_pz_train", help="output directory")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "eval", help="FVU, L0, delta loss, CE recovered and KL of an SAE on a corpus"
    )
    _add_model(p)
    _add_sae(p)
    p.add_argument("--corpus", default=None)
    p.add_argument("--contexts", type=int, default=16, help="128-token contexts to evaluate on")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "features", help="write HTML feature cards (max-activating examples, logit lens)"
    )
    _add_model(p)
    _add_sae(p)
    p.add_argument("--corpus", default=None)
    p.add_argument("--contexts", type=int, default=128)
    p.add_argument(
        "--features", type=int, nargs="*", default=None, help="latent ids (default: most frequent)"
    )
    p.add_argument(
        "--n", type=int, default=20, help="number of features when --features is not given"
    )
    p.add_argument("--k", type=int, default=8, help="examples per feature")
    p.add_argument("--out", default="feature_cards.html")
    p.set_defaults(func=cmd_features)

    p = sub.add_parser(
        "steer", help="generate with and without a feature's decoder direction added"
    )
    _add_model(p)
    _add_sae(p)
    p.add_argument("prompt")
    p.add_argument("--feature", type=int, required=True)
    p.add_argument("--coeff", type=float, default=0.5, help="norm-scaled strength (coeff × ‖x‖)")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.set_defaults(func=cmd_steer)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
