"""The tour: the whole Gemma Scope story on the offline Gemma 3 270M, one small step per function.

1. :func:`model_step`: load the model and tokenizer, next-token predictions, a greedy continuation;
2. :func:`offline_dictionaries`: an SAE for ``blocks.{layer}.resid_post`` and a transcoder for one MLP
   (trained on the offline corpus and cached; or released Gemma Scope 2 dictionaries);
3. :func:`metrics_step`: FVU, L0 and delta loss on held-out text;
4. :func:`features_step`: feature statistics and the top features of a sentence;
5. :func:`lens_and_steer_step`: the logit lens of the strongest feature and steering along it;
6. :func:`report_step`: the HTML report (metrics, highlighted tokens, feature cards).

Every step calls only the public facade (``import gemma_scope_pz as gs``) and returns a dataclass.
Heavy steps are cached under ``default_cache_root()/tour``: a second run only loads and evaluates.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time
from collections.abc import Callable
from typing import Any

import numpy as np

import gemma_scope_pz as gs
from gemma_scope_pz.io import write_atomically

ENERGY = "The law of conservation of energy states that energy cannot be created or destroyed, only transformed."
CAPITAL = "The capital of France is"
STEER_PROMPT = "I think that"

Log = Callable[[str], None]


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
        """Tiny settings (about 3 minutes on 2 cores) for smoke tests, CI and notebooks."""
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


@dataclasses.dataclass
class ModelStep:
    """Step 1: the model, its tokenizer and what it says after ``CAPITAL``.

    Attributes:
      model: The loaded ``Gemma3LM``.
      tok: Its tokenizer.
      next_tokens: The five most likely next tokens and their probabilities.
      greedy: The greedy continuation of ``CAPITAL`` (15 tokens).
    """

    model: Any
    tok: Any
    next_tokens: list[tuple[str, float]]
    greedy: str


@dataclasses.dataclass
class Dictionaries:
    """Step 2: an SAE and a transcoder, with where they came from.

    Attributes:
      sae: SAE at ``blocks.{layer}.resid_post``.
      transcoder: Transcoder ``blocks.{transcoder_layer}.mlp_in → mlp_out``.
      source: One line saying which folders were loaded, reused or trained.
    """

    sae: Any
    transcoder: Any
    source: str


@dataclasses.dataclass
class FeatureStep:
    """Step 4: statistics over held-out contexts and the features of the ``ENERGY`` sentence.

    Attributes:
      examples: Max-activating examples of every latent.
      stats: Their ``FeatureStats``.
      strings: Display strings of the sentence's tokens.
      latents: The sentence's latents ``[seq, d_sae]``.
      specific: Mean activation over the sentence with dense latents zeroed ``[d_sae]``.
      strongest: The strongest non-dense feature of the sentence.
    """

    examples: Any
    stats: Any
    strings: list[str]
    latents: np.ndarray
    specific: np.ndarray
    strongest: int


def model_summary(model) -> str:
    """A few lines describing the architecture and size."""
    c = model.config
    n_params = sum(int(np.prod(shape)) for shape in gs.param_shapes(c).values())
    kinds = "".join("G" if c.is_global(i) else "L" for i in range(c.n_layers))
    return (
        f"Gemma 3 {c.name}: {c.n_layers} blocks, d_model {c.d_model}, {c.n_heads} query heads / "
        f"{c.n_kv_heads} kv heads × {c.head_dim}, MLP {c.d_ff}, vocab {c.vocab_size}, "
        f"{n_params / 1e6:.0f}M parameters\n"
        f"attention per block (L = sliding window {c.sliding_window}, G = global): {kinds}\n"
        f"sites: blocks.<0..{c.n_layers - 1}>.{{resid_pre, resid_post, attn_out, mlp_in, mlp_out}}"
    )


def next_token_probs(model, ids: list[int]) -> np.ndarray:
    """Softmax of the model's logits after the last token of ``ids``."""
    logits = np.asarray(gs.forward(model, np.array([ids])), np.float64)[0, -1]
    probs = np.exp(logits - logits.max())
    return probs / probs.sum()


