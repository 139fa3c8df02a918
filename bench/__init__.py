"""prefrank benchmarks: run as modules, e.g. `python -m bench.scoring`; results in RESULTS.md."""
