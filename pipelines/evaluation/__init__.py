"""Evaluation on the held-out splits: image metrics, model-card tables (eval_metrics) and one
``python -m`` entry point per model family (eval_cxr, eval_sr2d, eval_sr3d)."""