def model_step(s: TourSettings, log: Log = print) -> ModelStep:
    """Loads the model and tokenizer, prints its summary, next tokens and a greedy continuation."""
    model = gs.load_model(s.model)
    tok = gs.load_tokenizer(s.model if s.model and not str(s.model).endswith(".model") else None)
    log(model_summary(model))
    prompt = tok.encode(CAPITAL)
    probs = next_token_probs(model, prompt)
    top = [int(i) for i in np.argsort(-probs)[:5]]
    next_tokens = [(tok.token_strings([i])[0], float(probs[i])) for i in top]
    log(
        f"next-token predictions after {CAPITAL!r}: "
        + ", ".join(f"{t!r} {p:.2f}" for t, p in next_tokens)
    )
    greedy = tok.decode(gs.generate(model, [prompt], max_new_tokens=15, stop_token=None)[0])
    log(f"greedy continuation: {CAPITAL}{greedy}")
    return ModelStep(model, tok, next_tokens, greedy)


def _train_configs(model, s: TourSettings, sites: list[str], corpus: str) -> dict[str, Any]:
    """The tour's TrainConfigs for the SAE and the transcoder (BatchTopK, exported as JumpReLU)."""
    sae_site, tc_in, tc_out = sites
    d = model.config.d_model
    common = {
        "loss": {"sparsity_warmup_steps": 1},
        "optim": {"lr": 1e-3, "warmup_steps": max(s.train_steps // 20, 1)},
        "run": {
            "batch_size": s.batch_size,
            "total_steps": s.train_steps,
            "log_every": max(s.train_steps // 10, 1),
            "checkpoint_every": max(s.train_steps // 2, 1),
            "model_name": model.config.name,
            "corpus": corpus,
        },
    }
    dictionary = {"d_in": d, "architecture": "batchtopk", "k": s.k}
    sae = {**dictionary, "d_sae": s.sae_width, "site_in": sae_site, "site_out": sae_site}
    transcoder = {
        **dictionary,
        "d_out": d,
        "d_sae": s.transcoder_width,
        "site_in": tc_in,
        "site_out": tc_out,
        "affine_skip": True,
    }
    return {
        "SAE": gs.TrainConfig.from_dict({"sae": sae, **common}, source="tour SAE"),
        "transcoder": gs.TrainConfig.from_dict(
            {"sae": transcoder, **common}, source="tour transcoder"
        ),
    }


def offline_dictionaries(
    model=None, tok=None, settings: TourSettings | None = None, log: Log = print
) -> Dictionaries:
    """The tour's SAE at ``blocks.{layer}.resid_post`` and transcoder at ``blocks.{transcoder_layer}``.

    Loads ``settings.sae``/``settings.transcoder`` when given; otherwise harvests the offline corpus
    once (one forward pass for the three sites, cached on disk, with a progress bar) and trains
    both, reusing cached exports. With no arguments: the offline model and the quick settings.
    """
    from gemma_scope_pz.models.fingerprint import weights_fingerprint
    from gemma_scope_pz.train.pipeline import default_cache_root, fingerprint

    s = settings or TourSettings.quick_settings()
    if s.sae and s.transcoder:
        return Dictionaries(gs.load_sae(s.sae), gs.load_sae(s.transcoder), "loaded")
    model = model if model is not None else gs.load_model(s.model)
    tok = tok if tok is not None else gs.load_tokenizer(None)
    sites = [
        f"blocks.{s.layer}.resid_post",
        f"blocks.{s.transcoder_layer}.mlp_in",
        f"blocks.{s.transcoder_layer}.mlp_out",
    ]
    root = default_cache_root() / "tour"
    corpus = gs.load_corpus(None)
    weights = weights_fingerprint(model)  # a fine-tuned model gets its own activations
    data_key = fingerprint(model.config.to_dict(), weights, corpus.label, s.train_tokens, *sites)
    log(f"harvesting {s.train_tokens} tokens at {sites} from the offline corpus (cached in {root})")
    cache = gs.harvest_to_cache(
        model, tok, corpus, sites, root / f"acts-{data_key}", n_tokens=s.train_tokens
    )
    configs = _train_configs(model, s, sites, cache.header["corpus"])
    trained, sources = {}, []
    for name, given in (("SAE", s.sae), ("transcoder", s.transcoder)):
        if given:
            trained[name] = gs.load_sae(given)
            sources.append(f"{name}: {given}")
            continue
        folder = root / f"{name.lower()}-{fingerprint(data_key, configs[name].to_dict())}"
        result = gs.train_dictionary(configs[name], cache, folder, reuse=s.cache)
        log(f"{name}: {'reused' if result.reused else 'trained'} → {result.folder}")
        trained[name] = result.sae
        sources.append(f"{name}: {result.folder}")
    return Dictionaries(trained["SAE"], trained["transcoder"], "; ".join(sources))


def tour_dictionaries(model, tok, s: TourSettings, log: Log = print) -> tuple[Any, Any, str]:
    """(SAE, transcoder, description): :func:`offline_dictionaries` as a tuple (older name)."""
    d = offline_dictionaries(model, tok, s, log)
    return d.sae, d.transcoder, d.source


def metrics_step(model, tok, dicts: Dictionaries, s: TourSettings, log: Log = print) -> dict:
    """FVU, L0, delta loss, CE recovered and KL of both dictionaries on held-out contexts."""
    batches = gs.corpus_contexts(tok, None, s.eval_contexts, from_end=True)
    out = {}
    for key, name, sae in (
        ("sae_metrics", f"SAE {dicts.sae.meta.site_in}", dicts.sae),
        (
            "transcoder_metrics",
            f"transcoder {dicts.transcoder.meta.site_in} → {dicts.transcoder.meta.site_out}",
            dicts.transcoder,
        ),
    ):
        e = gs.evaluate_sae(model, sae, [batches], progress=False)
        out[key] = e.to_dict()
        log(
            f"{name}: FVU {e.fvu:.3f}  L0 {e.l0:.1f}  CE clean {e.ce_clean:.3f} → spliced "
            f"{e.ce_spliced:.3f} (delta loss {e.delta_loss:+.3f}, CE recovered "
            f"{e.ce_recovered:.2f}, KL {e.kl:.3f}) on {e.n_tokens} tokens"
        )
    return out


def features_step(model, tok, sae, s: TourSettings, log: Log = print) -> FeatureStep:
    """Max-activating examples over held-out contexts, and the features of the ``ENERGY`` sentence."""
    contexts = gs.corpus_contexts(tok, None, s.card_contexts, from_end=True)
    batches = [
        (c, gs.token_mask(c, pad_id=tok.pad_id))
        for c in np.split(contexts, range(8, len(contexts), 8))
    ]
    examples = gs.collect_examples(
        batches, gs.latent_encoder(model, sae), sae.meta.d_sae, k=6, window=10, progress=False
    )
    stats = gs.feature_stats(examples)
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
    log(
        f"strongest (non-dense) feature over the sentence: #{strongest} (mean activation "
        f"{feats['mean'][strongest]:.2f}, density {float(stats.density[strongest]):.4f})"
    )
    return FeatureStep(examples, stats, strings, np.asarray(feats["latents"]), specific, strongest)


def lens_and_steer_step(model, tok, sae, feature: int, coeff: float, log: Log = print) -> dict:
    """The logit lens of ``feature`` and a greedy continuation with and without steering along it."""
    lens = gs.logit_lens(model, sae, [feature], k=10)[0].with_strings(tok.token_strings)
    log("promotes: " + " ".join(repr(x) for x, _ in lens["top"]))
    log("suppresses: " + " ".join(repr(x) for x, _ in lens["bottom"]))
    direction = sae.to_arrays()["w_dec"][feature]
    prompt = tok.encode(STEER_PROMPT)
    plain = tok.decode(gs.generate(model, [prompt], 20, stop_token=None)[0])
    steered_model = gs.steer(model, sae.meta.site_in, direction, coeff)
    steered = tok.decode(gs.generate(steered_model, [prompt], 20, stop_token=None)[0])
    log(f"without steering: {STEER_PROMPT}{plain}")
    log(f"steered (+{coeff}·‖x‖·d_{feature}): {STEER_PROMPT}{steered}")
    steering = {"prompt": STEER_PROMPT, "coeff": coeff, "plain": plain, "steered": steered}
    return {"logit_lens": lens, "steering": steering}


def report_step(model, tok, sae, feats: FeatureStep, summary: dict, out_dir) -> pathlib.Path:
    """Feature cards of the strongest and most specific features, and the report page."""
    from gemma_scope_pz.app.report import write_report

    chosen = [feats.strongest] + [
        int(f)
        for f in np.argsort(-feats.specific)[:12]
        if feats.specific[f] > 0 and f != feats.strongest
    ][:11]
    lens_all = {
        r.feature: tuple(r.with_strings(tok.token_strings)[k] for k in ("top", "bottom"))
        for r in gs.logit_lens(model, sae, chosen, k=8)
    }
    return write_report(
        out_dir,
        summary=summary,
        sentence_tokens=feats.strings,
        sentence_latents=feats.latents,
        features=chosen,
        examples=feats.examples,
        stats=feats.stats,
        token_strings=tok.token_strings,
        lens=lens_all,
    )


class _Timer:
    """Prints a step title and records each step's wall time under its key."""

    def __init__(self, log: Log):
        self.log, self.times, self.start = log, {}, time.perf_counter()
        self._key, self._t = None, 0.0

    def step(self, key: str, title: str) -> None:
        self._stop()
        self.log(f"\n== {title}")
        self._key, self._t = key, time.perf_counter()

    def _stop(self) -> None:
        if self._key:
            self.times[self._key] = time.perf_counter() - self._t

    def done(self) -> dict[str, float]:
        self._stop()
        self.times["total"] = time.perf_counter() - self.start
        return {k: round(v, 1) for k, v in self.times.items()}


def run_tour(settings: TourSettings | None = None, log: Log = print) -> dict:
    """Runs every step and returns a JSON-able summary (also written as ``summary.json``)."""
    s = settings or TourSettings()
    s.out_dir = pathlib.Path(s.out_dir)
    timer = _Timer(log)
    summary: dict[str, Any] = {"settings": {k: str(v) for k, v in dataclasses.asdict(s).items()}}
    timer.step("model", "1. Gemma 3 in Penzai")
    m = model_step(s, log)
    summary.update(next_tokens=m.next_tokens, greedy=m.greedy)
    timer.step("dictionaries", "2. Dictionaries (SAE + transcoder)")
    dicts = offline_dictionaries(m.model, m.tok, s, log)
    summary["dictionaries"] = dicts.source
    timer.step("metrics", "3. Metrics on held-out text")
    summary.update(metrics_step(m.model, m.tok, dicts, s, log))
    timer.step("features", "4. Feature statistics and the top features of a sentence")
    feats = features_step(m.model, m.tok, dicts.sae, s, log)
    summary["feature_stats"] = {
        k: v for k, v in feats.stats.summary().items() if not isinstance(v, list | dict)
    }
    summary["strongest_feature"] = feats.strongest
    timer.step("lens_steer", "5. Logit lens and steering")
    summary.update(
        lens_and_steer_step(m.model, m.tok, dicts.sae, feats.strongest, s.steer_coeff, log)
    )
    timer.step("report", "6. Feature cards and report")
    report = report_step(m.model, m.tok, dicts.sae, feats, summary, s.out_dir)
    summary["report"] = str(report)
    summary["timings_s"] = timer.done()
    summary_json = json.dumps(summary, indent=2, default=str)
    write_atomically(s.out_dir / "summary.json", summary_json)
    log(f"\nReport: {report.resolve()}\nTotal {summary['timings_s']['total']:.0f} s")
    return summary
