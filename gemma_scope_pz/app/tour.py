"""The tour: the whole Gemma Scope story on the offline Gemma 3 270M, one small step per function.

1. load the model and tokenizer, next-token predictions, a greedy continuation;
2. :func:`offline_dictionaries`: an SAE for ``blocks.{layer}.resid_post`` and a transcoder for one MLP
   (trained on the offline corpus and cached; or released Gemma Scope 2 dictionaries);
3. FVU, L0 and delta loss on held-out text;
4. feature statistics and the top features of a sentence;
5. the logit lens of the strongest feature and steering along it;
6. the HTML report (metrics, highlighted tokens, feature cards);
7. optionally (``circuit=True``), an attribution graph over the transcoder and its HTML view.

Steps 1 and 3-6 live in :mod:`gemma_scope_pz.app.steps`; everything calls only the public facade
(``import gemma_scope_pz as gs``) and returns dataclasses.
Heavy steps are cached under ``gemma_scope_pz.io.default_cache_dir()/tour``: a second run only loads and evaluates.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time
from typing import Any

import gemma_scope_pz as gs
from gemma_scope_pz.app import steps
from gemma_scope_pz.app.steps import Log
from gemma_scope_pz.io import write_atomically


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
      circuit: Also trace an attribution graph over the transcoder (step 7; off by default: on
        2 CPU cores it adds minutes, mostly XLA compilation of the 270M's reverse pass).
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
    circuit: bool = False
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


# The dictionaries shipped as package data (gemma_scope_pz/data/offline_dictionaries).
SHIPPED = {"sae": "resid_post/layer_9", "transcoder": "transcoder/layer_6"}


def _expected_time(s: TourSettings) -> str:
    """Rough wall time of the first :func:`offline_dictionaries` call, from measured tour runs."""
    return "about 2 minutes" if s.quick else "5 to 15 minutes"


def offline_dictionaries(
    model=None, tok=None, settings: TourSettings | None = None, log: Log = print
) -> Dictionaries:
    """An SAE at ``blocks.{layer}.resid_post`` and a transcoder at ``blocks.{transcoder_layer}``.

    Without ``settings``: the dictionaries shipped with the package for the offline 270M
    (``gs.load_sae("offline", "resid_post/layer_9")`` and ``"transcoder/layer_6"``; seconds).
    With ``settings`` (the tour): loads ``settings.sae``/``settings.transcoder`` when given;
    otherwise harvests the offline corpus once (one forward pass for the three sites, cached on
    disk, with a progress bar) and trains both with those settings, reusing cached exports.
    """
    from gemma_scope_pz.io import default_cache_dir
    from gemma_scope_pz.models.fingerprint import weights_fingerprint
    from gemma_scope_pz.train.pipeline import fingerprint

    if settings is None:
        names = SHIPPED.values()
        sae, transcoder = (gs.load_sae("offline", name) for name in names)
        return Dictionaries(sae, transcoder, "shipped: " + ", ".join(f"offline:{n}" for n in names))
    s = settings
    if s.sae and s.transcoder:
        return Dictionaries(gs.load_sae(s.sae), gs.load_sae(s.transcoder), "loaded")
    model = model if model is not None else gs.load_model(s.model)
    tok = tok if tok is not None else gs.load_tokenizer(None)
    sites = [
        f"blocks.{s.layer}.resid_post",
        f"blocks.{s.transcoder_layer}.mlp_in",
        f"blocks.{s.transcoder_layer}.mlp_out",
    ]
    root = default_cache_dir() / "tour"
    corpus = gs.load_corpus(None)
    weights = weights_fingerprint(model)  # a fine-tuned model gets its own activations
    # activations made with bfloat16 CPU matmuls are kept apart (float32 keys stay as they were)
    mode = [] if gs.cpu_matmul() == "float32" else [f"cpu_matmul={gs.cpu_matmul()}"]
    data_key = fingerprint(
        model.config.to_dict(), weights, corpus.label, s.train_tokens, *sites, *mode
    )
    if not (root / f"acts-{data_key}").exists():
        log(
            f"first run: harvesting {s.train_tokens} tokens and training two dictionaries for "
            f"{s.train_steps} steps each ({_expected_time(s)} on 2 CPU cores; cached afterwards)"
        )
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
    m = steps.model_step(s.model, log)
    summary.update(next_tokens=m.next_tokens, greedy=m.greedy)
    timer.step("dictionaries", "2. Dictionaries (SAE + transcoder)")
    dicts = offline_dictionaries(m.model, m.tok, s, log)
    summary["dictionaries"] = dicts.source
    timer.step("metrics", "3. Metrics on held-out text")
    summary.update(
        steps.metrics_step(m.model, m.tok, dicts.sae, dicts.transcoder, s.eval_contexts, log)
    )
    timer.step("features", "4. Feature statistics and the top features of a sentence")
    feats = steps.features_step(m.model, m.tok, dicts.sae, s.card_contexts, log)
    summary["feature_stats"] = {
        k: v for k, v in feats.stats.summary().items() if not isinstance(v, list | dict)
    }
    summary["strongest_feature"] = feats.strongest
    timer.step("lens_steer", "5. Logit lens and steering")
    summary.update(
        steps.lens_and_steer_step(m.model, m.tok, dicts.sae, feats.strongest, s.steer_coeff, log)
    )
    if s.circuit:
        timer.step("circuit", "7. An attribution graph over the transcoder")
        summary.update(
            steps.circuit_step(m.model, m.tok, dicts.transcoder, s.out_dir, log=log).summary
        )
    timer.step("report", "6. Feature cards and report")
    report = steps.report_step(m.model, m.tok, dicts.sae, feats, summary, s.out_dir)
    summary["report"] = str(report)
    summary["timings_s"] = timer.done()
    summary_json = json.dumps(summary, indent=2, default=str)
    write_atomically(s.out_dir / "summary.json", summary_json)
    log(f"\nReport: {report.resolve()}\nTotal {summary['timings_s']['total']:.0f} s")
    return summary
