"""`build_policy`: the engine's policy object from its ExtConfig (`vllm_ext.sched.scheduler`).

TRAIL, spjf, HRRN and LAMPS read the length probe shipped for (or given with) the model; a
policy that needs it and finds none falls back as documented below, never failing the engine.
"""
from __future__ import annotations

from vllm.logger import init_logger

from vllm_ext.config import ExtConfig
from vllm_ext.sched.lamps import LampsPolicy
from vllm_ext.sched.policy import FcfsPolicy, Policy, make_policy

logger = init_logger(__name__)


def build_policy(ext: ExtConfig, model_config) -> Policy:
    """The policy object for this engine; a TRAIL (or HRRN) policy without a usable length
    probe falls back to FCFS with a warning (the engine keeps serving)."""
    common = dict(margin=ext.preemption_margin,
                  max_preemptions_per_request=ext.max_preemptions_per_request)
    if ext.policy == "difficulty":  # reads the correctness probe's values, loaded by workers
        from vllm_ext.sched.difficulty import DifficultyPolicy
        return DifficultyPolicy()
    if ext.policy not in ("trail", "spjf", "hrrn", "lamps"):
        return make_policy(ext.policy, **common)
    from vllm_ext.probes.base import load_probe, model_fingerprint, shipped_probe_path
    from vllm_ext.sched.trail import LengthBins, PromptModel, TrailPolicy

    try:
        fingerprint = model_fingerprint(model_config.hf_config, model_config.model)
        # spjf and hrrn need only the prompt model, but it ships in the length-probe file
        paths = list(ext.probe_paths) or [shipped_probe_path("length", fingerprint)]
        probes = [load_probe(p, fingerprint) for p in paths if p is not None]
        length = next(p for p in probes if p.kind == "length")
    except Exception as exc:
        if ext.policy == "lamps":  # ranks on max_tokens left instead of a prediction
            logger.warning("vllm-ext: lamps without a length probe (%s): remaining = "
                           "max_tokens left", str(exc) or "none found")
            return LampsPolicy(starvation_steps=ext.lamps_starvation_steps,
                               admission=ext.lamps_admission)
        logger.warning("vllm-ext: policy %s needs a length probe for this model (%s); "
                       "falling back to FCFS. Train one with `vllm-ext train-probe`.",
                       ext.policy, str(exc) or "no length probe found")
        return FcfsPolicy()
    prompt = length.meta.get("prompt_model")
    prompt_model = PromptModel(tuple(prompt["coef"]), prompt["buckets"]) if prompt else None
    bins = LengthBins(tuple(length.meta["bin_edges"]))
    if ext.policy == "hrrn":  # HRRN on spjf's estimate: prompt-only, counted down per token
        from vllm_ext.sched.hrrn import HrrnPolicy

        return HrrnPolicy(estimator=TrailPolicy(bins=bins, prompt_model=prompt_model,
                                                refine=False, tail_factor=0.0))
    trail = TrailPolicy(bins=bins, prompt_model=prompt_model,
                        preempt_fraction=ext.trail_preempt_fraction,
                        smoothing=ext.trail_smoothing, refine=ext.policy in ("trail", "lamps"),
                        tail_factor=ext.trail_tail_factor, **common)
    if ext.policy == "lamps":
        return LampsPolicy(lengths=trail, starvation_steps=ext.lamps_starvation_steps,
                           admission=ext.lamps_admission, preempt=ext.lamps_preempt)
    return trail
