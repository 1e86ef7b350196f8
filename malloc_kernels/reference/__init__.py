"""The PyTorch reference: DESIGN.md section 2 semantics in plain PyTorch, any dtype including float64. The oracle."""
