#!/usr/bin/env python
"""Train the embedded tiny MoE "reasoner" from scratch on the synthetic task suite (CPU).

The model is ``--arch mixtral`` (hidden 128, 4 layers, 8 experts top-2; the default reasoner) or
``--arch qwen2_moe`` (fine-grained: 32 experts top-4 + a shared expert), built by
``vllm_ext.testbed.arch`` with the family's router aux loss coefficient (0.001). The
data is drawn on the fly from ``vllm_ext.testbed.tasks`` (deterministic per seed and step, so a
resumed run sees the same batches). The loss covers only the assistant text: the prompt and
the tool ``<result>...</result>`` spans are masked. A small router aux loss keeps the gate
from collapsing while leaving expert load uneven.

The schedule (warmup + cosine) runs on ``progress = max(step / --steps, elapsed / --minutes)``,
so a time-budgeted run still anneals properly when the CPU is shared. A checkpoint is written
to ``--out`` every few minutes (``--resume`` continues from it). At the end the model is saved
in bf16 safetensors with the tokenizer into ``vllm_ext/assets/tiny-moe-reasoner`` (or
``tiny-moe-finegrained`` for ``--arch qwen2_moe``).

    python scripts/train_reasoner.py --minutes 40
    python scripts/train_reasoner.py --minutes 60 --resume   # continue, larger budget
    python scripts/train_reasoner.py --arch qwen2_moe --minutes 48 --threads 1   # tiny-moe-finegrained
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# On a shared 2-core machine, spinning OpenMP threads lose most of their time waiting for a
# preempted sibling (measured: 2 threads 1.1k tok/s active vs 4.8k tok/s passive under load).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402
from transformers import LogitsProcessor, LogitsProcessorList  # noqa: E402

from vllm_ext.testbed import tasks as T  # noqa: E402
from vllm_ext.testbed.arch import ARCHS, FINEGRAINED_NAME, model_class, tiny_config  # noqa: E402
from vllm_ext.testbed.model import ASSET_DIR  # noqa: E402
from vllm_ext.testbed.tokenizer import build_tokenizer  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="/tmp/tiny-moe-reasoner-train", help="checkpoint/log folder")
    p.add_argument("--arch", choices=ARCHS, default="mixtral",
                   help="mixtral: the default reasoner (8 experts top-2); qwen2_moe: the fine-grained one "
                        "(32 experts top-4 + 1 shared expert), see vllm_ext/testbed/arch.py")
    p.add_argument("--asset-dir", default=None, help="where the final model is saved "
                   "(default: assets/tiny-moe-reasoner, or assets/tiny-moe-finegrained for qwen2_moe)")
    p.add_argument("--minutes", type=float, default=40.0, help="training time budget (total, incl. resumed)")
    p.add_argument("--steps", type=int, default=0, help="max optimizer steps (0: time budget only)")
    p.add_argument("--resume", nargs="?", const="auto", default=None, help="resume from --out/ckpt.pt or a path")
    p.add_argument("--init-from", default=None,
                   help="start from this model folder's weights (fine-tune, e.g. with a larger --aux-coef)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--min-lr-frac", type=float, default=0.05)
    p.add_argument("--warmup", type=int, default=60, help="warmup steps")
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--batch-tokens", type=int, default=4096, help="tokens per batch incl. padding")
    p.add_argument("--max-len", type=int, default=400, help="drop longer examples (tokens)")
    p.add_argument("--difficulty-mix", default="1:4,2:2,3:1", help="difficulty:weight,...")
    p.add_argument("--kind-mix", default="", help="kind:weight,... (default: uniform)")
    p.add_argument("--aux-coef", type=float, default=None,
                   help="router load-balancing loss coefficient (default: the family's, 0.001 for both)")
    p.add_argument("--router-jitter", type=float, default=0.0,
                   help="router jitter noise (Switch/Mixtral): multiplicative input noise in training")
    p.add_argument("--experts-impl", default="grouped_mm", help="transformers experts implementation")
    p.add_argument("--eval-every-min", type=float, default=5.0)
    p.add_argument("--eval-per-kind", type=int, default=6, help="held-out difficulty-1 tasks per kind")
    p.add_argument("--final-eval-per-cell", type=int, default=10, help="per kind x difficulty at the end")
    p.add_argument("--ckpt-every-min", type=float, default=3.0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-save", action="store_true", help="skip the final save into --asset-dir")
    args = p.parse_args(argv)
    if args.asset_dir is None:
        args.asset_dir = str(ASSET_DIR if args.arch == "mixtral" else ASSET_DIR.parent / FINEGRAINED_NAME)
    return args


def parse_mix(spec: str, cast=str) -> list:
    out = []
    for part in filter(None, spec.split(",")):
        key, _, w = part.partition(":")
        out += [cast(key)] * int(w or 1)
    return out


EVAL_SEED = 987_654_321


# ----------------------------------------------------------------------------- data

def encode(task: T.Task, tok) -> tuple[list[int], list[int]]:
    ids, labels = [], []
    for text, trained in T.training_segments(task):
        seg = tok.encode(text, add_special_tokens=False)
        ids += seg
        labels += seg if trained else [-100] * len(seg)
    return ids, labels


def batches(args, tok, start_pool: int, start_batch: int, held_out: set[str]):
    """Yield (pool, index, input_ids, labels); deterministic for (seed, pool)."""
    diffs = parse_mix(args.difficulty_mix, int)
    kinds = parse_mix(args.kind_mix) or list(T.KINDS)
    pool = start_pool
    while True:
        rng = random.Random(args.seed * 1_000_003 + pool)
        tasks = T.generate_tasks(64 * 24, seed=rng.randrange(2**62), kinds=kinds, difficulties=diffs)
        enc = [encode(t, tok) for t in tasks if t.prompt not in held_out]
        enc = sorted((e for e in enc if len(e[0]) <= args.max_len), key=lambda e: len(e[0]))
        groups, cur = [], []
        for e in enc:  # length-bucketed, fixed token budget per batch
            if cur and (len(cur) + 1) * len(e[0]) > args.batch_tokens:
                groups.append(cur)
                cur = []
            cur.append(e)
        groups.append(cur)
        rng.shuffle(groups)
        for i, g in enumerate(groups):
            if pool == start_pool and i < start_batch:
                continue
            width = max(len(e[0]) for e in g)
            ids = torch.full((len(g), width), tok.pad_token_id, dtype=torch.long)
            lab = torch.full((len(g), width), -100, dtype=torch.long)
            for r, (x, y) in enumerate(g):
                ids[r, : len(x)] = torch.tensor(x)
                lab[r, : len(y)] = torch.tensor(y)
            yield pool, i + 1, ids, lab
        pool += 1


# ----------------------------------------------------------------------------- eval

class ToolForcer(LogitsProcessor):
    """Greedy-decoding harness: after ``</call>`` force the tool's ``<result>...</result>`` tokens."""

    def __init__(self, tok, prompt_len: int):
        self.tok, self.prompt_len, self.queue = tok, prompt_len, {}
        self.close_id = tok.convert_tokens_to_ids(T.CALL_CLOSE)

    def __call__(self, input_ids, scores):
        for r in range(input_ids.shape[0]):
            q = self.queue.get(r)
            if not q and int(input_ids[r, -1]) == self.close_id:
                call = T.pending_call(self.tok.decode(input_ids[r, self.prompt_len:]))
                res = T.RESULT_OPEN + T.run_tool(call) + T.RESULT_CLOSE if call else ""
                q = self.queue[r] = self.tok.encode(res, add_special_tokens=False)
            if q:
                forced = q.pop(0)
                scores[r].fill_(-float("inf"))
                scores[r, forced] = 0.0
        return scores


