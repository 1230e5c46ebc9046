"""tools/*.py are thin entries into `selfreward convert|seed`: every option a tool accepts arrives
at the converter through the CLI (recorded by stand-in converters), the converter runs in the
world the command opens, and a known error is one `error: ` line with exit status 1."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_selfreward.config import load_config
from tests.conftest import CONFIGS, REPO

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
GIB = 1024**3


def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _world_is_open() -> bool:
    import torch.distributed as dist
    from megatron.core import parallel_state

    return dist.is_initialized() and parallel_state.model_parallel_is_initialized()


@pytest.fixture
def calls(monkeypatch) -> list[tuple[str, tuple, dict, bool]]:
    """Stand-ins for the converters the CLI calls: (name, args, kwargs, world open) per call."""
    from megatron_selfreward import assets
    from megatron_selfreward.convert import gguf, hf_megatron

    recorded: list[tuple[str, tuple, dict, bool]] = []

    def stand_in(name: str):
        def convert(*args, **kwargs):
            recorded.append((name, args, kwargs, _world_is_open()))
            return Path(args[1])
        return convert

    monkeypatch.setattr(gguf, "import_gguf", stand_in("import_gguf"))
    monkeypatch.setattr(hf_megatron, "convert_hf_to_megatron", stand_in("convert_hf_to_megatron"))
    monkeypatch.setattr(hf_megatron, "convert_megatron_to_hf", stand_in("convert_megatron_to_hf"))
    monkeypatch.setattr(assets, "smollm2_gguf_path", lambda: Path("/wheel/smollm2.gguf"))
    return recorded


def test_import_gguf_forwards_every_option(calls, tmp_path):
    tool = load_tool("import_gguf")
    assert tool.main(["--gguf", "smollm2", "--out", str(tmp_path / "hf"), "--dtype", "bfloat16",
                      "--overwrite"]) == 0
    assert tool.main(["--gguf=model.gguf", "--out", str(tmp_path / "hf2")]) == 0
    assert [(c[1], c[2]) for c in calls] == [
        ((Path("/wheel/smollm2.gguf"), tmp_path / "hf"), {"dtype": "bfloat16", "overwrite": True}),
        ((Path("model.gguf"), tmp_path / "hf2"), {"dtype": "float32", "overwrite": False}),
    ]


def test_convert_hf_to_megatron_forwards_every_option_inside_a_world(calls, tmp_path):
    tool = load_tool("convert_hf_to_megatron")
    assert tool.main(["--hf", "hf_dir", "--out", str(tmp_path / "m"), "--overwrite"]) == 0
    assert tool.main(["--out", str(tmp_path / "m2"), "--dtype", "float16", "--hf", "hf_dir"]) == 0
    assert [c[1:] for c in calls] == [
        ((Path("hf_dir"), tmp_path / "m"), {"dtype": None, "overwrite": True}, True),
        ((Path("hf_dir"), tmp_path / "m2"), {"dtype": "float16", "overwrite": False}, True),
    ]
    assert not _world_is_open()  # the command closes the world it opened


def test_convert_megatron_to_hf_forwards_every_option_inside_a_world(calls, tmp_path):
    tool = load_tool("convert_megatron_to_hf")
    run_yaml = CONFIGS / "tiny.yaml"
    assert tool.main(["--ckpt", "ckpt", "--out", str(tmp_path / "hf"), "--dtype", "bfloat16",
                      "--model-config", str(run_yaml), "--tokenizer", "tok", "--max-shard-gb", "0.5",
                      "--overwrite"]) == 0
    assert tool.main(["--ckpt", "ckpt", "--out", str(tmp_path / "hf2")]) == 0
    (name, args, options, world), (_, _, defaults, _) = calls
    assert (name, args, world) == ("convert_megatron_to_hf", (Path("ckpt"), tmp_path / "hf"), True)
    assert options == {"dtype": "bfloat16", "model_cfg": load_config(run_yaml).model, "tokenizer_dir": "tok",
                       "max_shard_bytes": GIB // 2, "overwrite": True}
    assert defaults == {"dtype": None, "model_cfg": None, "tokenizer_dir": None, "max_shard_bytes": 5 * GIB,
                        "overwrite": False}


def test_build_oasst_seed_forwards_every_option(monkeypatch, tmp_path):
    from megatron_selfreward.data import oasst

    real, seen = oasst.build_oasst_seed_dir, []

    def recording(export, out_dir, overwrite=False):
        seen.append((export, out_dir, overwrite))
        return real(export, out_dir, overwrite=overwrite)

    monkeypatch.setattr(oasst, "build_oasst_seed_dir", recording)
    export = FIXTURES / "oasst_export.trees.jsonl"
    assert load_tool("build_oasst_seed").main([str(export), str(tmp_path / "seed"), "--overwrite"]) == 0
    assert seen == [(export, tmp_path / "seed", True)]


def test_tool_help_is_the_cli_commands_and_legacy_names_are_required(capsys):
    tool = load_tool("convert_megatron_to_hf")
    with pytest.raises(SystemExit) as exit_:
        tool.main(["--help"])
    assert exit_.value.code == 0
    printed = capsys.readouterr().out
    assert "--ckpt and --out give SRC and OUT of `selfreward convert megatron-to-hf`" in printed
    assert all(option in printed for option in ("--model-config", "--tokenizer", "--max-shard-gb", "--dtype"))
    with pytest.raises(SystemExit) as exit_:
        tool.main(["--out", "hf"])
    assert exit_.value.code == 2 and "--ckpt" in capsys.readouterr().err


@pytest.mark.parametrize("tool, args", [
    ("import_gguf", ["--gguf", "{missing}.gguf", "--out", "{out}"]),
    ("convert_hf_to_megatron", ["--hf", "{missing}", "--out", "{out}"]),
    ("convert_megatron_to_hf", ["--ckpt", "{missing}", "--out", "{out}"]),
    ("build_oasst_seed", ["{missing}.trees.jsonl", "{out}"]),
])
def test_tool_with_a_missing_input_prints_one_error_line_and_exits_1(tool, args, tmp_path, capsys):
    missing, out = tmp_path / "absent", tmp_path / "out"
    argv = [a.format(missing=missing, out=out) for a in args]
    assert load_tool(tool).main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and str(missing) in err, err
    assert not out.exists()


def test_tool_runs_as_a_script_from_the_checkout(tmp_path):
    """`python tools/x.py` (the __main__ guard, the installed package, the exit status)."""
    missing = tmp_path / "absent"
    proc = subprocess.run([sys.executable, "tools/convert_megatron_to_hf.py", "--ckpt", str(missing),
                           "--out", str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr and str(missing) in proc.stderr
