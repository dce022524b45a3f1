"""The benchmark studies, one folder each; run them as modules from the repository root
(``python -m benchmarks.<study>.run``). Set-up and shared helpers: ``benchmarks.common``."""
