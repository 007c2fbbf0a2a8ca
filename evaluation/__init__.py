"""AgriCLIP evaluation: zero-shot classification over many downstream datasets, linear probe and k-shot, image-text
retrieval, and reports.

- `evaluation.suite`: the suite's YAML format, the results schema and the command line (``python -m evaluation.suite``);
- `evaluation.runner`: `run_suite`, the work;
- `evaluation.metrics`: `METRICS`, the one table of classification metrics (top-k accuracy, mean per-class
  accuracy, macro-F1, expected calibration error) that the suite, the report and the card read;
- `evaluation.linear_probe`: logistic regression on frozen features, k-shot sampling;
- `evaluation.retrieval`: recall@k in both directions;
- `evaluation.knn`: DINO's weighted k-NN vote;
- `evaluation.report`: results.json, markdown tables and plots.

The package imports nothing itself: its command line answers --help before anything heavy loads.
"""
