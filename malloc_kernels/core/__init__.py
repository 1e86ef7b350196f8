"""The leaf contract layer: what every other layer of malloc_kernels imports and nothing below it."""
