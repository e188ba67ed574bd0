"""The shipped built-in model: loads, matches its measured quality, generates deterministically."""

import math
import subprocess
import sys

import numpy as np
import pytest

from engine.generate import generate
from models.checkpoint import default_model_dir, load_checkpoint
from offload.offloaded_model import OffloadedModel
from training.corpus import encode_files, read_text, split_files
from training.evaluate import validation_loss

# Measured on this slice right after training: 4.141 (ppl 62.9; zeroed Engram: 4.632); plus margin.
VAL_LOSS_BOUND = 4.4


def test_shipped_checkpoint_loads_and_is_small():
    d = default_model_dir()
    size = sum(p.stat().st_size for p in d.iterdir())
    assert size <= 40 * 2**20, f"shipped checkpoint is {size / 2**20:.1f} MiB"
    model, tok = load_checkpoint()
    assert tok is not None and tok.vocab_size == model.config.vocab_size
    assert len(model.config.engram_layer_ids) == 2
    assert all(model.engram_table(i).shape[0] > 0 for i in model.config.engram_layer_ids)


def test_validation_loss_on_held_out_slice_is_below_the_measured_bound():
    model, tok = load_checkpoint()
    _, val = split_files()
    ids = encode_files(tok.tokenizer, val[:6])[: 16 * 256 + 1]
    loss = validation_loss(model, ids, seq_len=256, progress=False)
    ablated = validation_loss(model, ids, seq_len=256, engram_scale=0.0, progress=False)
    assert loss < VAL_LOSS_BOUND, f"val loss {loss:.3f} (ppl {math.exp(loss):.1f})"
    assert loss < ablated, "zeroing Engram should hurt a model trained with it"


def test_greedy_generation_is_deterministic_and_plausible():
    model, tok = load_checkpoint()
    ids = tok.encode("def __init__(self")
    a = generate(model, [ids], 40, eos_token_id=model.config.eos_token_id)[0]
    b = generate(model, [ids], 40, eos_token_id=model.config.eos_token_id)[0]
    assert a == b
    text = tok.decode(a)
    assert "self" in text or ":" in text, text


def test_engram_generate_cli_prints_python(tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "engine.generate",
            "--prompt",
            "def __init__(self",
            "--max-tokens",
            "40",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert (
        r.stdout.startswith("def __init__(self") and len(r.stdout) > len("def __init__(self") + 20
    )
    assert "tok/s" in r.stderr


def test_tokenizer_round_trips_corpus_files():
    _, tok = load_checkpoint()
    train, val = split_files()
    for path in train[:5] + val[:5]:
        text = read_text(path)
        assert tok.decode(tok.encode(text)) == text, path


def test_compression_shrinks_the_vocab():
    _, tok = load_checkpoint()
    assert tok.compressed_vocab_size < tok.vocab_size
    assert np.all(tok.lookup >= 0) and tok.lookup.max() == tok.compressed_vocab_size - 1


def test_engram_eval_prints_the_table_and_refuses_bad_input(capsys, tmp_path):
    from training.evaluate import main

    assert main(["--max-files", "3", "--seq-len", "128"]) == 0
    captured = capsys.readouterr()
    out, err = captured.out, captured.err
    assert "| Engram model | " in out and "| Engram model, Engram outputs zeroed | " in out
    # not a terminal: no bars (no carriage returns), one line per row with the time left
    assert "\r" not in err and "%|" not in err, err
    lines = [x for x in err.splitlines() if x.startswith("engram-eval: ")]
    assert len(lines) == 2 and "1/2 Engram model:" in lines[0] and "s left)" in lines[0]
    for argv, says in [
        (["--dense", str(tmp_path / "none")], "does not exist"),
        (["--max-files", "0"], "--max-files must be at least 1"),
    ]:
        with pytest.raises(SystemExit):
            main(argv)
        assert says in capsys.readouterr().err


def test_greedy_outputs_are_the_recorded_ones():
    """The step path (engine, runner, sampler, offload) must keep the built-in model's greedy
    tokens exactly as recorded before the engine was restructured."""
    import json

    from .conftest import GOLDEN

    rec = json.loads((GOLDEN / "builtin_greedy.json").read_text())
    # recorded on the CPU: the same device here, whatever else this machine has
    om = OffloadedModel.load(None, placement="cpu", gather="worker", device="cpu", progress=False)
    prompts = [c["prompt_ids"] for c in rec["cases"]]
    eos = om.model.config.eos_token_id
    got = generate(om.model, prompts, rec["max_tokens"], eos_token_id=eos, rows=om.prefetcher)
    om.close()
    assert got == [c["output_ids"] for c in rec["cases"]]
    assert om.tokenizer.encode(rec["cases"][0]["prompt"]) == prompts[0]


def test_engram_eval_at_a_terminal_shows_one_bar_over_every_row(capsys):
    from training.evaluate import run_rows

    def row(bar):
        bar.update(5)
        return 1.5

    said = []
    out = run_rows([("a", row), ("b", row)], 5, terminal=True, say=said.append)
    err = capsys.readouterr().err
    assert out == [("a", 1.5), ("b", 1.5)] and not said  # the bar, not lines
    assert "engram-eval" in err and "10/10" in err  # one total: every row's windows