@torch.no_grad()
def generate(model, tok, tasks: list[T.Task], batch_size: int = 48) -> list[str]:
    model.eval()
    tok.padding_side = "left"
    outs = []
    for i in range(0, len(tasks), batch_size):
        chunk = tasks[i : i + batch_size]
        enc = tok([T.prompt_text(t) for t in chunk], return_tensors="pt", padding=True, add_special_tokens=False)
        width = enc["input_ids"].shape[1]
        max_new = 24 + max(len(tok.encode(t.target, add_special_tokens=False)) for t in chunk) * 5 // 4
        gen = model.generate(
            **enc, max_new_tokens=max_new, do_sample=False, eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id, logits_processor=LogitsProcessorList([ToolForcer(tok, width)]),
            output_router_logits=False,
        )
        outs += tok.batch_decode(gen[:, width:], skip_special_tokens=False)
    model.train()
    return [o.split(T.EOS)[0].replace(tok.pad_token, "") for o in outs]


def evaluate(model, tok, tasks: list[T.Task]) -> tuple[float, dict]:
    outs = generate(model, tok, tasks)
    cells: dict = {}
    for t, o in zip(tasks, outs):
        cells.setdefault((t.kind, t.difficulty), []).append(T.check_answer(t, o))
    acc = sum(sum(v) for v in cells.values()) / max(1, len(tasks))
    return acc, {k: sum(v) / len(v) for k, v in sorted(cells.items())}


