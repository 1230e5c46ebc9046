"""Inputs are checked where they enter, and a bad one is one clear line naming the user's file.

The base model at import (a truncated safetensors or GGUF, a changed file at the same path), the
CLI's handling of known errors (no traceback unless asked for), a stage run before the stages
that write its inputs, a missing seed directory, an empty pairs file, and a seed whose every
example is longer than the training sequence.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from megatron_selfreward.cli import DEBUG_ENV, main
from megatron_selfreward.config import load_config
from megatron_selfreward.convert.gguf import GGUFImportError, check_gguf_file, import_gguf
from megatron_selfreward.convert.hf_checkpoint import HFCheckpointError
from megatron_selfreward.pipeline.local import stage_done
from megatron_selfreward.pipeline.run import import_base_model
from megatron_selfreward.pipeline.schedule import find_stage, plan
from tests.conftest import CONFIGS


@pytest.fixture(autouse=True)
def no_debug(monkeypatch: pytest.MonkeyPatch) -> None:
    # --debug sets the variable for child processes; keep it out of the other tests.
    monkeypatch.setenv(DEBUG_ENV, "0")


def run_cli(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str]:
    code = main(list(args))
    return code, capsys.readouterr().err


def error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("selfreward: error: ")]
    assert len(lines) == 1, stderr
    return lines[0]


# ---------------------------------------------------------------------------------------------
# The base model at import


def tiny_cfg(run_dir: Path, *overrides: str):
    return load_config(CONFIGS / "tiny.yaml", [f"pipeline.run_dir={run_dir}", *overrides])


def write_hf_dir(directory: Path, cfg) -> Path:
    """config.json for the tiny preset's model and its weights, written by safetensors itself."""
    from safetensors.torch import save_file

    from megatron_selfreward.convert.llama_map import hf_config_from_model, hf_tensor_shapes

    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(hf_config_from_model(cfg)))
    save_file({name: torch.zeros(shape) for name, shape in hf_tensor_shapes(cfg).items()},
              directory / "model.safetensors", metadata={"format": "pt"})
    return directory


def hf_cfg(tmp_path: Path, source: Path):
    return tiny_cfg(tmp_path / "run", "model.source=hf", f"model.path={source}")


def test_truncated_safetensors_fails_at_import_naming_the_users_file(tmp_path):
    source = write_hf_dir(tmp_path / "user_model", tiny_cfg(tmp_path))
    weights = source / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(HFCheckpointError) as caught:
        import_base_model(hf_cfg(tmp_path, source))
    assert str(caught.value).startswith(f"{weights}: truncated safetensors file: tensor ")
    assert not (tmp_path / "run" / "models" / "M0").exists()  # no link to a broken model


def test_hf_source_without_valid_config_fails_at_import(tmp_path):
    source = write_hf_dir(tmp_path / "user_model", tiny_cfg(tmp_path))
    (source / "config.json").write_text("{not json")
    with pytest.raises(HFCheckpointError, match=f"^{source / 'config.json'}: not valid JSON"):
        import_base_model(hf_cfg(tmp_path, source))
    (source / "config.json").unlink()
    with pytest.raises(HFCheckpointError, match=f"^{source / 'config.json'}: missing"):
        import_base_model(hf_cfg(tmp_path, source))


def import_done(cfg) -> bool:
    return stage_done(find_stage(plan(cfg), "import_model", 0))


def test_changed_hf_files_at_the_same_path_are_imported_again(tmp_path):
    source = write_hf_dir(tmp_path / "user_model", tiny_cfg(tmp_path))
    cfg, run_dir = hf_cfg(tmp_path, source), tmp_path / "run"
    manifest = run_dir / "models" / "M0.manifest.json"
    import_base_model(cfg)
    first = json.loads(manifest.read_text())["fingerprint"]
    assert import_done(cfg)  # the plan's fingerprint is the stage's own
    # Same path, same size, new content (a re-download): only its modification time tells.
    weights = source / "model.safetensors"
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert not import_done(cfg)
    import_base_model(cfg)
    second = json.loads(manifest.read_text())["fingerprint"]
    assert second != first and import_done(cfg)
    # A truncated file at the same path is checked again, not reused.
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(HFCheckpointError, match="truncated safetensors file"):
        import_base_model(cfg)


