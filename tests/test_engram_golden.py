import json

import numpy as np
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from models.engram import ConvStep, Engram
from models.hashing import NgramHasher
from models.tokenizer import EngramTokenizer, build_compression_lookup, compression_normalizer


def _module_case(golden, hc):
    meta = json.loads((golden / f"engram-module-hc{hc}.json").read_text())
    tensors = load_file(str(golden / f"engram-module-hc{hc}.safetensors"))
    return meta, tensors


def test_golden_engram_modules(golden):
    for hc in (1, 4):
        meta, t = _module_case(golden, hc)
        e = meta["engram"]
        lookup = np.array(meta["compression_lookup"], dtype=np.int64)
        hasher = NgramHasher(
            e["engram_vocab_size"],
            e["max_ngram_size"],
            e["n_head_per_ngram"],
            e["layer_ids"],
            int(lookup.max()) + 1,
            int(lookup[e["pad_id"]]),
            e["seed"],
        )
        tok = EngramTokenizer.__new__(EngramTokenizer)
        tok.lookup = lookup
        hashes = hasher.hash(tok.compress(t["inputs.input_ids"].numpy()))
        for lid in e["layer_ids"]:
            module = Engram(
                meta["hidden_size"],
                hasher.flat_head_sizes(lid),
                e["n_embed_per_ngram"] // e["n_head_per_ngram"],
                e["max_ngram_size"],
                e["kernel_size"],
                hc,
            )
            prefix = f"layers.{lid}.engram."
            state = {k[len(prefix) :]: v for k, v in t.items() if k.startswith(prefix)}
            module.load_state_dict(state, strict=True)  # reference names, nothing left over
            np.testing.assert_array_equal(
                module.multi_head_embedding.offsets.numpy(), hasher.head_offsets(lid)
            )
            with torch.no_grad():
                out = module(t[f"inputs.layer{lid}.hidden_states"], torch.from_numpy(hashes[lid]))
            torch.testing.assert_close(out, t[f"expected.layer{lid}.output"], atol=1e-5, rtol=0)


def test_packed_fusion_equals_full_module(golden):
    """The decoding form (conv history carried between steps) equals the whole-sequence form."""
    meta, t = _module_case(golden, 4)
    e = meta["engram"]
    torch.manual_seed(0)
    module = Engram(32, [503, 509, 521, 523] * 2, 4, e["max_ngram_size"], e["kernel_size"], 4)
    rows = torch.randn(2, 12, 8, 4)
    hidden = t["inputs.layer1.hidden_states"]
    with torch.no_grad():
        full = module.fuse(hidden, rows)
        hist = torch.zeros(2, module.short_conv.history_len, 4 * 32)
        outs = []
        for a, b in [(0, 5), (5, 6), (6, 12)]:
            n = b - a
            step = ConvStep.build([n, n], e["kernel_size"], e["max_ngram_size"])
            out, hist = module.fuse_packed(
                hidden[:, a:b].reshape(-1, 4, 32), rows[:, a:b].reshape(-1, 8, 4), hist, step
            )
            outs.append(out.view(2, n, 4, 32))
    torch.testing.assert_close(torch.cat(outs, dim=1), full, atol=1e-5, rtol=1e-5)


def test_normalizer_cases(golden):
    cases = json.loads((golden / "compression_normalizer_cases.json").read_text())["cases"]
    norm = compression_normalizer()
    for c in cases:
        assert norm.normalize_str(c["text"]) == c["normalized"], c["text"]


def _word_tokenizer(words):
    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=words[0]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece()
    return tok


def test_compression_lookup_first_seen_order():
    words = ["<unk>", "Apple", "apple", "APPLE", "Café", "cafe", "Ｆｕｌｌ", "full", "x"]
    lookup = build_compression_lookup(_word_tokenizer(words))
    assert lookup.tolist() == [0, 1, 1, 1, 2, 2, 3, 3, 4]


def test_compression_replacement_char_keys_on_raw_token():
    # Two byte-level pieces that each decode to U+FFFD must stay distinct.
    tok = Tokenizer(models.BPE({"a": 0, "\u00c3": 1, "\u00a9": 2, "b": 3}, []))
    tok.decoder = decoders.ByteLevel()
    lookup = build_compression_lookup(tok)
    assert "\ufffd" in tok.decode([1]) and "\ufffd" in tok.decode([2])
    assert lookup[1] != lookup[2]
    assert len(set(lookup.tolist())) == 4


def test_compress_negative_ids_pass_through():
    tok = EngramTokenizer(_word_tokenizer(["<unk>", "A", "a"]))
    np.testing.assert_array_equal(tok.compress(np.array([[2, -1, 1, 0]])), [[1, -1, 1, 0]])
