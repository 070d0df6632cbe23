"""Side-by-side benchmarks; run from the checkout's root as `python -m benchmarks.<name>` (see the README)."""
