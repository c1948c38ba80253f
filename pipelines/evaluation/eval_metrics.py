"""Segmentation and classification metrics (numpy), as in the Hydra paper's Tables 2 and 3, and how
every ``srnode eval`` writes its report."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney, ties count half); NaN with one class only."""
    scores, labels = np.asarray(scores, float), np.asarray(labels).astype(bool)
    pos, neg = scores[labels], scores[~labels]
    if not len(pos) or not len(neg):
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return float((greater + 0.5 * ties) / (len(pos) * len(neg)))


def youden_threshold(scores: np.ndarray, labels: np.ndarray) -> float:
    """The score threshold maximising sensitivity + specificity - 1 (predict abnormal at >=)."""
    scores, labels = np.asarray(scores, float), np.asarray(labels).astype(bool)
    best, best_t = -1.0, 0.5
    for t in np.unique(scores):
        pred = scores >= t
        sens = (pred & labels).sum() / max(labels.sum(), 1)
        spec = (~pred & ~labels).sum() / max((~labels).sum(), 1)
        if sens + spec - 1 > best:
            best, best_t = sens + spec - 1, float(t)
    return best_t


def classification(scores: np.ndarray, labels: np.ndarray, threshold: float) -> dict[str, float]:
    labels = np.asarray(labels).astype(bool)
    pred = np.asarray(scores) >= threshold
    tp, tn = int((pred & labels).sum()), int((~pred & ~labels).sum())
    fp, fn = int((pred & ~labels).sum()), int((~pred & labels).sum())
    sens = tp / max(tp + fn, 1)
    prec = tp / max(tp + fp, 1)
    return {
        "accuracy": (tp + tn) / max(len(labels), 1), "auc": roc_auc(scores, labels),
        "sensitivity": sens, "specificity": tn / max(tn + fp, 1), "precision": prec,
        "f1": 2 * prec * sens / max(prec + sens, 1e-12), "threshold": threshold,
        "n": int(len(labels)), "positives": int(labels.sum()),
    }


def segmentation(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """IoU, Dice and pixel accuracy of one binary mask against the truth."""
    pred, truth = np.asarray(pred).astype(bool), np.asarray(truth).astype(bool)
    inter, union = (pred & truth).sum(), (pred | truth).sum()
    total = pred.sum() + truth.sum()
    return {"iou": float(inter / union) if union else 1.0, "dice": float(2 * inter / total) if total else 1.0,
            "pixel_accuracy": float((pred == truth).mean())}


def publish(out_dir: Path | None, stem: str, report: dict, markdown: str, cards: list[Path] = ()) -> None:
    """``<stem>.json`` (numbers) and ``<stem>.md`` (tables) in ``out_dir`` (when given), the tables
    as the evaluation section of the model card of each weights file in ``cards`` that has one (the
    weights are untouched), and the tables on stdout."""
    from pipelines import weights

    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / f"{stem}.json").write_text(json.dumps(report, indent=1, default=float) + "\n")
        (out_dir / f"{stem}.md").write_text(markdown)
    for path in cards:
        if weights.card_path(path).exists():
            weights.set_evaluation(path, markdown)
    print(markdown)
