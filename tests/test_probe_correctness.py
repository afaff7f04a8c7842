"""DUCHESS correctness probe without an engine: `probes.collect.collect_branches` drives a
stand-in for vLLM's `LLM` whose steps go through the real ProbeWorker in capture mode
(`StepDriver`), the testbed checker labels the branches, and the layer sweep must find the one
informative layer (high AUROC on held-out prompts, ~0.5 on a noise layer). Also: the split is
by prompt (a row split leaks a prompt's label through its siblings), the AUROC matches
scikit-learn's, and the saved probe loads, outputs P(correct) and is bound to its model."""
import zlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from test_probe_worker import StepDriver, _cadence_worker
from vllm_ext.probes.base import ProbeModelMismatch, load_probe, save_probe
from vllm_ext.probes.collect import collect_branches
from vllm_ext.probes.correctness import (BranchDataset, auroc, correctness_tasks, probe_rows,
                                         split_by_prompt, train_correctness_probe, train_linear)
from vllm_ext.testbed.tasks import prompt_text

HIDDEN = 8
LAYERS = [0, 1, 2]  # 0: noise; 1: the branch's outcome (plus noise); 2: its position
PROMPT_LEN, BRANCHES, EVERY = 4, 4, 4


def _rng(*key) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32("/".join(map(str, key)).encode()))


class FakeLLM:
    """What `collect_branches` uses of `vllm.LLM`: branch seed s is correct when its hash is
    odd; layer 1 carries that outcome (+-1 in dim 0, unit noise), from the first row on."""

    monkeypatch, answers = None, {}

    def __init__(self, model, worker_cls, additional_config, **kwargs) -> None:
        assert worker_cls == "vllm_ext.worker.probe_worker.ProbeWorker"
        layers = additional_config["vllm_ext"]["capture_layers"]
        self.worker = _cadence_worker(every=8, capture_layers=layers, probe=False)
        self.worker.ext_buffers = {layer: torch.zeros(128, HIDDEN) for layer in layers}
        self.driver = StepDriver(self.monkeypatch, self.worker, self._hidden, budget=96)
        self.good: dict[str, bool] = {}
        self.n = 0

    def _hidden(self, layer: int, req_id: str, position: int) -> torch.Tensor:
        noise = torch.randn(HIDDEN, generator=_rng(req_id, position, layer))
        if layer == 1:
            noise[0] += 1.5 if self.good[req_id] else -1.5
        if layer == 2:
            noise[0] = float(position - (PROMPT_LEN - 1))  # = the row's step j
        return noise

    def generate(self, prompts, params, use_tqdm=False):
        done = []
        for prompt, p in zip(prompts, params):
            req_id = f"engine-{self.n}"  # engine ids are not the tags: collect maps by tag
            self.n += 1
            self.good[req_id] = zlib.crc32(str(p.seed).encode()) % 2 == 1
            n = min(p.max_tokens, 10 + p.seed % 23)
            self.driver.add(req_id, PROMPT_LEN, n, p.extra_args)
            text = f"work\nanswer: {self.answers[prompt] if self.good[req_id] else 'nope'}"
            assert p.logprobs == 0  # the sampled token's logprob only
            # a wrong branch sampled one unlikely token (step 3); every other token is likely
            lps = [-4.0 if (i == 3 and not self.good[req_id]) else -0.1 - 0.01 * (i % 5)
                   for i in range(n)]
            done.append(SimpleNamespace(outputs=[SimpleNamespace(
                token_ids=[0] * n, text=text, finish_reason="stop",
                logprobs=[{0: SimpleNamespace(logprob=lp)} for lp in lps])]))
        while self.driver.reqs:
            self.driver.run_step()
        self.driver.run_step()  # reports the last finished requests
        return done

    def collective_rpc(self, method):
        assert method == "ext_drain_capture"
        return [self.worker.ext_drain_capture()]


@pytest.fixture(scope="module")
def collected():
    import vllm

    tasks = correctness_tasks(60, seed=3)
    with pytest.MonkeyPatch.context() as mp:
        FakeLLM.monkeypatch = mp
        FakeLLM.answers = {prompt_text(t): t.answer for t in tasks}
        mp.setattr(vllm, "LLM", FakeLLM)
        data = collect_branches("fake", tasks, LAYERS, branches=BRANCHES, max_tokens=30,
                                batch=32, keep_every=EVERY, log=lambda *a: None)
    return tasks, data


