"""Kernels (Triton, C++ for CPUs), each beside a plain-torch reference it is tested against (see README.md).

This folder is installed as `megatron_selfreward.kernels` (setup.py maps it): nothing named
`kernels` is installed at the top level, where Hugging Face's kernel hub package lives and
transformers looks for it. Importing this package imports neither torch nor triton.
"""
