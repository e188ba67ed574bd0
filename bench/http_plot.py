"""The PNG of an ``engram-bench --http-cost`` result: where each side's CPU per token goes, and
each round's shares against the issue's 15% target."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

TARGET = 0.15


def plot(res: dict, path: Path) -> Path:
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.5))
    ways = ["direct", "http"]
    s = res["summary"]
    split = "device_cpu_us_per_token" in res
    if split:  # the device worker's own, the rest on top
        dev = [res["device_cpu_us_per_token"][w]["median"] for w in ways]
        rest = [res["host_cpu_us_per_token"][w]["median"] for w in ways]
        left.bar(ways, dev, label="device worker (forward pass)", color="tab:blue")
        left.bar(
            ways,
            rest,
            bottom=dev,
            label="rest (host; through the server: + HTTP)",
            color="tab:orange",
        )
    else:
        left.bar(ways, [s[w]["cpu_us_per_token"]["median"] for w in ways], color="tab:blue")
    tot = [s[w]["cpu_us_per_token"] for w in ways]
    left.errorbar(
        ways,
        [t["median"] for t in tot],
        yerr=[[t["median"] - t["min"] for t in tot], [t["max"] - t["median"] for t in tot]],
        fmt="none",
        ecolor="black",
        capsize=4,
        label="whole process: min-max of the rounds",
    )
    left.set_ylabel("CPU µs per token (median of the rounds)")
    left.set_title("CPU per token, the engine direct and through the server", fontsize=9)
    left.legend(fontsize=7, loc="upper center", framealpha=0.9)
    left.set_ylim(0, 1.35 * max(t["max"] for t in tot))
    shares = [
        ("server CPU over\nthe engine's", "http_cpu_share"),
        ("throughput\nlost", "http_cost_share"),
    ]
    if split:
        shares += [
            ("HTTP layer's\nown work", "http_host_cpu_share"),
            ("forward pass\nslower", "device_cpu_share"),
        ]
    for k, (_, key) in enumerate(shares):
        raw = res[key]["raw"]
        right.scatter([k] * len(raw), [100 * x for x in raw], alpha=0.5, s=14)
        right.plot([k - 0.3, k + 0.3], [100 * res[key]["median"]] * 2, color="black", lw=2)
    right.axhline(100 * TARGET, color="red", ls="--", lw=1, label="the 15% target")
    right.axhline(0, color="grey", lw=0.8)
    right.set_xticks(range(len(shares)), [label for label, _ in shares], fontsize=7)
    right.set_ylabel("% of the direct engine's figure\n(a dot per round, the bar the median)")
    right.set_title("per-round shares", fontsize=9)
    right.legend(fontsize=7)
    env = res["environment"]
    fig.suptitle(
        f"HTTP cost: {res['clients']} streaming clients, {res['max_tokens']} tokens, "
        f"{len(res['rounds']['http'])} rounds; {env['device']}\n{res.get('command', '')}",
        fontsize=8,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
