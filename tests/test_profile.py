"""engram-profile: the rows a corpus reads, counted with the model's own hasher, ranked and
written as safetensors for a hot-row cache."""

from collections import Counter

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from models.checkpoint import TOKENIZER_FILE, load_checkpoint
from models.config import ModelConfig
from models.safetensors_header import TableFileError
from models.tokenizer import EngramTokenizer
from offload.profile import (
    HOT_ROWS_FILE,
    corpus_ids,
    hasher_for,
    main,
    profile,
    rank,
    read_hot_rows,
    read_stream,
)


@pytest.fixture
def ckpt_parts(tiny_ckpt):
    config = ModelConfig.load(tiny_ckpt)
    tok = EngramTokenizer.from_file(tiny_ckpt / TOKENIZER_FILE)
    ids, _ = corpus_ids(tok, "val", max_files=2, progress=False)
    return config, tok, ids


def test_read_stream_is_the_models_own_rows(tiny_ckpt, ckpt_parts):
    config, tok, ids = ckpt_parts
    model, _ = load_checkpoint(tiny_ckpt, load_tables=False)
    ids = ids[:500]
    want = model.full_row_ids(ids[None].astype(np.int64))
    steps = list(read_stream(hasher_for(config, tok), tok.compress(ids), chunk=37))
    assert len(steps) == 14
    for lid in config.engram_layer_ids:
        got = np.concatenate([s[lid] for s in steps])
        np.testing.assert_array_equal(got, want[lid][0])


def test_profile_counts_and_ranks_every_read(ckpt_parts):
    config, tok, ids = ckpt_parts
    hasher = hasher_for(config, tok)
    stream = list(read_stream(hasher, tok.compress(ids)))
    layers = profile(hasher, tok.compress(ids))
    for lid, p in layers.items():
        ref = Counter(np.concatenate([s[lid].reshape(-1) for s in stream]).tolist())
        assert p.reads == sum(ref.values()) == len(ids) * hasher.heads_per_layer
        assert dict(zip(p.rows.tolist(), p.counts.tolist())) == ref
        want = sorted(ref.items(), key=lambda kv: (-kv[1], kv[0]))
        assert list(zip(p.rows.tolist(), p.counts.tolist())) == want
        assert p.table_rows == hasher.table_rows(lid)
    few = profile(hasher, tok.compress(ids), top=0.01)
    for lid, p in few.items():
        n = int(0.01 * hasher.table_rows(lid))
        assert len(p.rows) == n and np.array_equal(p.rows, layers[lid].rows[:n])
    assert len(profile(hasher, tok.compress(ids), top=5)[lid].rows) == 5


def test_rank_breaks_ties_by_row_id():
    rows, counts = rank(np.array([9, 4, 7, 1]), np.array([2, 5, 2, 2]))
    assert rows.tolist() == [4, 1, 7, 9] and counts.tolist() == [5, 2, 2, 2]


def test_engram_profile_writes_the_file_beside_the_checkpoint(tiny_ckpt, tmp_path, capsys):
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, ckpt)
    assert main(["--model", str(ckpt), "--max-files", "2", "--top", "0.05"]) == 0
    assert "wrote" in capsys.readouterr().out
    got = read_hot_rows(ckpt / HOT_ROWS_FILE)
    config = ModelConfig.load(ckpt)
    assert sorted(got) == config.engram_layer_ids
    for p in got.values():
        assert p.rows.dtype == np.int64 and len(p.rows) == int(0.05 * p.table_rows)
        assert np.all(np.diff(p.counts) <= 0) and p.reads > p.counts.sum()


def test_bad_profile_files_are_refused(tmp_path):
    path = tmp_path / "p.safetensors"
    save_file({"layers.1.rows": torch.zeros(3, dtype=torch.int64)}, str(path))
    with pytest.raises(TableFileError, match="no engram.profile metadata"):
        read_hot_rows(path)
    meta = {"engram.profile": '{"layers": {"1": {"reads": 9, "table_rows": 10}}}'}
    save_file({"layers.1.rows": torch.zeros(3, dtype=torch.int64)}, str(path), meta)
    with pytest.raises(TableFileError, match="layers.1.counts: want int64"):
        read_hot_rows(path)
    rows = torch.tensor([3, 12])
    save_file({"layers.1.rows": rows, "layers.1.counts": torch.tensor([2, 1])}, str(path), meta)
    with pytest.raises(TableFileError, match="outside the table"):
        read_hot_rows(path)
