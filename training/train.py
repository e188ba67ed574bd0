"""``engram-train``: train the built-in model (or its dense baseline) on the CPython stdlib.

Seeded and resumable: every ``--save-every`` steps the run directory gets the checkpoint
(DESIGN.md format) plus ``train_state.safetensors`` / ``train_state.json`` (optimizer moments,
step, RNG position). Engram tables get the paper's treatment: Adam at a higher learning rate,
no weight decay; the ShortConv starts at zero so Engram begins as a plain gated lookup.

    engram-train --out runs/engram                # the shipped model's recipe
    engram-train --out runs/dense --dense --tokenizer-from runs/engram   # no Engram layers
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from models.checkpoint import TOKENIZER_FILE, save_checkpoint, table_key
from models.config import ModelConfig
from models.llama import EngramForCausalLM, init_weights
from models.tokenizer import EngramTokenizer

from .corpus import EOS, encode_files, split_files, train_tokenizer


def recipe_config(tok: EngramTokenizer, dense: bool) -> ModelConfig:
    return ModelConfig(
        vocab_size=tok.vocab_size,
        hidden_size=256,
        intermediate_size=704,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        eos_token_id=tok.token_id(EOS),
        engram_layer_ids=[] if dense else [1, 2],
        engram_max_ngram_size=3,
        engram_n_heads=4,
        engram_head_dim=16,
        engram_vocab_size=[24000, 24000],
        engram_compressed_vocab_size=tok.compressed_vocab_size,
        engram_pad_token_id=tok.token_id(EOS),
        engram_seed=0,
        engram_kernel_size=4,
    ).validate()


def make_optimizer(model: EngramForCausalLM, lr: float, table_lr_mult: float):
    tables = {table_key(lid) for lid in model.config.engram_layer_ids}
    table_params, decay, no_decay = [], [], []
    for name, p in model.named_parameters():
        if name in tables:
            table_params.append(p)
        elif p.ndim >= 2 and "embed_tokens" not in name:
            decay.append(p)
        else:
            no_decay.append(p)
    groups = [
        {"params": decay, "weight_decay": 0.1, "lr_mult": 1.0},
        {"params": no_decay, "weight_decay": 0.0, "lr_mult": 1.0},
    ]
    opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))
    if not table_params:
        return [opt]
    # Tables: plain Adam, higher learning rate, no weight decay.
    tab = torch.optim.Adam(
        [{"params": table_params, "lr_mult": table_lr_mult}], lr=lr * table_lr_mult
    )
    return [opt, tab]


def lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


def _save_state(out: Path, step: int, model: EngramForCausalLM, opts, data_seed: int) -> None:
    """Full-precision weights and optimizer moments (the checkpoint's tables are bfloat16)."""
    tensors = {
        f"model.{k}": v.contiguous()
        for k, v in model.state_dict().items()
        if not (k == "lm_head.weight" and model.config.tie_word_embeddings)
    }
    for i, opt in enumerate(opts):
        for pid, st in opt.state_dict()["state"].items():
            for k, v in st.items():
                tensors[f"opt{i}.{pid}.{k}"] = torch.as_tensor(v).contiguous()
    save_file(tensors, str(out / "train_state.safetensors"))
    (out / "train_state.json").write_text(json.dumps({"step": step, "data_seed": data_seed}))


def _load_state(out: Path, model: EngramForCausalLM, opts) -> int:
    tensors = load_file(str(out / "train_state.safetensors"))
    weights = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
    model.load_state_dict(weights, strict=not model.config.tie_word_embeddings)
    tensors = {k: v for k, v in tensors.items() if not k.startswith("model.")}
    for i, opt in enumerate(opts):
        sd = opt.state_dict()
        state: dict[int, dict] = {}
        for key, v in tensors.items():
            o, pid, k = key.split(".", 2)
            if o == f"opt{i}":
                state.setdefault(int(pid), {})[k] = v
        sd["state"] = state
        opt.load_state_dict(sd)
    return json.loads((out / "train_state.json").read_text())["step"]


def load_corpus(out: Path, vocab_size: int) -> tuple[EngramTokenizer, np.ndarray, np.ndarray]:
    """Train (or reuse) the tokenizer and the encoded train/validation streams."""
    train_files, val_files = split_files()
    tok_path, data_path = out / TOKENIZER_FILE, out / "data.safetensors"
    if tok_path.is_file():
        tok = EngramTokenizer.from_file(tok_path)
    else:
        from tokenizers import Tokenizer

        raw: Tokenizer = train_tokenizer(train_files, vocab_size)
        raw.save(str(tok_path))
        tok = EngramTokenizer(raw)
    if data_path.is_file():
        d = load_file(str(data_path))
        return tok, d["train"].numpy(), d["val"].numpy()
    train = encode_files(tok.tokenizer, train_files, "encoding train")
    val = encode_files(tok.tokenizer, val_files, "encoding val")
    save_file({"train": torch.from_numpy(train), "val": torch.from_numpy(val)}, str(data_path))
    return tok, train, val


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="engram-train", description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="run directory (created; resumed if present)")
    ap.add_argument("--tokenizer-from", default=None, help="reuse tokenizer+data of this run dir")
    ap.add_argument("--dense", action="store_true", help="baseline: same recipe, no Engram")
    ap.add_argument("--steps", type=int, default=1600)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--table-lr-mult", type=float, default=5.0)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    ap.add_argument("--save-every", type=int, default=250)
    ap.add_argument("--vocab-size", type=int, default=8192)
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.tokenizer_from:
        src = Path(args.tokenizer_from)
        for name in (TOKENIZER_FILE, "data.safetensors"):
            if not (out / name).exists():
                (out / name).write_bytes((src / name).read_bytes())
    tok, train, _ = load_corpus(out, args.vocab_size)

    config = recipe_config(tok, args.dense)
    torch.manual_seed(args.seed)
    model = EngramForCausalLM(config, tok.lookup)
    start = 0
    opts = make_optimizer(model, args.lr, args.table_lr_mult)
    if (out / "train_state.json").is_file():
        start = _load_state(out, model, opts)
        print(f"resuming {out} at step {start}")
    else:
        init_weights(model, torch.Generator().manual_seed(args.seed))
    model.train()

    n_params = sum(p.numel() for p in model.parameters())
    tables = sum(model.engram_table(i).numel() for i in config.engram_layer_ids)
    print(f"params: {n_params / 1e6:.2f}M ({tables / 1e6:.2f}M in Engram tables)")
    bar = tqdm(total=args.steps, initial=start, desc="train", unit="step")
    tokens_per_step = args.batch_size * args.seq_len
    t_last, loss_avg = time.perf_counter(), None
    for step in range(start, args.steps):
        # Each step's windows come from its own seeded generator: resuming replays exactly.
        rng = np.random.default_rng([args.seed, step])
        starts = rng.integers(0, len(train) - args.seq_len - 1, size=args.batch_size)
        window = np.stack([train[s : s + args.seq_len + 1] for s in starts]).astype(np.int64)
        x, y = torch.from_numpy(window[:, :-1]), torch.from_numpy(window[:, 1:])
        for opt in opts:
            for g in opt.param_groups:
                g["lr"] = lr_at(step, args.steps, args.warmup, args.lr) * g["lr_mult"]
        logits = model.forward_full(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for opt in opts:
            opt.step()
        loss_avg = loss.item() if loss_avg is None else 0.95 * loss_avg + 0.05 * loss.item()
        now = time.perf_counter()
        bar.set_postfix(loss=f"{loss_avg:.3f}", tok_s=f"{tokens_per_step / (now - t_last):.0f}")
        t_last = now
        bar.update(1)
        if (step + 1) % args.save_every == 0 or step + 1 == args.steps:
            save_checkpoint(model.eval(), out, tok, table_dtype=torch.bfloat16)
            model.train()
            _save_state(out, step + 1, model, opts, args.seed)
    bar.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
