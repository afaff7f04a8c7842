"""The shipped tiny MoE reasoner: loads in vLLM and HF transformers, they agree on greedy
tokens, and it solves easy tasks. Skipped only if the trained asset is absent.

bf16 kernels differ between vLLM's CPU path and transformers, so long generations may drift
where two logits are nearly tied; the check covers the first 16 tokens of 20 prompts.
"""
import pytest

from conftest import run_engine_job
from vllm_ext.testbed.model import ASSET_DIR

pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(not (ASSET_DIR / "config.json").exists(),
                                 reason="trained reasoner not shipped")]


@pytest.mark.parametrize("dtype, min_full_matches", [("float32", 20), ("bfloat16", 19)])
def test_vllm_and_hf_agree_on_first_16_greedy_tokens(dtype, min_full_matches):
    """Greedy tokens of vLLM (CPU) and HF transformers on 20 prompts, first 16 tokens.

    float32 on both sides (the bf16 weights upcast exactly): all 20 prompts agree, so the two
    implementations compute the same model. bfloat16 (how the model is served): vLLM's CPU
    kernels and transformers round differently, so a near-tie can flip; at least 19 of 20
    agree and any divergence must be such a tie: at the first differing position HF's logit
    for vLLM's token is within 0.25 of HF's own top logit (measured: 1 of 20 prompts diverges
    at token 12)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vllm_ext.testbed.tasks import generate_tasks, prompt_text

    tasks = generate_tasks(20, seed=4242)
    reqs = [{"id": f"t{i}", "prompt": prompt_text(t), "max_tokens": 16}
            for i, t in enumerate(tasks)]
    result = run_engine_job({"model": str(ASSET_DIR), "requests": reqs, "max_num_seqs": 20,
                             "llm_kwargs": {"dtype": dtype}})
    tok = AutoTokenizer.from_pretrained(ASSET_DIR)
    hf = AutoModelForCausalLM.from_pretrained(ASSET_DIR, dtype=getattr(torch, dtype)).eval()
    full_matches = 0
    for r in reqs:
        ids = torch.tensor([tok(r["prompt"]).input_ids])
        with torch.no_grad():
            out = hf.generate(ids, max_new_tokens=16, do_sample=False)
        ours, theirs = result["token_ids"][r["id"]], out[0, ids.shape[1]:].tolist()
        if ours == theirs:  # both stop at EOS (included) or after 16 tokens
            full_matches += 1
            continue
        k = next(i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b)
        prefix = torch.tensor([ids[0].tolist() + ours[:k]])
        with torch.no_grad():
            logits = hf(prefix).logits[0, -1].float()
        gap = (logits.max() - logits[ours[k]]).item()
        assert gap < 0.25, (r["prompt"], k, gap)
    assert full_matches >= min_full_matches, full_matches


SOLVE_EASY = """
from vllm import LLM
from vllm_ext.testbed.harness import solve
from vllm_ext.testbed.model import ASSET_DIR
from vllm_ext.testbed.tasks import generate_tasks
if __name__ == "__main__":
    llm = LLM(model=str(ASSET_DIR), dtype="bfloat16", enforce_eager=True, seed=0)
    attempts = solve(llm, generate_tasks(24, seed=99, difficulties=[1]))
    print("CORRECT", sum(a.correct for a in attempts), flush=True)
"""


def test_served_model_answers_easy_tasks(tmp_path):
    import subprocess
    import sys

    script = tmp_path / "solve_easy.py"
    script.write_text(SOLVE_EASY)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=600)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("CORRECT ")), None)
    assert line is not None, (proc.stdout + proc.stderr)[-3000:]
    # the README's table says 99% at difficulty 1 (160 tasks): 21 of 24 leaves room for 3 misses
    assert int(line.split()[1]) >= 21, line
