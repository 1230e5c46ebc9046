"""`selfreward convert hf-to-megatron | megatron-to-hf` honour --dtype and --overwrite, and
megatron-to-hf --model-config, --tokenizer and --max-shard-gb."""

from __future__ import annotations

import pytest
import torch

from megatron_selfreward.cli import main
from tests.unit.test_convert_llama import make_hf_dir


def _hf_dtypes(directory) -> set[torch.dtype]:
    from safetensors import safe_open

    dtypes = set()
    for path in directory.glob("*.safetensors"):
        with safe_open(path, "pt") as f:
            dtypes |= {f.get_slice(name).get_dtype() for name in f.keys()}
    return {getattr(torch, {"BF16": "bfloat16", "F32": "float32"}[d]) for d in dtypes}


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return make_hf_dir(tmp_path_factory.mktemp("hf") / "tiny", tied=False)


def test_dtype_and_overwrite_reach_both_directions(hf_dir, tmp_path, capsys):
    from megatron.core import dist_checkpointing

    ckpt = tmp_path / "megatron"
    assert main(["convert", "hf-to-megatron", str(hf_dir), str(ckpt), "--dtype", "bfloat16"]) == 0
    key = "model.embedding.word_embeddings.weight"
    assert dist_checkpointing.load_tensors_metadata(ckpt)[key].dtype == torch.bfloat16
    # An existing output is kept unless --overwrite says otherwise (exit 2, the path named).
    assert main(["convert", "hf-to-megatron", str(hf_dir), str(ckpt)]) == 2
    assert str(ckpt) in capsys.readouterr().err
    assert main(["convert", "hf-to-megatron", str(hf_dir), str(ckpt), "--overwrite"]) == 0
    assert dist_checkpointing.load_tensors_metadata(ckpt)[key].dtype == torch.float32  # HF's own

    back = tmp_path / "hf-back"
    assert main(["convert", "megatron-to-hf", str(ckpt), str(back), "--dtype", "bfloat16"]) == 0
    assert _hf_dtypes(back) == {torch.bfloat16}
    assert main(["convert", "megatron-to-hf", str(ckpt), str(back)]) == 2
    assert main(["convert", "megatron-to-hf", str(ckpt), str(back), "--overwrite"]) == 0
    assert _hf_dtypes(back) == {torch.float32}  # the checkpoint's own


def test_megatron_to_hf_honours_model_config_tokenizer_and_max_shard_gb(hf_dir, tmp_path):
    """The options tools/convert_megatron_to_hf.py had alone, on a checkpoint without its
    model_config.yaml (as training saves them) and a tokenizer from elsewhere."""
    import json
    import shutil

    ckpt = tmp_path / "megatron"
    assert main(["convert", "hf-to-megatron", str(hf_dir), str(ckpt)]) == 0
    model_config = tmp_path / "run.yaml"
    shutil.move(ckpt / "model_config.yaml", model_config)
    tokenizer = tmp_path / "tokenizer"
    tokenizer.mkdir()
    (tokenizer / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 123}))

    back = tmp_path / "hf-back"
    assert main(["convert", "megatron-to-hf", str(ckpt), str(back)]) == 3  # no model config
    assert main(["convert", "megatron-to-hf", str(ckpt), str(back), "--model-config", str(model_config),
                 "--tokenizer", str(tokenizer), "--max-shard-gb", str(100_000 / 1024**3)]) == 0
    index = json.loads((back / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # shards of about 100 kB
    assert json.loads((back / "tokenizer_config.json").read_text()) == {"model_max_length": 123}
    assert json.loads((back / "config.json").read_text())["num_hidden_layers"] == 2
