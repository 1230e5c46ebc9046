"""The repository's kernels/ folder is installed as `megatron_selfreward.kernels`: nothing named
`kernels` (Hugging Face's kernel hub package, which transformers probes for) is installed at the
top level. Checked from outside the checkout, where only the installed package is visible."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO


def test_kernels_are_installed_inside_the_package(tmp_path):
    code = ("import importlib.util, json\n"
            "import megatron_selfreward.kernels.decode_cpu as d\n"
            "print(json.dumps([d.__file__, importlib.util.find_spec('kernels') is None]))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         check=True).stdout
    path, no_top_level = __import__("json").loads(out)
    # An editable install maps the package onto the checkout's folder; a wheel holds a copy.
    assert path == str(REPO / "kernels" / "decode_cpu.py") or path.endswith("megatron_selfreward/kernels/decode_cpu.py")
    assert no_top_level
