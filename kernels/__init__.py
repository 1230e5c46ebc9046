"""Kernels (Triton, C++ for CPUs), each beside a plain-torch reference it is tested against (see README.md).

Importing this package imports neither torch nor triton: transformers probes for a top-level
`kernels` module (Hugging Face's kernel hub shares the name) and may import it while it does.
"""