def eval_tasks(per_cell: int, difficulties) -> list[T.Task]:
    rng = random.Random(EVAL_SEED)
    return [T.make_task(k, d, rng) for d in difficulties for k in T.KINDS for _ in range(per_cell)]


def fmt_cells(cells: dict) -> str:
    return " ".join(f"{k}/{d}={a:.2f}" for (k, d), a in cells.items())


# ----------------------------------------------------------------------------- main

def lr_at(args, step: int, progress: float) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    cos = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return args.lr * (args.min_lr_frac + (1 - args.min_lr_frac) * cos)


def build_model(args, vocab: int):
    cfg = tiny_config(args.arch, vocab, aux_coef=args.aux_coef, router_jitter=args.router_jitter,
                      output_router_logits=True)
    args.aux_coef = cfg.router_aux_loss_coef
    torch.manual_seed(args.seed)
    model = model_class(args.arch)(cfg).float()
    try:
        model.set_experts_implementation(args.experts_impl)
    except Exception as e:  # older transformers / unsupported: fall back to the eager loop
        print(f"experts implementation {args.experts_impl!r} unavailable ({e}); using eager", flush=True)
    return model


def save_checkpoint(path: Path, model, opt, state: dict):
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), **state}, tmp)
    os.replace(tmp, path)


