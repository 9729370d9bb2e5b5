"""The benchmark tooling on the CPU: report, max-batch search, FLOP formulas, case policy."""
