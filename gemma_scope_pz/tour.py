"""The tour: the whole Gemma Scope story on the offline Gemma 3 270M, start to finish.

1. load the model and tokenizer, show the structure, next-token predictions and a greedy continuation;
2. get an SAE for ``blocks.{layer}.resid_post`` (trained on the offline corpus and cached, or a released
   Gemma Scope 2 SAE with ``--sae REPO:FOLDER``) and a transcoder for one MLP;
3. measure FVU, L0 and delta loss; show the top features of a sentence, the logit lens of the strongest
   one, and a greedy continuation with and without steering along it;
4. write an HTML report (metrics, highlighted tokens, feature cards of max-activating examples).

Heavy steps are cached under ``default_cache_root()/tour``: a second run only loads and evaluates.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time
from collections.abc import Callable

import numpy as np

from gemma_scope_pz.models.config import param_shapes

ENERGY = "The law of conservation of energy states that energy cannot be created or destroyed, only transformed."
CAPITAL = "The capital of France is"
STEER_PROMPT = "I think that"


@dataclasses.dataclass
class TourSettings:
    """Knobs of the tour (defaults fit the 15-minute budget of a 2-core laptop).

    Attributes:
      out_dir: Where the HTML report goes.
      model: Model source (None: offline Gemma 3 270M).
      sae: "REPO:FOLDER" or a local folder of a released SAE; None trains one.
      transcoder: Same for the transcoder.
      layer: Block of the SAE site (resid_post).
      transcoder_layer: Block of the transcoder (mlp_in → mlp_out).
      train_tokens: Activations harvested for training.
      sae_width, transcoder_width: Dictionary widths.
      train_steps, batch_size, k: Trainer settings (BatchTopK, exported as JumpReLU).
      eval_contexts, card_contexts: Held-out contexts for metrics and for max-activating examples.
      steer_coeff: Norm-scaled steering strength.
      quick: Tiny settings for smoke tests and CI.
      cache: Reuse cached activations and dictionaries.
    """

    out_dir: pathlib.Path = pathlib.Path("gemma_scope_pz_tour")
    model: str | None = None
    sae: str | None = None
    transcoder: str | None = None
    layer: int = 9
    transcoder_layer: int = 6
    train_tokens: int = 96_000
    sae_width: int = 2048
    transcoder_width: int = 1024
    train_steps: int = 1500
    batch_size: int = 1024
    k: int = 32
    eval_contexts: int = 6
    card_contexts: int = 64
    steer_coeff: float = 0.3
    quick: bool = False
    cache: bool = True

    @classmethod
    def quick_settings(cls, **overrides) -> TourSettings:
        base = dict(
            train_tokens=8192,
            sae_width=512,
            transcoder_width=256,
            train_steps=120,
            batch_size=512,
            eval_contexts=2,
            card_contexts=8,
            quick=True,
        )
        base.update(overrides)
        return cls(**base)


def _step(log: Callable[[str], None], title: str):
    log(f"\n== {title}")
    return time.perf_counter()


def model_summary(model) -> str:
    """A few lines describing the architecture and size."""
    c = model.config
    n_params = sum(int(np.prod(shape)) for shape in param_shapes(c).values())
    kinds = "".join("G" if c.is_global(i) else "L" for i in range(c.n_layers))
    return (
        f"Gemma 3 {c.name}: {c.n_layers} blocks, d_model {c.d_model}, {c.n_heads} query heads / "
        f"{c.n_kv_heads} kv heads × {c.head_dim}, MLP {c.d_ff}, vocab {c.vocab_size}, "
        f"{n_params / 1e6:.0f}M parameters\n"
        f"attention per block (L = sliding window {c.sliding_window}, G = global): {kinds}\n"
        f"sites: blocks.<0..{c.n_layers - 1}>.{{resid_pre, resid_post, attn_out, mlp_in, mlp_out}}"
    )


def tour_dictionaries(model, tok, s: TourSettings, log=print) -> tuple[object, object, str]:
    """(SAE at blocks.{layer}.resid_post, transcoder at blocks.{transcoder_layer}, description).

    Loads ``s.sae``/``s.transcoder`` when given; otherwise harvests the offline corpus once (one
    forward pass for all three sites, cached on disk) and trains both, reusing cached exports.
    """
    from gemma_scope_pz.scope.checkpoints import load_sae
    from gemma_scope_pz.train.config import TrainConfig
    from gemma_scope_pz.train.pipeline import (
        default_cache_root,
        fingerprint,
        harvest_to_cache,
        train_dictionary,
    )

    sae_site = f"blocks.{s.layer}.resid_post"
    tc_in, tc_out = f"blocks.{s.transcoder_layer}.mlp_in", f"blocks.{s.transcoder_layer}.mlp_out"
    if s.sae and s.transcoder:
        return load_sae(s.sae), load_sae(s.transcoder), "loaded"
    from gemma_scope_pz.train.corpus import load_corpus

    root = default_cache_root() / "tour"
    corpus = load_corpus(None)
    data_key = fingerprint(
        model.config.to_dict(), corpus.label, s.train_tokens, sae_site, tc_in, tc_out
    )
    sites = [sae_site, tc_in, tc_out]
    log(f"harvesting {s.train_tokens} tokens at {sites} from the offline corpus (cached in {root})")
    cache = harvest_to_cache(
        model, tok, corpus, sites, root / f"acts-{data_key}", n_tokens=s.train_tokens
    )
    common = dict(
        architecture="batchtopk",
        k=s.k,
        batch_size=s.batch_size,
        total_steps=s.train_steps,
        warmup_steps=max(s.train_steps // 20, 1),
        sparsity_warmup_steps=1,
        lr=1e-3,
        log_every=max(s.train_steps // 10, 1),
        checkpoint_every=max(s.train_steps // 2, 1),
        model_name=model.config.name,
        corpus=cache.header["corpus"],
    )
    sae_cfg = TrainConfig(
        d_in=model.config.d_model, d_sae=s.sae_width, site_in=sae_site, site_out=sae_site, **common
    )
    tc_cfg = TrainConfig(
        d_in=model.config.d_model,
        d_out=model.config.d_model,
        d_sae=s.transcoder_width,
        site_in=tc_in,
        site_out=tc_out,
        affine_skip=True,
        **common,
    )
    sources = []
    out = []
    for name, cfg, given in (("SAE", sae_cfg, s.sae), ("transcoder", tc_cfg, s.transcoder)):
        if given:
            out.append(load_sae(given))
            sources.append(f"{name}: {given}")
            continue
        folder = root / f"{name.lower()}-{fingerprint(data_key, cfg.to_dict())}"
        trained = train_dictionary(cfg, cache, folder, reuse=s.cache)
        log(f"{name}: {'reused' if trained.reused else 'trained'} → {trained.folder}")
        out.append(trained.sae)
        sources.append(f"{name}: {trained.folder}")
    return out[0], out[1], "; ".join(sources)


def run_tour(settings: TourSettings | None = None, log: Callable[[str], None] = print) -> dict:
    """Runs every step and returns a JSON-able summary (also written next to the report)."""
    import gemma_scope_pz as gs
    from gemma_scope_pz.analysis.examples import collect_max_activating
    from gemma_scope_pz.analysis.stats import FeatureStats
    from gemma_scope_pz.scope.evaluate import latent_encoder
    from gemma_scope_pz.tour_report import write_report
    from gemma_scope_pz.train.harvest import corpus_contexts, real_token_mask

    s = settings or TourSettings()
    s.out_dir = pathlib.Path(s.out_dir)
    timings, summary = {}, {"settings": {k: str(v) for k, v in dataclasses.asdict(s).items()}}
    t_all = time.perf_counter()

    t = _step(log, "1. Gemma 3 in Penzai")
    model = gs.load_model(s.model)
    tok = gs.load_tokenizer(s.model if s.model and not str(s.model).endswith(".model") else None)
    log(model_summary(model))
    prompt = tok.encode(CAPITAL)
    logits = np.asarray(gs.forward(model, np.array([prompt])))[0, -1]
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    top = np.argsort(-probs)[:5]
    summary["next_tokens"] = [(tok.token_strings([int(i)])[0], float(probs[i])) for i in top]
    log(
        f"next-token predictions after {CAPITAL!r}: "
        + ", ".join(f"{t!r} {p:.2f}" for t, p in summary["next_tokens"])
    )
    greedy = gs.generate(model, [prompt], max_new_tokens=15, stop_token=None)[0]
    summary["greedy"] = tok.decode(greedy)
    log(f"greedy continuation: {CAPITAL}{summary['greedy']!s}")
    timings["model"] = time.perf_counter() - t

    t = _step(log, "2. Dictionaries (SAE + transcoder)")
    sae, transcoder, source = tour_dictionaries(model, tok, s, log)
    summary["dictionaries"] = source
    timings["dictionaries"] = time.perf_counter() - t

    t = _step(log, "3. Metrics on held-out text")
    batches = corpus_contexts(tok, None, s.eval_contexts, from_end=True)
    ev = gs.evaluate_sae(model, sae, [batches], progress=False)
    ev_tc = gs.evaluate_sae(model, transcoder, [batches], progress=False)
    summary["sae_metrics"], summary["transcoder_metrics"] = ev.to_dict(), ev_tc.to_dict()
    for name, e in (
        ("SAE " + sae.meta.site_in, ev),
        ("transcoder " + transcoder.meta.site_in + " → " + transcoder.meta.site_out, ev_tc),
    ):
        log(
            f"{name}: FVU {e.fvu:.3f}  L0 {e.l0:.1f}  CE clean {e.ce_clean:.3f} → spliced {e.ce_spliced:.3f} "
            f"(delta loss {e.delta_loss:+.3f}, CE recovered {e.ce_recovered:.2f}, KL {e.kl:.3f}) on {e.n_tokens} tokens"
        )
    timings["metrics"] = time.perf_counter() - t

    t = _step(log, "4. Feature statistics and the top features of a sentence")
    contexts = corpus_contexts(tok, None, s.card_contexts, from_end=True)
    examples = collect_max_activating(
        [
            (c, real_token_mask(c, tok.pad_id))
            for c in np.split(contexts, range(8, len(contexts), 8))
        ],
        latent_encoder(model, sae),
        sae.meta.d_sae,
        k=6,
        window=10,
        progress=False,
    )
    stats = FeatureStats.from_examples(examples)
    summary["feature_stats"] = {
        k: v for k, v in stats.summary().items() if not isinstance(v, list | dict)
    }
    log(
        f"over {int(examples.n_tokens)} tokens: {int(np.sum(stats.dead))} dead and "
        f"{int(np.sum(stats.dense))} dense latents (density > {stats.dense_threshold})"
    )
    ids = tok.encode(ENERGY)
    feats = gs.top_features(model, sae, ids, k=3)
    strings = tok.token_strings(ids)
    for pos in range(1, len(ids)):
        cells = ", ".join(
            f"#{int(f)} {v:.1f}" for f, v in zip(feats["ids"][pos], feats["values"][pos]) if v > 0
        )
        log(f"  {strings[pos]!r:>18}  {cells}")
    # The strongest feature of the sentence among those that are not dense (which fire everywhere).
    specific = np.where(np.asarray(stats.dense), 0.0, feats["mean"])
    strongest = int(np.argmax(specific if specific.max() > 0 else feats["mean"]))
    summary["strongest_feature"] = strongest
    log(
        f"strongest (non-dense) feature over the sentence: #{strongest} "
        f"(mean activation {feats['mean'][strongest]:.2f}, density {float(stats.density[strongest]):.4f})"
    )
    timings["features"] = time.perf_counter() - t

    t = _step(log, "5. Logit lens and steering")
    lens = gs.logit_lens(model, sae, [strongest], k=10)[0]
    lens_s = lens.with_strings(tok.token_strings)
    summary["logit_lens"] = lens_s
    log("promotes: " + " ".join(repr(x) for x, _ in lens_s["top"]))
    log("suppresses: " + " ".join(repr(x) for x, _ in lens_s["bottom"]))
    direction = sae.to_arrays()["w_dec"][strongest]
    steer_prompt = tok.encode(STEER_PROMPT)
    plain = tok.decode(gs.generate(model, [steer_prompt], 20, stop_token=None)[0])
    steered_model = gs.steer(model, sae.meta.site_in, direction, s.steer_coeff)
    steered = tok.decode(gs.generate(steered_model, [steer_prompt], 20, stop_token=None)[0])
    summary["steering"] = {
        "prompt": STEER_PROMPT,
        "coeff": s.steer_coeff,
        "plain": plain,
        "steered": steered,
    }
    log(f"without steering: {STEER_PROMPT}{plain}")
    log(f"steered (+{s.steer_coeff}·‖x‖·d_{strongest}): {STEER_PROMPT}{steered}")
    timings["lens_steer"] = time.perf_counter() - t

    t = _step(log, "6. Feature cards and report")
    chosen = [strongest] + [
        int(f) for f in np.argsort(-specific)[:12] if specific[f] > 0 and f != strongest
    ][:11]
    lens_all = {
        r.feature: tuple(r.with_strings(tok.token_strings)[k] for k in ("top", "bottom"))
        for r in gs.logit_lens(model, sae, chosen, k=8)
    }
    report = write_report(
        s.out_dir,
        summary=summary,
        sentence_tokens=strings,
        sentence_latents=feats["latents"],
        features=chosen,
        examples=examples,
        stats=stats,
        token_strings=tok.token_strings,
        lens=lens_all,
    )
    summary["report"] = str(report)
    timings["report"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t_all
    summary["timings_s"] = {k: round(v, 1) for k, v in timings.items()}
    (s.out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    log(f"\nReport: {report.resolve()}\nTotal {timings['total']:.0f} s")
    return summary