def write_gguf(path: Path) -> Path:
    """A small GGUF written by the gguf package: metadata of every kind, an F32 and an F16 tensor."""
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_token_list(["<s>", "</s>", "hello", "world"])
    # 256 and 32 bytes: multiples of the data alignment, so the file ends where the last tensor does.
    writer.add_tensor("token_embd.weight", np.ones((4, 16), dtype=np.float32))
    writer.add_tensor("output_norm.weight", np.ones(16, dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_check_accepts_whole_files(tmp_path):
    check_gguf_file(write_gguf(tmp_path / "small.gguf"))
    from megatron_selfreward.assets import smollm2_gguf_path

    try:
        real = smollm2_gguf_path()
    except FileNotFoundError:
        return
    check_gguf_file(real)  # quantized tensors (Q4_1), 272 of them, alignment padding


def test_truncated_gguf_names_the_file_and_the_tensor_cut_off(tmp_path):
    path = write_gguf(tmp_path / "small.gguf")
    data = path.read_bytes()
    path.write_bytes(data[:-4])
    with pytest.raises(GGUFImportError) as caught:
        import_gguf(path, tmp_path / "out")
    assert str(caught.value) == (
        f"{path}: truncated GGUF file: its tensor data ends at byte {len(data):,} (tensor "
        f"'output_norm.weight') but the file has {len(data) - 4:,} bytes; 1 of 2 tensors are cut off")
    assert not (tmp_path / "out").exists()
    path.write_bytes(data[:100])  # inside the metadata
    with pytest.raises(GGUFImportError, match=f"^{path}: truncated GGUF file: its header runs past byte"):
        check_gguf_file(path)
    path.write_bytes(b"GGML" + data[4:])
    with pytest.raises(GGUFImportError, match=f"^{path}: not a GGUF file"):
        check_gguf_file(path)


# ---------------------------------------------------------------------------------------------
# Known errors on the command line: one line, the traceback only when asked for


def test_cli_known_error_is_one_line_and_debug_shows_the_traceback(tmp_path, capsys, monkeypatch):
    path = write_gguf(tmp_path / "small.gguf")
    path.write_bytes(path.read_bytes()[:-4])
    args = ("convert", "gguf-to-hf", str(path), str(tmp_path / "out"))
    code, err = run_cli(capsys, *args)
    assert code == 3 and "Traceback" not in err
    assert error_line(err).startswith(f"selfreward: error: {path}: truncated GGUF file: ")
    code, err = run_cli(capsys, *args, "--debug")
    assert code == 3 and "Traceback (most recent call last)" in err and "GGUFImportError" in err
    monkeypatch.setenv(DEBUG_ENV, "1")
    code, err = run_cli(capsys, *args)
    assert code == 3 and "Traceback (most recent call last)" in err


def test_cli_hf_checkpoint_error_is_one_line(tmp_path, capsys):
    source = tmp_path / "user_model"
    source.mkdir()
    code, err = run_cli(capsys, "convert", "hf-to-megatron", str(source), str(tmp_path / "out"))
    assert code == 3 and "Traceback" not in err
    assert error_line(err) == (f"selfreward: error: {source / 'config.json'}: missing (not a Hugging "
                               "Face model directory?)")


# ---------------------------------------------------------------------------------------------
# Stages and their inputs


def test_a_stage_before_its_inputs_names_the_stages_that_write_them(tmp_path, capsys):
    run_dir = tmp_path / "run"
    code, err = run_cli(capsys, "stage", "sample_responses", "--iteration", "1", "--config", "tiny",
                        f"pipeline.run_dir={run_dir}")
    assert code == 2 and "Errno" not in err and "Traceback" not in err
    assert error_line(err) == (
        f"selfreward: error: stage sample_responses (iteration 1) of {run_dir} needs "
        "iter1/prompts.jsonl (written by `selfreward stage generate_prompts --iteration 1`), "
        "models/M1 (written by `selfreward stage train_sft`): run those stages first "
        "(or `selfreward run`, which runs every stage in order)")


@pytest.mark.parametrize("command", ["run", "stage"])
def test_missing_seed_directory_gets_the_seed_loaders_message(tmp_path, capsys, command):
    seed = tmp_path / "no_such_seed"
    args = ["run"] if command == "run" else ["stage", "prepare_seed"]
    code, err = run_cli(capsys, *args, "--config", "tiny", f"pipeline.run_dir={tmp_path / 'run'}",
                        f"data.seed={seed}")
    assert code == 3 and "Errno" not in err and "Traceback" not in err
    assert error_line(err) == (f"selfreward: error: {seed}: seed directory not found; expected "
                               "ift.jsonl, ranked.jsonl and eval_prompts.jsonl")


def test_train_dpo_on_an_empty_pairs_file_says_it_is_empty(tmp_path, capsys):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("")
    code, err = run_cli(capsys, "train", "dpo", "--config", "tiny", "--data", str(pairs),
                        "--out", str(tmp_path / "out"), f"pipeline.run_dir={tmp_path / 'run'}")
    assert code == 3 and "Traceback" not in err
    assert error_line(err) == f"selfreward: error: {pairs}: empty, no PreferencePair records to train on"


def long_example(chars: int = 6321) -> dict:
    return {"messages": [{"role": "user", "content": ("Explain this, please. " * 300)[:chars]},
                         {"role": "assistant", "content": "Sure."}]}


def test_over_long_examples_are_dropped_counted_and_logged():
    from megatron_selfreward.data.sft_batches import prepare_sft
    from megatron_selfreward.records import SFTExample
    from megatron_selfreward.tokenizer import ByteTokenizer

    short = {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]}
    examples = [SFTExample.from_dict(d, "test") for d in (short, long_example(), short)]
    samples, stats = prepare_sft(examples, ByteTokenizer(512), "chatml", seq_len=128)
    assert len(samples) == 2 and stats.as_dict() == {"kept": 2, "truncated": 0, "dropped": 1}
    assert stats.describe("sft", 128) == ("sft data: 2 of 3 examples kept; dropped 1 whose prompt alone "
                                          "fills sft.seq_len=128 tokens; cut 0 to fit")


def test_sft_whose_every_example_is_too_long_names_the_file(tmp_path, capsys):
    data = tmp_path / "ift.jsonl"
    data.write_text(json.dumps(long_example()) + "\n")
    code, err = run_cli(capsys, "train", "sft", "--config", "tiny", "--data", str(data),
                        "--out", str(tmp_path / "out"), f"pipeline.run_dir={tmp_path / 'run'}")
    assert code == 3 and "Traceback" not in err
    assert error_line(err) == (
        f"selfreward: error: {data}: all 1 examples were dropped, each prompt alone fills "
        "sft.seq_len=128 tokens: nothing left to train on (raise sft.seq_len or shorten the prompts)")
