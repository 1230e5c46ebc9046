"""The train_dpo stage tokenises its pairs once, and refuses unusable pairs before writing anything."""

from __future__ import annotations

from collections import Counter

import pytest

from megatron_selfreward.config import load_config
from megatron_selfreward.data import dpo_batches
from megatron_selfreward.errors import StageError
from megatron_selfreward.io import write_jsonl
from megatron_selfreward.records import PreferencePair
from megatron_selfreward.stages.finetune import run_train_dpo
from tests.conftest import CONFIGS
from tests.unit.test_dpo_loss import make_pairs


@pytest.fixture
def tokenised(monkeypatch: pytest.MonkeyPatch) -> Counter:
    """prompt_id -> how many times its pair went through `tokenize_pair`."""
    calls: Counter = Counter()
    real = dpo_batches.tokenize_pair

    def counting(pair: PreferencePair, *args, **kwargs):
        calls[pair.prompt_id] += 1
        return real(pair, *args, **kwargs)

    monkeypatch.setattr(dpo_batches, "tokenize_pair", counting)
    return calls


def test_train_dpo_stage_tokenises_each_pair_once(tmp_path, tokenised):
    cfg = load_config(CONFIGS / "tiny.yaml", [f"pipeline.run_dir={tmp_path / 'run'}", "dpo.max_steps=1",
                                              "dpo.global_batch_size=4"])
    pairs = make_pairs(6)
    pairs_path = tmp_path / "iter1" / "pairs.jsonl"
    pairs_path.parent.mkdir()
    write_jsonl(pairs_path, pairs)
    out = tmp_path / "models" / "M2"
    result = run_train_dpo(cfg, 1, pairs_path, None, out, {"test": "once"})
    assert result["pairs"] == 6 and result["steps"] == 1
    assert result["data"] == {"kept": 6, "truncated": 0, "dropped": 0}
    assert tokenised == Counter({p.prompt_id: 1 for p in pairs})
    assert (out / "megatron" / "metadata.json").is_file()


def test_train_dpo_stage_refuses_pairs_longer_than_seq_len_before_writing(tmp_path, tokenised):
    cfg = load_config(CONFIGS / "tiny.yaml", [f"pipeline.run_dir={tmp_path / 'run'}"])
    long_prompt = "Explain this, please. " * 40
    pairs = [PreferencePair(f"p{i}", long_prompt, "yes", "no", 4.0, 1.0) for i in range(3)]
    pairs_path = tmp_path / "iter1" / "pairs.jsonl"
    pairs_path.parent.mkdir()
    write_jsonl(pairs_path, pairs)
    out = tmp_path / "models" / "M2"
    with pytest.raises(StageError) as caught:
        run_train_dpo(cfg, 1, pairs_path, None, out, {"test": "refused"})
    assert str(caught.value).startswith(
        f"iteration 1: all 3 pairs have a prompt longer than dpo.seq_len {cfg.dpo.seq_len}, so M2 is "
        "not trained. Judge: ? responses, ? samples, parse failures {}, too long to judge 0; pairs "
        f"dropped {{}} (see {pairs_path.parent}).")
    assert not out.exists()  # a refused stage leaves no model directory behind
    assert tokenised == Counter({p.prompt_id: 1 for p in pairs})