def test_collection_keeps_rows_every_i_tokens_and_labels_with_the_checker(collected):
    tasks, data = collected
    assert len(data) == len(tasks) * BRANCHES
    assert sorted(set(data.prompt)) == list(range(len(tasks)))
    assert {t.kind for t in tasks} <= {"add", "sub", "mul", "gcd", "sort", "count"}
    assert {t.difficulty for t in tasks} <= {2, 3}
    for b in range(len(data)):
        n = data.output_len[b]
        np.testing.assert_array_equal(data.positions[b], np.arange(0, n, EVERY))
        # layer 2 encodes the step: row r of the kept rows is step positions[r]
        np.testing.assert_allclose(data.hidden[b][:, 2, 0].float().numpy(), data.positions[b])
        assert data.correct[b] == (data.meta[b]["got"] == tasks[data.prompt[b]].answer)
    assert 0.3 < np.mean(data.correct) < 0.7
    summary = data.summary()
    assert summary["branches"] == len(data) and summary["prompts_with_disagreeing_branches"] > 30


@pytest.fixture(scope="module")
def trained(collected):
    return train_correctness_probe(collected[1], "fp-test", every=EVERY, mlp_epochs=10,
                                   log=lambda *a: None)


def test_sweep_picks_the_informative_layer_and_holds_out_whole_prompts(trained):
    probe, report = trained
    assert report["best_layer"] == 1 and probe.layer == 1
    assert report["best_test"]["auroc"] > 0.9
    assert report["best_test"]["auroc_within_prompt"] > 0.85
    # here the outcome is in every row, the prefill row included; kind/difficulty say nothing
    assert report["best_test"]["auroc_prefill_score_held"] > 0.85
    assert abs(report["baseline_kind_difficulty_auroc"] - 0.5) < 0.2
    for arch in ("linear", "mlp"):
        assert abs(report["sweep"][arch][0]["test"]["auroc"] - 0.5) < 0.1
    # one bucket per probe round: [0, 4) holds only the end-of-prefill row
    buckets = report["best_test"]["by_position"]
    assert list(buckets)[:3] == ["0-4", "4-8", "8-12"]
    assert buckets["4-8"]["auroc"] > 0.85
    assert sum(report["split_prompts"].values()) == 60


def test_split_is_by_prompt():
    prompt = np.repeat(np.arange(50), 5)
    split = split_by_prompt(prompt, seed=1)
    sides = [set(prompt[s].tolist()) for s in (split.train, split.val, split.test)]
    assert not (sides[0] & sides[1]) and not (sides[0] & sides[2]) and not (sides[1] & sides[2])
    assert sum(map(len, sides)) == 50 and (len(sides[1]), len(sides[2])) == (10, 10)
    assert sorted(np.concatenate([split.train, split.val, split.test]).tolist()) == list(range(250))


def _leaky_dataset() -> BranchDataset:
    """Each prompt has its own random direction in the hidden state and one outcome for all of
    its branches: nothing generalises to a new prompt, but a sibling gives the label away."""
    rng = np.random.default_rng(0)
    data = BranchDataset([0])
    for p in range(60):
        code, good = rng.normal(size=96), bool(rng.integers(2))
        for b in range(4):
            rows = code + 0.1 * rng.normal(size=(5, 96))
            data.add(torch.tensor(rows, dtype=torch.float16)[:, None, :], np.arange(0, 80, 16),
                     good, p, 80)
    return data


def test_a_row_split_would_leak_what_the_prompt_split_holds_out():
    data = _leaky_dataset()
    split = split_by_prompt(data.prompt, seed=0)
    tr = probe_rows(data, np.concatenate([split.train, split.val]), 0, 16, prefill=False)
    te = probe_rows(data, split.test, 0, 16, prefill=False)
    held_out = auroc(train_linear(tr.x, tr.y, c=10.0)(te.x).detach().squeeze(-1).numpy(), te.y)
    branches = np.random.default_rng(0).permutation(len(data))  # split by branch instead
    tr = probe_rows(data, branches[:192], 0, 16, prefill=False)
    te = probe_rows(data, branches[192:], 0, 16, prefill=False)
    leaked = auroc(train_linear(tr.x, tr.y, c=10.0)(te.x).detach().squeeze(-1).numpy(), te.y)
    assert leaked > 0.95 and held_out < 0.8


