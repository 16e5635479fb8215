"""`loracl bench`: what a continual-learning step costs, measured side by side on one model in one process.

    run.py       the command: config, scenario (the preset's, or random images), sections, `--json`
    sections.py  step cost across task counts, the statistics passes' share, throughput against a naive reference
    tasks.py     the `tasks` section: the method's own step at every task count, a prompt method's query
    dense.py     the official codes' forward (every branch summed as one dense matrix), for the reference only
    timing.py    median timers, the image-counting meter, peak memory
    report.py    the printed table and the JSON summary

Everything here serves the bench alone; runs never use it. See docs/performance.md.
"""
