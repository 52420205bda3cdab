"""Per-turn gradient weights: the article's attribution model, exact token-level weights, autograd measurement,
and a report for a dataset."""
