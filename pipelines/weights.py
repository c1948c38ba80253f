"""Shipped weights: safetensors files in ``weights/``, each with a markdown model card.

The card starts with a header that the loader checks before it trusts the file:

    ---
    file: cxr_hydra_trunk.safetensors
    sha256: <hex digest of the file>
    config: {"widths": [...], ...}
    ---

A missing file, a missing card or a digest that differs is an error that names the file and
what to do. Nothing is downloaded.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file


class WeightsError(RuntimeError):
    """Weights that cannot be used: missing, not matching their model card, or for another model."""


#: The package ``pip install .`` puts the repository's ``weights/`` in (see setup.py).
INSTALLED_PACKAGE = "srnode_weights"


def weights_dir() -> Path:
    """``$SRNODE_WEIGHTS``; else the source tree's ``weights/`` (a checkout or an editable install);
    else the installed package ``srnode_weights`` (``pip install .``, from any directory); else a
    folder that does not exist (:data:`NOT_FOUND`), so that every load says where it looked."""
    return _located()[0]


#: What :func:`weights_dir` gives when no weights are found anywhere: never a real folder.
NOT_FOUND = Path(__file__).resolve().parent / "no-weights-found"


def _source_tree() -> Path:
    """Where the weights are in a checkout (or an editable install): ``weights/`` beside ``pipelines/``."""
    return Path(__file__).resolve().parents[1] / "weights"


def _is_source_tree(tree: Path) -> bool:
    """A checkout has pyproject.toml beside ``weights/``; an installed ``pipelines`` package sits in
    site-packages, whose ``weights/`` (if any) is another package's."""
    return tree.is_dir() and (tree.parent / "pyproject.toml").is_file()


def _located() -> tuple[Path, str]:
    """(the weights folder, how it was chosen)."""
    env = os.environ.get("SRNODE_WEIGHTS")
    if env:
        return Path(env), "from SRNODE_WEIGHTS"
    tree = _source_tree()
    if _is_source_tree(tree):
        return tree, "the source tree's weights/; SRNODE_WEIGHTS overrides"
    spec = importlib.util.find_spec(INSTALLED_PACKAGE)
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations))), \
            f"the installed package {INSTALLED_PACKAGE}; SRNODE_WEIGHTS overrides"
    return NOT_FOUND, "no weights found"


def looked() -> str:
    """Every place the lookup tries, in order, and why each gave nothing (when none did)."""
    tree = _source_tree()
    why = "absent" if not tree.is_dir() else "not a source tree: no pyproject.toml beside it"
    return (f"$SRNODE_WEIGHTS (not set), {tree} (the source tree's weights/: {why}), "
            f"the installed package {INSTALLED_PACKAGE} (not installed); set SRNODE_WEIGHTS to the folder "
            "that holds the weights")


def where(folder: Path) -> str:
    """Where ``folder`` came from, for error messages: the lookup's answer or a folder given."""
    located, how = _located()
    if located == NOT_FOUND and Path(folder).resolve() == NOT_FOUND:
        return looked()
    if Path(folder).resolve() == located.resolve():
        return f"{folder} ({how})"
    return f"{folder} (given; SRNODE_WEIGHTS sets the default)"


def problem(load: Callable[[Path], object]) -> str | None:
    """Why ``load(weights_dir())`` fails (missing, altered or mismatched weights), else None: what a
    pipeline's ``not_ready`` reports to ``srnode config check`` and at node start."""
    try:
        load(weights_dir())
    except (WeightsError, KeyError, RuntimeError) as exc:
        return str(exc)
    return None


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def card_path(path: Path) -> Path:
    return Path(path).with_suffix(".md")


def save(path: Path, state: dict[str, torch.Tensor], config: dict[str, Any], card_body: str) -> str:
    """Write the weights and their card; returns the digest."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(path),
              metadata={"config": json.dumps(config, sort_keys=True)})
    digest = sha256(path)
    header = f"---\nfile: {path.name}\nsha256: {digest}\nconfig: {json.dumps(config, sort_keys=True)}\n---\n\n"
    card_path(path).write_text(header + card_body.rstrip() + "\n")
    return digest


def read_card_header(path: Path) -> dict[str, str]:
    card = card_path(path)
    if not card.exists():
        raise WeightsError(f"no model card {card.name} next to {path.name}: weights without a card are not loaded")
    lines = card.read_text().splitlines()
    if not lines or lines[0] != "---" or "---" not in lines[1:]:
        raise WeightsError(f"model card {card.name} has no '---' header with file, sha256 and config")
    header = {}
    for line in lines[1:lines.index("---", 1)]:
        key, _, value = line.partition(":")
        header[key.strip()] = value.strip()
    return header


def restore(module: torch.nn.Module, state: dict[str, torch.Tensor], path: Path) -> torch.nn.Module:
    """``module`` with ``state`` loaded; a file written for another version of the model (missing,
    extra or reshaped tensors) is a :class:`WeightsError` naming the file, not a bare torch error."""
    try:
        module.load_state_dict(state)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[-1].strip()
        raise WeightsError(f"{Path(path).name} does not fit this version of its model ({first[:200]}): "
                           f"retrain it (see its model card)") from err
    return module


def load(path: Path, model: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict, config) of a weights file whose digest matches its card (and, given ``model``,
    whose config names that model)."""
    path = Path(path)
    if not path.exists():
        raise WeightsError(f"weights file {path.name} is missing: looked in {where(path.parent)}; train it (see its "
                           f"model card) or restore it from the repository")
    header = read_card_header(path)
    expected, actual = header.get("sha256"), sha256(path)
    if expected != actual:
        raise WeightsError(f"{path.name} does not match its model card (sha256 {actual[:12]}..., card says "
                           f"{(expected or 'nothing')[:12]}...): the file was changed or the card is stale")
    config = json.loads(header["config"])
    if model is not None and config.get("model") != model:
        raise WeightsError(f"{path.name} holds {config.get('model')!r}, not {model!r}")
    return load_file(str(path)), config


def update_config(path: Path, **entries: Any) -> str:
    """Add ``entries`` to the config of a shipped weights file (values derived from its data or
    measured on it, such as the cxr lung head's plausible lung bounds): the tensors are written
    again unchanged, the card keeps its body, the digest in its header is the new file's."""
    state, config = load(path)
    body = card_path(path).read_text().split("\n---\n", 1)[1].lstrip("\n")
    return save(path, state, {**config, **entries}, body)


def set_evaluation(path: Path, section: str) -> None:
    """Replace (or add) the evaluation section (from its "## Evaluation" heading on) of the model
    card of ``path``; the weights and the card's header are untouched."""
    card = card_path(path)
    text = card.read_text().split("\n## Evaluation")[0].rstrip()
    card.write_text(text + "\n\n" + section)


def set_section(path: Path, heading: str, text: str) -> None:
    """Replace (or add) the section starting at ``heading`` of the model card of ``path``, placed before
    its evaluation section (which :func:`set_evaluation` rewrites); the weights are untouched."""
    card = card_path(path)
    body = card.read_text()
    if heading in body:
        start = body.index(heading)
        end = body.find("\n## ", start + 1)
        body = body[:start].rstrip() + "\n\n" + (body[end + 1:] if end >= 0 else "")
    cut = body.find("\n## Evaluation")
    head, tail = (body, "") if cut < 0 else (body[:cut], body[cut + 1:])
    card.write_text(head.rstrip() + "\n\n" + text.rstrip() + "\n" + ("\n" + tail if tail else ""))
