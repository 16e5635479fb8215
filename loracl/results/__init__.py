"""Results of runs: the metrics of accuracy matrices, report.html per run, and comparison tables over runs."""
