"""The spec layer: the float64 reference losses against independent oracles, input validation, metrics, and lightly 1.6 parity."""
