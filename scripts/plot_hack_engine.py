"""Per-round paired output tok/s ratio kv4 / bf16 at --max-num-seqs 1/8/32 (PREFIX-mns*, default
results/hack-engine): `plot_hack_engine.py [PREFIX]`."""
import json, random, sys
import matplotlib; matplotlib.use("Agg")
import matplotlib.pyplot as plt
prefix = sys.argv[1] if len(sys.argv) > 1 else "results/hack-engine"
fig, ax = plt.subplots(figsize=(5.5, 3.6))
for x, m in enumerate((1, 8, 32)):
    rows = json.load(open(f"{prefix}-mns{m}/compare.json"))["rows"]
    by = {(r["config"], r["round"]): r["output_throughput"] for r in rows}
    rounds = sorted({k[1] for k in by})
    ratios = [by[("kv4", i)] / by[("bf16", i)] for i in rounds]
    num = [by[("kv4", i)] for i in rounds]; den = [by[("bf16", i)] for i in rounds]
    rng = random.Random(0); boots = []
    for _ in range(2000):
        idx = [rng.randrange(len(rounds)) for _ in rounds]
        boots.append(sum(num[i] for i in idx) / sum(den[i] for i in idx))
    boots.sort(); lo, hi = boots[50], boots[1949]; mid = sum(num) / sum(den)
    ax.scatter([x] * len(ratios), ratios, s=12, alpha=0.5, color="tab:blue")
    ax.errorbar([x + 0.15], [mid], yerr=[[mid - lo], [hi - mid]], fmt="o", color="k", capsize=4)
    print(m, round(mid, 3), round(lo, 3), round(hi, 3))
ax.axhline(1.0, ls="--", color="grey", lw=0.8); ax.axhline(0.9, ls=":", color="red", lw=0.8)
ax.set_xticks([0, 1, 2], ["1", "8", "32"]); ax.set_xlabel("--max-num-seqs")
ax.set_ylabel("output tok/s, 4-bit / bf16 (per round)")
ax.set_title(f"HACK 4-bit vs bf16, side by side, {len(rounds)} rounds (goal >= 0.9)")
fig.tight_layout(); fig.savefig("docs/hack/paired-engine-tput.png", dpi=110)
