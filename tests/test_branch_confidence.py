"""Token confidence in DUCHESS's branch score: the running tracker, the combiner and its fit."""
import math

import numpy as np
import pytest

from test_probe_correctness import EVERY, collected, trained  # noqa: F401 (fixtures)
from vllm_ext.branches.confidence import WINDOW, Combiner, Confidence, confidence_of
from vllm_ext.probes.confidence import fit_confidence


def test_tracker_fed_in_pieces_equals_the_batch_features():
    lps = np.random.default_rng(0).normal(-1.0, 0.8, size=40)
    whole = confidence_of(lps, 40)
    pieces = Confidence()
    for start in range(0, 40, 7):  # outputs arrive in deltas of any size
        pieces.add(lps[start:start + 7])
    assert pieces.features(0.5, 0.2) == pytest.approx(whole.features(0.5, 0.2))
    assert whole.lowest == pytest.approx(lps.min())
    assert whole.total / whole.count == pytest.approx(lps.mean())
    windows = np.convolve(lps, np.ones(WINDOW) / WINDOW, mode="valid")
    assert whole.lowest_window == pytest.approx(windows.min())
    feats = whole.features(0.5, 0.2)
    assert feats["probe_logit"] == pytest.approx(0.0)
    assert feats["prefill_logit"] == pytest.approx(math.log(0.2 / 0.8))
    assert feats["log_tokens"] == pytest.approx(math.log(40))


def test_short_branches_use_the_mean_so_far_and_copies_are_independent():
    conf = confidence_of([-1.0, -3.0], 2)
    assert conf.lowest_window == pytest.approx(-2.0) and conf.lowest == -3.0
    fork = conf.copy()
    fork.add([-9.0])
    assert conf.count == 2 and conf.lowest == -3.0 and fork.lowest == -9.0


def test_combiner_scores_round_trip_and_refuse_unknown_features():
    comb = Combiner(0.5, {"probe_logit": 1.0, "prefill_logit": 2.0, "min_logprob": 0.8})
    conf = confidence_of([-0.1, -2.0, -0.3], 3)
    z = 0.5 + math.log(0.7 / 0.3) + 2.0 * math.log(0.4 / 0.6) + 0.8 * -2.0
    assert comb.score(0.7, 0.4, conf) == pytest.approx(1 / (1 + math.exp(-z)))
    assert comb.score(None, 0.4, conf) is None  # no probe value: no score, plan continues
    z_missing = 0.5 + 3.0 * math.log(0.7 / 0.3) + 0.8 * -2.0  # the latest stands in
    assert comb.score(0.7, None, conf) == pytest.approx(1 / (1 + math.exp(-z_missing)))
    again = Combiner.from_meta(comb.to_meta())
    assert again.score(0.7, 0.4, conf) == pytest.approx(comb.score(0.7, 0.4, conf))
    assert Combiner.from_meta(None) is None
    with pytest.raises(ValueError, match="unknown features"):
        Combiner.from_meta({"bias": 0.0, "weights": {"entropy": 1.0}})


def test_fit_ranks_branches_within_a_prompt_where_only_a_token_flags_them(collected, trained):
    _, data = collected
    probe, _ = trained
    assert len(data.logprobs) == len(data)
    comb, report = fit_confidence(data, probe, every=EVERY, log=lambda *a: None)
    test = report["test"]
    # the collected wrong branches sampled one unlikely token at step 3: confidence alone
    # separates them within every prompt from the first round on
    assert test["confidence"]["auroc_within_prompt"] > 0.95
    assert test["combined"]["auroc"] >= test["probe"]["auroc"] - 0.02
    assert comb.weights["min_logprob"] > 0
    old = type(data)(data.layers, data.hidden, data.positions, data.correct, data.prompt,
                     data.output_len, data.meta)  # a dataset from before logprobs were kept
    assert fit_confidence(old, probe, every=EVERY)[0] is None