def test_auroc_matches_sklearn_with_ties_and_is_nan_for_one_class():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(5)
    scores = rng.integers(0, 6, size=300).astype(float)  # many ties
    labels = rng.random(300) < 0.3 + 0.1 * scores
    assert auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert auroc([0.1, 0.9], [1, 0]) == 0.0 and auroc([0.1, 0.9], [0, 1]) == 1.0
    assert np.isnan(auroc([0.1, 0.2], [1, 1]))


def test_saved_probes_round_trip_output_p_correct_and_refuse_another_model(collected, trained,
                                                                          tmp_path):
    from vllm_ext.probes.base import Probe
    from vllm_ext.probes.correctness import train_mlp

    _, data = collected
    rows = probe_rows(data, range(len(data)), 1, EVERY)
    mlp = Probe("correctness", 1, ["p_correct"], train_mlp(rows.x, rows.y, epochs=3),
                "fp-test", "mlp", {"output": "sigmoid"})
    x = torch.cat([data.hidden[b][:, 1, :].float() for b in range(8)])
    for name, probe in (("sweep", trained[0]), ("mlp", mlp)):
        path = tmp_path / f"{name}.pt"
        save_probe(path, probe)
        loaded = load_probe(path, "fp-test")
        assert (loaded.kind, loaded.layer, loaded.output_names, loaded.arch) == (
            "correctness", 1, ["p_correct"], probe.arch)
        p = loaded(x)
        assert p.shape == (x.shape[0], 1) and bool(((p > 0) & (p < 1)).all())
        torch.testing.assert_close(p, probe.module(x).sigmoid())
        with pytest.raises(ProbeModelMismatch):
            load_probe(path, "another-model")
    assert trained[0].meta["every"] == EVERY and trained[0].meta["report"]["best_layer"] == 1


def test_worker_runs_a_correctness_probe_next_to_the_length_probe(trained, tmp_path):
    """Both kinds in one worker: the step's values carry the length bins and p_correct, so
    length consumers (which read bin*) are unaffected."""
    from test_probe_worker import _worker

    save_probe(tmp_path / "c.pt", trained[0])
    correctness = load_probe(tmp_path / "c.pt", "fp-test")
    correctness.layer = 0

    class Length:
        layer, output_names = 0, ["bin0", "bin1"]

        def __call__(self, hidden):
            return torch.stack([hidden[:, 0], hidden[:, 1]], dim=1)

    worker = _worker(Length())
    worker.ext_probes.append(correctness)
    rows = torch.randn(2, HIDDEN)
    worker.ext_pending = (["a", "b"], {0: rows})
    out = worker._attach(SimpleNamespace(sampled_token_ids=[[1], [2]]))
    assert set(out.probe_values["a"]) == {"bin0", "bin1", "p_correct"}
    assert out.probe_values["a"]["bin0"] == pytest.approx(float(rows[0, 0]))
    assert 0 < out.probe_values["b"]["p_correct"] < 1


def test_cli_trains_from_a_cached_dataset_and_binds_the_embedded_model(collected, tmp_path,
                                                                       model_path, capsys):
    from transformers import AutoConfig

    from vllm_ext.probes.base import model_fingerprint
    from vllm_ext.probes.cli import main

    _, data = collected
    data.save(tmp_path / "branches.pt")
    main(["--kind", "correctness", "--model", model_path, "--dataset",
          str(tmp_path / "branches.pt"), "--every", str(EVERY), "--arch", "linear",
          "--out", str(tmp_path)])
    fingerprint = model_fingerprint(AutoConfig.from_pretrained(model_path), model_path)
    path = tmp_path / f"correctness-{fingerprint}.pt"
    assert load_probe(path, fingerprint).layer == 1
    assert path.with_suffix(".report.json").exists()
    out = capsys.readouterr().out
    assert "| linear | 1 |" in out and "chosen: linear layer 1" in out
