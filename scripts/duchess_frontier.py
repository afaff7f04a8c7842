"""DUCHESS token-accuracy frontier on the live server (issue 16): one server, one run.

Every held-out testbed prompt is sent once per config (self-consistency n = 1/4/8/16, ESC,
DUCHESS at several tau) to one `vllm-ext serve --ext-branches duchess`, the (prompt, config)
jobs shuffled and run `--concurrency` at a time. All configs of a prompt share the request
seed, so branch i samples the same tokens in every config until a plan acts on it (common
random numbers: the paired differences below have less noise). Per config: accuracy, mean
tokens generated per prompt (all branches, `usage.completion_tokens`), and against the
reference config (default sc8) the token ratio and the accuracy difference with 95% bootstrap
CIs over prompts. Writes frontier.json, frontier.md, frontier.png and requests.jsonl to --out.

  .venv/bin/python scripts/duchess_frontier.py --num-prompts 150 --out docs/duchess/frontier
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from pathlib import Path

import httpx
import numpy as np

CONFIGS = {  # name -> (n, vllm_xargs)
    "sc1": (1, {"ext_branches": "sc"}),
    "sc4": (4, {"ext_branches": "sc"}),
    "sc8": (8, {"ext_branches": "sc"}),
    "sc16": (16, {"ext_branches": "sc"}),
    "esc8": (8, {"ext_branches": "esc", "ext_branch_esc_window": 4}),
    "esc16": (16, {"ext_branches": "esc", "ext_branch_esc_window": 4}),
    "duchess-t0.15": (8, {"ext_branches": "duchess", "ext_branch_tau": 0.15}),
    "duchess-t0.25": (8, {"ext_branches": "duchess", "ext_branch_tau": 0.25}),
    "duchess-t0.35": (8, {"ext_branches": "duchess", "ext_branch_tau": 0.35}),
    "duchess-all8": (8, {"ext_branches": "duchess", "ext_branch_start": 0}),
}


async def run_job(client, url, model, task, index, name, args):
    from vllm_ext.testbed.tasks import check_answer, prompt_text

    n, xargs = CONFIGS[name]
    body = {"model": model, "prompt": prompt_text(task), "max_tokens": args.max_tokens,
            "temperature": args.temperature, "n": n, "seed": 1000 * index, "vllm_xargs": xargs}
    start = time.perf_counter()
    resp = await client.post(url + "/v1/completions", json=body, timeout=600)
    resp.raise_for_status()
    data = resp.json()
    stats = data["vllm_ext"]["branches"]
    return {"config": name, "prompt": index, "kind": task.kind, "difficulty": task.difficulty,
            "correct": check_answer(task, data["choices"][0]["text"]),
            "tokens": data["usage"]["completion_tokens"], "seconds": time.perf_counter() - start,
            "branches": stats}


async def run_all(url, model, tasks, names, args):
    jobs = [(i, name) for i in range(len(tasks)) for name in names]
    random.Random(args.seed).shuffle(jobs)
    gate = asyncio.Semaphore(args.concurrency)
    records, done = [], 0

    async with httpx.AsyncClient() as client:
        async def one(i, name):
            nonlocal done
            async with gate:
                rec = await run_job(client, url, model, tasks[i], i, name, args)
            records.append(rec)
            done += 1
            if done % 50 == 0:
                print(f"{done}/{len(jobs)} jobs", flush=True)
        await asyncio.gather(*(one(i, name) for i, name in jobs))
    return records


def bootstrap(values: np.ndarray, stat, reps: int = 2000, seed: int = 0):
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(values), size=(reps, len(values)))
    boots = np.array([stat(values[row]) for row in idx])
    return float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))


def summarise(records, names, reference):
    prompts = sorted({r["prompt"] for r in records})
    table = {name: {r["prompt"]: r for r in records if r["config"] == name} for name in names}
    ref = table[reference]
    rows = []
    for name in names:
        acc = np.array([table[name][p]["correct"] for p in prompts], dtype=float)
        tok = np.array([table[name][p]["tokens"] for p in prompts], dtype=float)
        ref_acc = np.array([ref[p]["correct"] for p in prompts], dtype=float)
        ref_tok = np.array([ref[p]["tokens"] for p in prompts], dtype=float)
        pairs = np.stack([acc, tok, ref_acc, ref_tok], axis=1)
        ratio = tok.sum() / ref_tok.sum()
        rows.append({
            "config": name, "accuracy": float(acc.mean()),
            "accuracy_ci": bootstrap(acc, np.mean),
            "tokens_per_prompt": float(tok.mean()), "token_ratio": float(ratio),
            "token_ratio_ci": bootstrap(pairs, lambda x: x[:, 1].sum() / x[:, 3].sum()),
            "accuracy_diff": float(acc.mean() - ref_acc.mean()),
            "accuracy_diff_ci": bootstrap(pairs, lambda x: x[:, 0].mean() - x[:, 2].mean()),
            "terminated": int(sum(table[name][p]["branches"]["terminated"] for p in prompts)),
            "duplicated": int(sum(table[name][p]["branches"]["duplicated"] for p in prompts)),
            "branches_run": float(np.mean([table[name][p]["branches"]["branches_run"]
                                           for p in prompts])),
            "mean_seconds": float(np.mean([table[name][p]["seconds"] for p in prompts]))})
    return rows


def markdown(rows, reference, n_prompts) -> str:
    lines = [f"{n_prompts} held-out prompts; ratios and differences vs {reference}, "
             "95% bootstrap CIs over prompts.", "",
             "| config | accuracy | tokens / prompt | token ratio | accuracy diff (pt) | "
             "branches run | terminated | forks | mean s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lo, hi = r["accuracy_ci"]
        rlo, rhi = r["token_ratio_ci"]
        dlo, dhi = r["accuracy_diff_ci"]
        lines.append(
            f"| {r['config']} | {r['accuracy']:.3f} [{lo:.3f}, {hi:.3f}] | "
            f"{r['tokens_per_prompt']:.0f} | {r['token_ratio']:.2f}x [{rlo:.2f}, {rhi:.2f}] | "
            f"{100 * r['accuracy_diff']:+.1f} [{100 * dlo:+.1f}, {100 * dhi:+.1f}] | "
            f"{r['branches_run']:.1f} | {r['terminated']} | {r['duplicated']} | "
            f"{r['mean_seconds']:.2f} |")
    return "\n".join(lines) + "\n"


def plot(rows, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for r in rows:
        family = r["config"].split("-")[0].rstrip("0123456789")
        marker = {"sc": "o", "esc": "s", "duchess": "^"}[family]
        lo, hi = r["accuracy_ci"]
        ax.errorbar(r["tokens_per_prompt"], r["accuracy"],
                    yerr=[[r["accuracy"] - lo], [hi - r["accuracy"]]], fmt=marker, capsize=3)
        ax.annotate(r["config"], (r["tokens_per_prompt"], r["accuracy"]), fontsize=7,
                    xytext=(4, 4), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("tokens generated per prompt (all branches)")
    ax.set_ylabel("accuracy (95% CI)")
    ax.set_title("Token-accuracy frontier, embedded reasoner, held-out prompts")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-prompts", type=int, default=150)
    p.add_argument("--prompt-seed", type=int, default=7, help="held out: training used seed 0")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--reference", default="sc8")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=400)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--server-flags", default="--enforce-eager --max-model-len 1024 "
                   "--max-num-seqs 64 --ext-branches duchess --ext-probe-every 4")
    p.add_argument("--url", help="an already running server (its flags are then its own)")
    p.add_argument("--out", type=Path, default=Path("docs/duchess/frontier"))
    args = p.parse_args()

    from vllm_ext.bench.servers import running_server
    from vllm_ext.probes.correctness import correctness_tasks
    from vllm_ext.testbed.model import default_model_path

    names = args.configs.split(",")
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        p.error(f"--configs: unknown {unknown}; known: {', '.join(CONFIGS)}")
    tasks = correctness_tasks(args.num_prompts, seed=args.prompt_seed)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    if args.url:
        records = asyncio.run(run_all(args.url, "tiny-moe-reasoner", tasks, names, args))
    else:
        with running_server("ext", default_model_path(), args.server_flags,
                            args.out / "server.log") as server:
            records = asyncio.run(run_all(server.url, "bench", tasks, names, args))
    with open(args.out / "requests.jsonl", "w") as f:
        for rec in sorted(records, key=lambda r: (r["prompt"], r["config"])):
            f.write(json.dumps(rec) + "\n")
    rows = summarise(records, names, args.reference)
    meta = {"command": "scripts/duchess_frontier.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None),
        "wall_s": round(time.time() - start, 1), "prompts": len(tasks)}
    (args.out / "frontier.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    table = markdown(rows, args.reference, len(tasks))
    (args.out / "frontier.md").write_text(table)
    plot(rows, args.out / "frontier.png")
    print(table)
    print(f"wall {meta['wall_s']} s")


if __name__ == "__main__":
    main()