class FakeClient:
    """An engine client for the branch runner: branch i samples `lps[i]` (one token per
    output, the last one says the answer) and the probe reads `p_probe` for every branch."""

    def __init__(self, lps: dict[int, list[float]], p_probe: float, meta: dict | None) -> None:
        self.lps, self.p_probe, self.meta = lps, p_probe, meta
        self.params: dict[int, object] = {}
        self.tags: dict[int, str] = {}

    async def generate(self, prompt, params, request_id, **kwargs):
        import asyncio

        from vllm.logprobs import Logprob
        from vllm.outputs import CompletionOutput, RequestOutput

        index = int(request_id.rsplit("-b", 1)[1])
        self.params[index], self.tags[index] = params, params.extra_args["ext_tag"]
        lps = self.lps[index]
        for k, lp in enumerate(lps):
            last = k == len(lps) - 1
            piece = CompletionOutput(index=0, text=" answer: 7" if last else "x",
                                     token_ids=[k], cumulative_logprob=None,
                                     logprobs=[{k: Logprob(lp)}] if params.logprobs == 0
                                     else None, finish_reason="stop" if last else None)
            yield RequestOutput(request_id, prompt.get("prompt"), prompt["prompt_token_ids"], None,
                                [piece], finished=last)
            await asyncio.sleep(0)

    async def collective_rpc(self, method, args=()):
        if method == "ext_probe_meta":
            return [self.meta]
        assert method == "ext_get_predictions"
        return [{i: {"tag": tag, "values": {"p_correct": self.p_probe},
                     "first": {"p_correct": self.p_probe}}
                 for i, tag in self.tags.items() if tag.startswith(args[2])}]


def _run_duchess(client):
    import asyncio

    from vllm import SamplingParams

    from vllm_ext.branches.runner import BranchRunner
    from vllm_ext.config import ExtConfig

    ext = ExtConfig.from_dict({"branches": "duchess", "branch_every": 4, "branch_start": 2,
                               "branch_agree": 1})
    runner = BranchRunner(client, ext)
    params = SamplingParams(n=2, max_tokens=64, temperature=1.0,
                            extra_args={"ext_tag": "req"})

    async def go():
        outs = [o async for o in runner.generate({"prompt": "p", "prompt_token_ids": [1, 2]},
                                                 params, "r")]
        return outs, runner.take_stats("req")

    return asyncio.run(go())


def test_runner_terminates_the_branch_whose_tokens_lost_confidence():
    # branch 0 sampled a p = e^-6 token at step 2; branch 1 only likely tokens; the probe
    # can't tell them apart (0.5 for both), so only the combiner can terminate branch 0
    lps = {0: [-0.05, -0.05, -6.0] + [-0.05] * 30, 1: [-0.05] * 24}
    meta = {"bias": 0.0, "weights": {"probe_logit": 1.0, "min_logprob": 1.0}}
    client = FakeClient(lps, 0.5, {"confidence": meta})
    outs, stats = _run_duchess(client)
    assert all(p.logprobs == 0 for p in client.params.values())  # asked for confidence
    assert stats["terminated"] == 1 and stats["answer"] == "7" and stats["finished"] == 1
    assert outs[-1].outputs[0].logprobs is None  # the client did not ask for logprobs
    assert outs[-1].outputs[0].token_ids == list(range(24))  # branch 1's tokens

    plain = FakeClient(lps, 0.5, {})  # a probe without a combiner: its value is the score
    _, stats = _run_duchess(plain)
    assert stats["terminated"] == 0 and stats["cancelled"] == 1  # stopped at the answer


def test_prediction_store_keeps_the_first_values_beside_the_latest():
    from vllm_ext.worker.channel import PredictionStore

    store = PredictionStore()
    store.start("r1", {"ext_tag": "req.b0"})
    store.record("r1", {"p_correct": 0.3})  # the end of prefill
    store.record("r1", {"p_correct": 0.8})
    entry = store.query(tag_prefix="req.b")["r1"]
    assert entry["first"] == {"p_correct": 0.3} and entry["values"] == {"p_correct": 0.8}
