"""Policy `difficulty` (DUCHESS: easy prompts first) on scripted probe values: no engine."""
from vllm_ext.sched.difficulty import DifficultyPolicy
from vllm_ext.sched.policy import RequestView


def view(rid, arrival, priority=0):
    return RequestView(rid, arrival, 10, 0, 100, priority=priority)


def order(policy, views):
    return [v.request_id for v in sorted(views, key=policy.sort_key)]


def test_without_scores_the_order_is_fcfs():
    policy = DifficultyPolicy()
    views = [view("c", 3.0), view("a", 1.0), view("b", 2.0)]
    for v in views:
        policy.on_arrival(v.request_id, [ord(v.request_id)])
    policy.observe("a", {"bin0": 0.3}, 0)  # a length probe's values carry no score
    assert order(policy, views) == ["a", "b", "c"]


def test_easy_prompts_first_unscored_at_the_mean_priority_first():
    policy = DifficultyPolicy()
    prompts = {"hard": [1], "easy": [2], "new": [3], "mid": [4], "urgent": [5]}
    for rid, ids in prompts.items():
        policy.on_arrival(rid, ids)
    policy.observe("hard", {"p_correct": 0.1}, 0)
    policy.observe("easy", {"p_correct": 0.9}, 0)
    policy.observe("mid", {"p_correct": 0.6}, 0)
    views = [view("hard", 0.0), view("easy", 1.0), view("new", 2.0), view("mid", 3.0),
             view("urgent", 4.0, priority=-1)]
    # mean of seen scores = 0.533: "new" ranks between mid (0.6) and hard (0.1)
    assert order(policy, views) == ["urgent", "easy", "mid", "new", "hard"]


def test_branches_of_one_prompt_share_its_first_score():
    policy = DifficultyPolicy()
    for rid in ("q.b0", "q.b1", "q.b2"):
        policy.on_arrival(rid, [7, 8, 9])
    policy.on_arrival("other", [1, 2])
    assert not policy.rekey_waiting
    policy.observe("q.b0", {"p_correct": 0.8}, 0)           # the first branch's prefill row
    assert policy.rekey_waiting                              # the waiting siblings change rank
    policy.rekey_waiting = False
    policy.observe("q.b1", {"p_correct": 0.2}, 16)          # later rows do not move the prompt
    policy.observe("q.b0", {"p_correct": 0.1}, 32)
    assert not policy.rekey_waiting
    assert policy.prompt_ease(view("q.b2", 0.0)) == 0.8
    policy.observe("other", {"p_correct": 0.9}, 0)
    assert order(policy, [view("q.b2", 0.0), view("other", 1.0)]) == ["other", "q.b2"]


def test_a_prompts_score_lives_while_one_of_its_requests_does():
    policy = DifficultyPolicy()
    for rid in ("a", "b"):
        policy.on_arrival(rid, [4, 2])
    policy.on_arrival("a", [4, 2])                           # a replayed arrival counts once
    policy.observe("a", {"p_correct": 0.7}, 0)
    policy.forget("a")
    assert policy.prompt_ease(view("b", 0.0)) == 0.7        # b still runs: kept
    policy.forget("b")
    policy.forget("b")                                       # forgetting twice is harmless
    assert policy.prompt_of == {} and policy.requests_of == {} and policy.ease == {}
    assert policy.choose_victim(view("x", 0.0), [view("y", 1.0)]) is None  # never preempts


def test_engine_builds_it_and_workers_load_the_correctness_probe():
    from transformers import AutoConfig

    from vllm_ext.config import ExtConfig
    from vllm_ext.probes.base import resolve_probe_paths
    from vllm_ext.sched.build import build_policy
    from vllm_ext.testbed.model import default_model_path

    path = default_model_path()
    hf = AutoConfig.from_pretrained(path)
    ext = ExtConfig(policy="difficulty")
    assert ext.needs_probes()
    paths = resolve_probe_paths(ext, hf, path)
    assert len(paths) == 1 and "correctness-" in paths[0]
    both = resolve_probe_paths(ExtConfig(policy="trail", branches="duchess"), hf, path)
    assert sorted(p.rsplit("/", 1)[1].split("-")[0] for p in both) == ["correctness", "length"]

    class ModelConfig:
        hf_config, model = hf, path
    assert isinstance(build_policy(ext, ModelConfig), DifficultyPolicy)
