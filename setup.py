"""Package layout only (everything else is in pyproject.toml): the repository's top-level
`kernels/` folder is installed as `megatron_selfreward.kernels`, so that nothing named `kernels`
(also Hugging Face's kernel hub package) is installed at the top level."""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["megatron_selfreward", "megatron_selfreward.*"]),
              "megatron_selfreward.kernels"],
    package_dir={"megatron_selfreward.kernels": "kernels"},
)
