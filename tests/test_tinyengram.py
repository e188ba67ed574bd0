"""TinyEngram checkpoints: a tiny transformers Qwen3 plus Engram modules saved under the
reference's names (``model.engram_layers.{L}.*``, settings in generation_config.json).

The reference composition is independent of our backbone: transformers' Qwen3 with the
golden-checked Engram module (tests/test_engram_golden.py) added to the residual before each
named layer by a forward pre-hook, hashed by the golden-checked hasher over the compressed ids.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.generate import generate
from models.checkpoint import load_checkpoint
from models.engram import Engram
from models.hashing import NgramHasher
from models.tokenizer import EngramTokenizer
from offload.offloaded_model import OffloadedModel
from tests.hf_models import VOCAB, build, save

ENGRAM_CFG = {
    "tokenizer_name_or_path": "Qwen/Qwen3-0.6B",  # ignored: the directory's tokenizer is used
    "engram_vocab_size": [503, 251],
    "max_ngram_size": 3,
    "n_embed_per_ngram": 32,
    "n_head_per_ngram": 4,
    "layer_ids": [0, 2],
    "pad_id": 2,
    "seed": 7,
    "kernel_size": 4,
    "warmup_steps": 100,  # training-only: ignored
    "soft_constraint_steps": 50,
}


class Reference:
    """transformers' Qwen3 with Engram modules hooked in before the named layers."""

    def __init__(self, qwen, modules: dict[int, Engram], hasher: NgramHasher, tok) -> None:
        self.qwen, self.modules, self.hasher, self.tok = qwen, modules, hasher, tok
        self.ids = None
        for lid, module in modules.items():
            qwen.model.layers[lid].register_forward_pre_hook(
                self._hook(lid, module), with_kwargs=True
            )

    def _hook(self, lid, module):
        def add_engram(layer, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            heads = self.hasher.hash(self.tok.compress(self.ids.numpy()))[lid]
            out = module(hidden.unsqueeze(2), torch.from_numpy(heads)).squeeze(2)
            if args:
                return (hidden + out, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": hidden + out}

        return add_engram

    @torch.no_grad()
    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        self.ids = ids
        return self.qwen(input_ids=ids, use_cache=False).logits

    def greedy(self, prompt: list[int], n: int) -> list[int]:
        ids = list(prompt)
        for _ in range(n):
            ids.append(int(self.logits(torch.tensor([ids]))[0, -1].argmax()))
        return ids[len(prompt) :]


def make_tinyengram(directory, seed: int = 0) -> Reference:
    """A TinyEngram-format directory and the reference composition of the same weights."""
    qwen = build("qwen3", seed)
    save(qwen, directory)
    tok = EngramTokenizer.from_file(directory)
    cfg = ENGRAM_CFG
    n, heads = cfg["max_ngram_size"], cfg["n_head_per_ngram"]
    pad = int(tok.lookup[cfg["pad_id"]])
    hasher = NgramHasher(
        cfg["engram_vocab_size"],
        n,
        heads,
        cfg["layer_ids"],
        tok.compressed_vocab_size,
        pad,
        cfg["seed"],
    )
    torch.manual_seed(seed + 1)
    modules = {}
    weights = load_file(str(directory / "model.safetensors"))
    for lid in cfg["layer_ids"]:
        m = Engram(64, hasher.flat_head_sizes(lid), cfg["n_embed_per_ngram"] // heads, n, 4, 1)
        with torch.no_grad():  # the conv and norms trained away from their init, so they count
            m.short_conv.conv.weight.normal_(0.0, 0.3)
            for name, p in m.named_parameters():
                if "norm" in name:
                    p.add_(0.1 * torch.randn_like(p))
        modules[lid] = m.eval()
        for k, v in m.state_dict().items():
            weights[f"model.engram_layers.{lid}.{k}"] = v.contiguous()
    save_file(weights, str(directory / "model.safetensors"), metadata={"format": "pt"})
    gen_path = directory / "generation_config.json"
    gen = json.loads(gen_path.read_text())
    gen["engram_cfg"] = cfg
    gen_path.write_text(json.dumps(gen))
    return Reference(qwen, modules, hasher, tok)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tinyengram")
    return directory, make_tinyengram(directory)


def test_config_maps_the_reference_fields(tiny):
    directory, _ = tiny
    model, tok = load_checkpoint(directory)
    c = model.config
    assert c.engram_layer_ids == [0, 2] and c.engram_head_dim == 8 and c.engram_n_heads == 4
    assert c.engram_compressed_vocab_size == tok.compressed_vocab_size < VOCAB
    assert model.hasher.pad_id == int(tok.lookup[2])  # pad_id is a raw id, compressed


def test_full_forward_equals_the_reference_composition(tiny):
    directory, ref = tiny
    ours, _ = load_checkpoint(directory)
    gen = torch.Generator().manual_seed(3)
    for n in (1, 5, 17, 64):
        ids = torch.randint(0, VOCAB, (2, n), generator=gen)
        with torch.no_grad():
            got = ours.forward_full(ids)
        torch.testing.assert_close(got, ref.logits(ids), rtol=1e-4, atol=1e-4)
    with torch.no_grad():  # the Engram layers matter: without them the logits differ
        ablated = ours.forward_full(ids, engram_scale=0.0)
    assert (ablated - got).abs().max() > 1e-2


def test_incremental_decoding_equals_the_full_forward(tiny):
    """The engine's packed steps, tables in the cpu tier read from model.safetensors: n-gram and
    conv history carried across steps, where the reference recomputes everything each token."""
    directory, ref = tiny
    om = OffloadedModel.load(directory, placement="cpu", gather="worker", progress=False)
    try:
        assert sorted(om.store.tables) == [0, 2]
        rng = np.random.default_rng(5)
        prompts = [[int(t) for t in rng.integers(3, VOCAB, n)] for n in (3, 12, 30)]
        got = generate(om.model, prompts, 12, 0.0, 0, None, rows=om.prefetcher)
    finally:
        om.close()
    for p, g in zip(prompts, got):
        assert g == ref.greedy(p, 12)


def test_tinyengram_without_its_tokenizer_is_refused(tmp_path):
    make_tinyengram(tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match="needs its tokenizer.json"):
        load_checkpoint(tmp_path)


def test_offsets_buffers_may_be_left_out(tmp_path):
    """Head offsets are fixed by the hash; a file saved without the buffer still loads."""
    ref = make_tinyengram(tmp_path)
    path = tmp_path / "model.safetensors"
    weights = {k: v for k, v in load_file(str(path)).items() if not k.endswith(".offsets")}
    save_file(weights, str(path), metadata={"format": "pt"})
    ours, _ = load_checkpoint(tmp_path)
    ids = torch.randint(0, VOCAB, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(ours.forward_full(ids), ref.logits(ids), rtol=1e-4, atol=1e-4)
