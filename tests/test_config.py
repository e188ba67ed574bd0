import json

import pytest

from models.config import ConfigError, ModelConfig

from .conftest import tiny_config


@pytest.mark.parametrize(
    "overrides, field, fix",
    [
        ({"engram_layer_ids": [0, 3]}, "engram_layer_ids", "outside the backbone"),
        ({"engram_layer_ids": [2, 0]}, "engram_layer_ids", "sorted"),
        ({"engram_layer_ids": [1, 1]}, "engram_layer_ids", "duplicates"),
        ({"engram_head_dim": 0}, "engram_head_dim", "positive integer"),
        ({"engram_head_dim": 1 << 19}, "engram_head_dim", "does not fit"),
        ({"engram_pad_token_id": 300}, "engram_pad_token_id", "outside the vocab"),
        ({"engram_vocab_size": [101]}, "engram_vocab_size", "one size per n-gram order"),
        ({"engram_vocab_size": [101, 1]}, "engram_vocab_size", ">= 2"),
        ({"engram_max_ngram_size": 1, "engram_vocab_size": []}, "engram_max_ngram_size", ">= 2"),
        ({"engram_compressed_vocab_size": 301}, "engram_compressed_vocab_size", "exceeds"),
        ({"hidden_size": 66}, "hidden_size", "divisible"),
        ({"num_key_value_heads": 3}, "num_key_value_heads", "must divide"),
        ({"hc_mult": 4}, "hc_mult", "hc_mult = 1"),
        ({"eos_token_id": -1}, "eos_token_id", "outside the vocab"),
    ],
)
def test_config_errors_name_field_and_fix(overrides, field, fix):
    with pytest.raises(ConfigError) as e:
        tiny_config(**overrides)
    assert f"'{field}'" in str(e.value) and fix in str(e.value)


def test_config_json_round_trip(tmp_path):
    cfg = tiny_config()
    cfg.save(tmp_path)
    assert ModelConfig.load(tmp_path) == cfg
    data = json.loads((tmp_path / "config.json").read_text())
    data["engram_typo"] = 1
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="engram_typo"):
        ModelConfig.load(tmp_path)
    (tmp_path / "config.json").write_text("{nope")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.load(tmp_path)
    with pytest.raises(ConfigError, match="no config.json"):
        ModelConfig.load(tmp_path / "missing")
