"""AgriCLIP evaluation: zero-shot classification over many downstream datasets, linear probe and k-shot, image-text
retrieval, and reports.

- `evaluation.suite`: the suite (`run_suite`, ``python -m evaluation.suite``), its YAML format, the results schema;
- `evaluation.metrics`: top-k accuracy, mean per-class accuracy and macro-F1 as local `evaluate` modules;
- `evaluation.linear_probe`: logistic regression on frozen features, k-shot sampling;
- `evaluation.retrieval`: recall@k in both directions;
- `evaluation.report`: results.json, markdown tables and plots.

The package imports nothing itself, so that ``python -m evaluation.suite`` runs the module only once.
"""
