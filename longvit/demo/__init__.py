"""The end-to-end demo (``longvit demo`` / ``make demo``) and the synthetic cohorts it uses.

``cohort``: pyramidal TIFF slides whose label needs the whole slide. ``feature_cohort``:
feature HDF5 files with the same kind of task, written directly (tests, benchmarks).
``pipeline``: slides -> tiles -> features -> training -> AUROC, predictions, heatmaps.
"""
