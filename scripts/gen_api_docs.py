"""Generate docs/api.md (from docstrings) and docs/cli.md (from the argparse parser).

    python scripts/gen_api_docs.py           # rewrite both files
    python scripts/gen_api_docs.py --check   # exit 1 if either file is out of date

For every public module of ``gemma_scope_pz`` (found with ``pkgutil``, so new modules appear
automatically) api.md shows the module docstring, then each public class and function defined
there with its signature and the first paragraph of its docstring; classes also list their
public methods. "Public" means listed in ``__all__`` when the module defines it, otherwise not
starting with an underscore. tests/test_docs.py fails when the committed files differ from this
script's output, so rerun it after changing a docstring or a command-line option.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import os
import pkgutil
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
API_MD = ROOT / "docs" / "api.md"
CLI_MD = ROOT / "docs" / "cli.md"
PACKAGE = "gemma_scope_pz"
HELP_WIDTH = "100"  # argparse wraps help to $COLUMNS; fixed so the output is reproducible

_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")

# Examples shown under each subcommand of docs/cli.md (the help text itself comes from argparse).
CLI_EXAMPLES: dict[str, tuple[str, list[str]]] = {
    "tour": (
        "Everything on the offline Gemma 3 270M: sampling, a cached SAE and transcoder trained on "
        "the offline corpus, metrics, top features, logit lens, steering, and an HTML report with "
        "feature cards in `--out`. `--sae`/`--transcoder` use released dictionaries instead.",
        [
            "gemma-scope-pz tour --quick --out tour_quick",
            "gemma-scope-pz tour --model hf:google/gemma-3-270m-pt \\\n"
            "    --sae google/gemma-scope-2-270m-pt:resid_post/layer_9_width_16k_l0_medium \\\n"
            "    --transcoder google/gemma-scope-2-270m-pt:transcoder_all/layer_6_width_16k_l0_medium_affine",
        ],
    ),
    "generate": (
        "Continue a prompt with the KV-cached, jitted sampler (greedy unless `--temperature` > 0).",
        [
            'gemma-scope-pz generate "The capital of France is" --max-new-tokens 16',
            'gemma-scope-pz generate --temperature 0.8 --top-p 0.95 --seed 3 "Once upon a time"',
            'gemma-scope-pz generate --model hf:google/gemma-3-1b-it --chat "Write a haiku about JAX."',
        ],
    ),
    "inspect": (
        "Print the strongest latents of every token of a text (BOS is skipped).",
        [
            "gemma-scope-pz inspect --sae runs/sae_l9/gemma_scope_2 "
            '"Energy cannot be created or destroyed."',
            "gemma-scope-pz inspect --model hf:google/gemma-3-1b-pt \\\n"
            '    --sae google/gemma-scope-2-1b-pt:resid_post/layer_13_width_16k_l0_medium "Hello world"',
        ],
    ),
    "train": (
        "Harvest activations (cached and resumable under `OUT/activations`), train, and export to "
        "`OUT/gemma_scope_2` and `OUT/saelens`. The config file holds the `TrainConfig` sections "
        "`sae`, `loss`, `optim` and `run`; `sae.site_in` is required, `sae.site_out` makes it a "
        "transcoder. Every field can be overridden by its dotted name (`--sae.k 64`). `--tokens` "
        "defaults to `run.batch_size × run.total_steps`.",
        [
            "cat > sae.yaml <<'EOF'\n"
            "sae: {site_in: blocks.9.resid_post, d_in: 640, d_sae: 2048, architecture: batchtopk, k: 32}\n"
            "loss: {sparsity_warmup_steps: 1}\n"
            "optim: {lr: 0.001, warmup_steps: 75}\n"
            "run: {batch_size: 1024, total_steps: 1500}\nEOF\n"
            "gemma-scope-pz train --config sae.yaml --tokens 200000 --out runs/sae_l9",
            "gemma-scope-pz train --config sae.yaml --sae.k 64 --optim.lr 5e-4 --out runs/sae_l9_k64",
            "gemma-scope-pz train --config transcoder.yaml --corpus 'notes/*.txt' --out runs/tc_l6",
        ],
    ),
    "eval": (
        "FVU, L0, delta loss, CE recovered, KL and dead fraction as JSON, on `--contexts` "
        "128-token contexts from the start of `--corpus`.",
        [
            "gemma-scope-pz eval --sae runs/sae_l9/gemma_scope_2 --contexts 32",
            "gemma-scope-pz eval --sae runs/sae_l9/gemma_scope_2 --corpus 'held_out/*.txt'",
        ],
    ),
    "features": (
        "A self-contained HTML page of feature cards: max-activating contexts, density, activation "
        "sizes and logit lens; the most frequent features unless `--features` names some.",
        [
            "gemma-scope-pz features --sae runs/sae_l9/gemma_scope_2 --out cards.html",
            "gemma-scope-pz features --sae runs/sae_l9/gemma_scope_2 --features 12 87 301 --k 12",
        ],
    ),
    "steer": (
        "Generate with and without `coeff × ‖x‖ ×` the feature's unit decoder direction added at "
        "the SAE's site.",
        [
            'gemma-scope-pz steer --sae runs/sae_l9/gemma_scope_2 --feature 123 --coeff 0.5 "I think that"',
        ],
    ),
}


# --------------------------------------------------------------------------- api.md
def public_modules() -> list[str]:
    """Importable module names of the package, sorted, private ones (``_x``) skipped."""
    package = importlib.import_module(PACKAGE)
    names = [PACKAGE]
    for info in pkgutil.walk_packages(package.__path__, PACKAGE + "."):
        if not any(part.startswith("_") for part in info.name.split(".")):
            names.append(info.name)
    return sorted(names)


def first_paragraph(doc: str | None) -> str:
    """The first paragraph of a docstring, joined into one line."""
    if not doc:
        return ""
    paragraph = inspect.cleandoc(doc).split("\n\n")[0]
    return " ".join(line.strip() for line in paragraph.splitlines())


def _dataclass_signature(cls) -> str:
    """``(field: type = default, ...)`` of a dataclass's ``__init__`` fields.

    Penzai's ``pytree_dataclass`` hides the generated ``__init__`` behind ``(*args, **kwargs)``.
    """
    parts = []
    for field in dataclasses.fields(cls):
        if not field.init:
            continue
        annotation = (
            field.type
            if isinstance(field.type, str)
            else getattr(field.type, "__name__", field.type)
        )
        text = f"{field.name}: {annotation}"
        if field.default is not dataclasses.MISSING:
            text += f" = {field.default!r}"
        elif field.default_factory is not dataclasses.MISSING:
            text += " = <factory>"
        parts.append(text)
    return "(" + ", ".join(parts) + ")"


def signature(obj) -> str:
    """``(args) -> ret`` of a callable, with memory addresses removed; ``(...)`` if unknown."""
    if inspect.isclass(obj) and dataclasses.is_dataclass(obj):
        return _ADDRESS.sub("", _dataclass_signature(obj))
    try:
        text = str(inspect.signature(obj))
    except (TypeError, ValueError):
        return "(...)"
    return _ADDRESS.sub("", text)


def _public_names(module) -> tuple[list[str], list[str]]:
    """(names defined in ``module``, names it re-exports) among its public classes/functions."""
    explicit = getattr(module, "__all__", None)
    candidates = list(explicit) if explicit is not None else sorted(vars(module))
    own, reexports = [], []
    for name in candidates:
        if name.startswith("_"):
            continue
        obj = getattr(module, name, None)
        if not (inspect.isclass(obj) or inspect.isfunction(obj)):
            continue
        if getattr(obj, "__module__", None) == module.__name__:
            own.append(name)
        elif explicit is not None:
            reexports.append(f"{name} ({obj.__module__})")
    return own, reexports


def _methods(cls) -> list[tuple[str, object]]:
    out = []
    for name, raw in vars(cls).items():
        if name.startswith("_"):
            continue
        if isinstance(raw, classmethod | staticmethod):
            out.append((name, raw.__func__))
        elif inspect.isfunction(raw):
            out.append((name, raw))
    return out


def _module_doc(module) -> list[str]:
    doc = inspect.cleandoc(module.__doc__ or "")
    if not doc:
        return []
    head, _, rest = doc.partition("\n\n")
    lines = [" ".join(line.strip() for line in head.splitlines()), ""]
    if rest.strip():
        lines += ["```text", rest.rstrip(), "```", ""]
    return lines


def _exports_table() -> list[str]:
    package = importlib.import_module(PACKAGE)
    lines = [
        "## Top-level names (`import gemma_scope_pz as gs`)",
        "",
        "| name | defined in | summary |",
        "| --- | --- | --- |",
    ]
    for name in package.__all__:
        obj = getattr(package, name)
        summary = first_paragraph(getattr(obj, "__doc__", "")).replace("|", "\\|")
        lines.append(f"| `gs.{name}` | `{obj.__module__}` | {summary} |")
    return lines + [""]


def render_api() -> str:
    """The full text of docs/api.md."""
    lines = [
        "# API reference",
        "",
        "<!-- Generated by scripts/gen_api_docs.py from the docstrings; do not edit by hand. -->",
        "",
        "Every public module of `gemma_scope_pz`: its docstring, then its public classes and "
        "functions with their signatures and the first paragraph of their docstrings. The full "
        "docstrings (arguments, raises) are in the source and in `help(...)`.",
        "",
    ]
    lines += _exports_table()
    for name in public_modules():
        module = importlib.import_module(name)
        own, reexports = _public_names(module)
        if name == PACKAGE:
            reexports = []  # the table above
        if not (module.__doc__ or own or reexports):
            continue  # an empty package __init__
        lines += [f"## `{name}`", ""]
        lines += _module_doc(module)
        if reexports:
            lines += ["Re-exports: " + ", ".join(f"`{r}`" for r in reexports) + ".", ""]
        for item in own:
            obj = getattr(module, item)
            kind = "class" if inspect.isclass(obj) else "def"
            lines += [f"### `{kind} {item}{signature(obj)}`", ""]
            summary = first_paragraph(obj.__doc__)
            if summary:
                lines += [summary, ""]
            if inspect.isclass(obj):
                for method_name, method in _methods(obj):
                    text = first_paragraph(method.__doc__)
                    entry = f"- `{method_name}{signature(method)}`"
                    lines.append(entry + (f": {text}" if text else ""))
                if _methods(obj):
                    lines.append("")
    return "\n".join(lines).rstrip() + "\n"


# --------------------------------------------------------------------------- cli.md
def _subparsers() -> dict[str, argparse.ArgumentParser]:
    from gemma_scope_pz.app.cli import build_parser

    parser = build_parser()
    for action in parser._actions:  # argparse offers no public accessor for subparsers
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise RuntimeError("gemma_scope_pz.app.cli.build_parser() has no subcommands")


def render_cli() -> str:
    """The full text of docs/cli.md."""
    old_columns = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = HELP_WIDTH
    try:
        from gemma_scope_pz.app.cli import build_parser

        top_help = build_parser().format_help()
        subs = {name: p.format_help() for name, p in _subparsers().items()}
    finally:
        if old_columns is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = old_columns
    lines = [
        "# Command line: `gemma-scope-pz`",
        "",
        "<!-- Generated by scripts/gen_api_docs.py (help text from argparse, examples from the "
        "script); do not edit by hand. -->",
        "",
        "Installed with the package (`pip install -e .`); also `python -m gemma_scope_pz`. "
        "Every subcommand takes `--model` (default: the offline Gemma 3 270M GGUF; or a `.gguf` "
        "file, a Hugging Face directory or `hf:REPO`, an orbax directory or `kaggle:HANDLE`). "
        "`--sae` takes a folder with `config.json` + `params.safetensors`, or `REPO:FOLDER` of a "
        "Gemma Scope 2 release on the Hugging Face Hub. Errors print one line `error: …` and exit "
        "with status 2 for bad input (options, files, config values) and 1 for a failure while "
        "running; `--debug` anywhere on the line shows the traceback instead.",
        "",
        "```text",
        top_help.rstrip(),
        "```",
        "",
    ]
    for name, help_text in subs.items():
        blurb, examples = CLI_EXAMPLES.get(name, ("", []))
        lines += [f"## `gemma-scope-pz {name}`", ""]
        if blurb:
            lines += [blurb, ""]
        if examples:
            lines += ["```bash", "\n".join(examples), "```", ""]
        lines += ["```text", help_text.rstrip(), "```", ""]
    return "\n".join(lines).rstrip() + "\n"


# --------------------------------------------------------------------------- main
def outputs() -> dict[Path, str]:
    """{path: expected content} of every generated file."""
    return {API_MD: render_api(), CLI_MD: render_cli()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="report stale files, write nothing")
    args = parser.parse_args(argv)
    stale = []
    for path, text in outputs().items():
        current = path.read_text(encoding="utf-8") if path.exists() else None
        if current == text:
            continue
        stale.append(path)
        if not args.check:
            tmp = path.with_suffix(path.suffix + ".tmp")
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, path)
            print(f"wrote {path.relative_to(ROOT)}")
    if args.check and stale:
        names = ", ".join(str(p.relative_to(ROOT)) for p in stale)
        print(f"out of date: {names}; run python scripts/gen_api_docs.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