def save_final(model, tok, asset_dir: Path, meta: dict):
    """Write bf16 safetensors + tokenizer atomically into ``asset_dir``; return the bf16 model."""
    bf = type(model)(model.config)
    bf.load_state_dict(model.state_dict())
    bf = bf.to(torch.bfloat16).eval()
    bf.config.output_router_logits = False
    bf.config.dtype = torch.bfloat16
    tmp = asset_dir.with_name(asset_dir.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    bf.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    (tmp / "train_meta.json").write_text(json.dumps(meta, indent=1))
    if asset_dir.exists():
        shutil.rmtree(asset_dir)
    os.replace(tmp, asset_dir)
    size = sum(f.stat().st_size for f in asset_dir.iterdir())
    print(f"saved {asset_dir} ({size / 2**20:.1f} MiB)", flush=True)
    assert size <= 25 * 2**20, "asset over 25 MB"
    return bf


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / "ckpt.pt" if args.resume in (None, "auto") else Path(args.resume)
    tok = build_tokenizer()
    model = build_model(args, len(tok))
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.98), eps=1e-8)
    state = {"step": 0, "elapsed": 0.0, "pool": 0, "batch": 0, "tokens": 0, "history": []}
    if args.resume and ckpt_path.exists():
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        model.load_state_dict(ck.pop("model"))
        opt.load_state_dict(ck.pop("opt"))
        state.update({k: ck[k] for k in state if k in ck})
        print(f"resumed from {ckpt_path} at step {state['step']} ({state['elapsed'] / 60:.1f} min)", flush=True)
    elif args.resume:
        print(f"no checkpoint at {ckpt_path}; starting fresh", flush=True)
    if args.init_from and not (args.resume and ckpt_path.exists()):
        init = model_class(args.arch).from_pretrained(args.init_from, dtype=torch.float32)
        model.load_state_dict(init.state_dict())
        print(f"initialised from {args.init_from}", flush=True)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M params, config {model.config.to_diff_dict()}", flush=True)
    print(f"args: {vars(args)}", flush=True)

    quick_eval = eval_tasks(args.eval_per_kind, [1])
    held_out = {t.prompt for t in eval_tasks(args.final_eval_per_cell, T.DIFFICULTIES)} | {t.prompt for t in quick_eval}
    budget = args.minutes * 60
    data = batches(args, tok, state["pool"], state["batch"], held_out)
    model.train()
    t0, base_elapsed = time.time(), state["elapsed"]
    last_eval = last_ckpt = time.time()
    ema = None
    bar = tqdm(total=args.steps or None, initial=state["step"], unit="step", dynamic_ncols=True,
               mininterval=1 if sys.stderr.isatty() else 30, file=sys.stderr)

    def progress():
        elapsed = base_elapsed + time.time() - t0
        return max(state["step"] / args.steps if args.steps else 0.0, elapsed / budget), elapsed

    while True:
        prog, elapsed = progress()
        if prog >= 1.0:
            break
        pool, bidx, ids, labels = next(data)
        lr = lr_at(args, state["step"], prog)
        for g in opt.param_groups:
            g["lr"] = lr
        outputs = model(input_ids=ids, labels=labels)
        outputs.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        aux = float(outputs.aux_loss.detach()) if outputs.aux_loss is not None else 0.0
        ce = float(outputs.loss.detach()) - args.aux_coef * aux
        ema = ce if ema is None else 0.98 * ema + 0.02 * ce
        state.update(step=state["step"] + 1, pool=pool, batch=bidx, tokens=state["tokens"] + ids.numel())
        bar.update(1)
        bar.set_postfix(loss=f"{ema:.3f}", lr=f"{lr:.1e}", prog=f"{prog:.2f}")
        if state["step"] % 50 == 0:
            tqdm.write(f"step {state['step']} loss {ce:.4f} ema {ema:.4f} aux {aux:.3f} lr {lr:.2e} "
                       f"tok {state['tokens'] / 1e6:.2f}M elapsed {elapsed / 60:.1f}m", file=sys.stderr)
        now = time.time()
        if now - last_eval >= args.eval_every_min * 60:
            acc, cells = evaluate(model, tok, quick_eval)
            state["history"].append({"step": state["step"], "loss": ema, "acc_d1": acc})
            tqdm.write(f"eval step {state['step']} d1 acc {acc:.3f} | {fmt_cells(cells)}", file=sys.stderr)
            last_eval = time.time()
            t0 += last_eval - now  # evaluation time does not count against the training budget
        if now - last_ckpt >= args.ckpt_every_min * 60:
            state["elapsed"] = progress()[1]
            save_checkpoint(out / "ckpt.pt", model, opt, state)
            last_ckpt = time.time()
    bar.close()
    state["elapsed"] = progress()[1]
    save_checkpoint(out / "ckpt.pt", model, opt, state)
    print(f"done: {state['step']} steps, {state['tokens'] / 1e6:.2f}M tokens, {state['elapsed'] / 60:.1f} min, "
          f"loss ema {ema}", flush=True)

    final = eval_tasks(args.final_eval_per_cell, T.DIFFICULTIES)
    meta = {"steps": state["step"], "tokens": state["tokens"], "minutes": state["elapsed"] / 60,
            "loss_ema": ema, "args": vars(args), "history": state["history"]}
    if not args.no_save:
        model = save_final(model, tok, Path(args.asset_dir), meta)
    acc, cells = evaluate(model, tok, final)
    by_d = {d: sum(a for (k, dd), a in cells.items() if dd == d) / len(T.KINDS) for d in T.DIFFICULTIES}
    print(f"final eval ({'bf16' if not args.no_save else 'fp32'}): all {acc:.3f} "
          + " ".join(f"d{d} {a:.3f}" for d, a in by_d.items()) + f"\n{fmt_cells(cells)}", flush=True)
    if not args.no_save:
        meta["final_eval"] = {"all": acc, **{f"d{d}": a for d, a in by_d.items()},
                              "cells": {f"{k}/{d}": a for (k, d), a in cells.items()}}
        (Path(args.asset_dir) / "train_meta.json").write_text(json.dumps(meta, indent=1))


if __name__ == "__main__":
    main()
