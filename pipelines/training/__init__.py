"""Training: the datasets from ``shared/data`` (cxr_data, volume_data), the shared loop helpers
(common) and one ``python -m`` entry point per model family (train_cxr, train_sr2d, train_sr3d)."""
