"""dgm: a command-line experiment runner for deep generative models of binary data, on JAX."""
