"""Load time and peak memory of a Hugging Face checkpoint: ``python -m bench.hf_load``.

Makes a random Llama-shaped checkpoint with transformers (default: TinyLlama's 1.1B shape, in
bfloat16, sharded at 1 GB as save_pretrained does; no real weights needed to measure loading),
then loads it with ``load_checkpoint`` in fresh processes, interleaving the dtypes over the
rounds (the first round of each is a warm-up: it also fills the page cache). Each load reports
its seconds and its peak RSS (``ru_maxrss``) and the RSS before the load (torch imported).
Figures: medians with min-max; written to ``--json`` by this script. Needs the ``hf`` extra.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

SHAPE = dict(  # TinyLlama-1.1B
    vocab_size=32000,
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=22,
    num_attention_heads=32,
    num_key_value_heads=4,
    max_position_embeddings=2048,
    tie_word_embeddings=False,
)

CHILD = r"""
import json, resource, sys, time
import torch
from models.checkpoint import load_checkpoint
torch.set_num_threads(1)
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
before = rss()
t0 = time.perf_counter()
model, _ = load_checkpoint(sys.argv[1], dtype=sys.argv[2])
dt = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
print(json.dumps(dict(load_s=dt, peak_rss=peak, rss_before=before, model_bytes=nbytes)))
"""


def make_checkpoint(directory: Path, shard: str) -> int:
    """A random Llama of SHAPE in bfloat16, saved by transformers; its parameter count."""
    import torch

    try:
        import transformers
    except ImportError:
        sys.exit("bench.hf_load needs transformers: pip install -e '.[hf]'")
    from models.checkpoint import default_model_dir

    torch.manual_seed(0)
    config = transformers.LlamaConfig(**SHAPE)
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = transformers.LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(torch.float32)
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(directory, max_shard_size=shard)
    shutil.copy(default_model_dir() / "tokenizer.json", directory / "tokenizer.json")
    del model
    return n


def measure(directory: Path, dtype: str) -> dict:
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(directory), dtype],
        capture_output=True,
        text=True,
        check=True,
        cwd=root,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.hf_load", description=__doc__)
    ap.add_argument("--dir", required=True, help="where the checkpoint is (made if absent)")
    ap.add_argument("--shard", default="1GB", help="save_pretrained max_shard_size")
    ap.add_argument("--dtypes", default="bfloat16,float32", help="load dtypes, interleaved")
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds after the warm-up")
    ap.add_argument("--json", default=None, help="write the figures here")
    args = ap.parse_args(argv)
    directory = Path(args.dir)
    made_s, params = None, None
    if not (directory / "config.json").is_file():
        t0 = time.perf_counter()
        params = make_checkpoint(directory, args.shard)
        made_s = time.perf_counter() - t0
    files = sorted(p.name for p in directory.glob("*.safetensors"))
    on_disk = sum((directory / f).stat().st_size for f in files)
    dtypes = args.dtypes.split(",")
    runs: dict[str, list[dict]] = {d: [] for d in dtypes}
    for r in range(args.rounds + 1):
        for d in dtypes[r % len(dtypes) :] + dtypes[: r % len(dtypes)]:  # rotated order
            got = measure(directory, d)
            if r:  # round 0 warms up (page cache, imports)
                runs[d].append(got)
            print(f"round {r} {d}: {json.dumps(got)}", file=sys.stderr)
    result = {
        "checkpoint": {
            "shape": SHAPE,
            "parameters": params,
            "stored_dtype": "bfloat16",
            "files": files,
            "bytes_on_disk": on_disk,
            "made_in_s": made_s,
        },
        "machine": {"cpus": __import__("os").cpu_count(), "platform": platform.platform()},
        "rounds": args.rounds,
        "loads": {
            d: {
                "load_s": summary([x["load_s"] for x in rs]),
                "peak_rss_bytes": summary([x["peak_rss"] for x in rs]),
                "rss_before_bytes": summary([x["rss_before"] for x in rs]),
                "model_bytes": rs[0]["model_bytes"],
                "raw": rs,
            }
            for d, rs in runs.items()
        },
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
