"""Branch plans (DUCHESS, self-consistency, ESC) on scripted probe scores: no engine."""
import re

import pytest

from vllm_ext.branches.rules import (CANCELLED, FINISHED, RUNNING, TERMINATED, Duchess,
                                     EarlyStopping, SelfConsistency, extract_answer, make_plan)
from vllm_ext.config import ExtConfig, ExtConfigError

ANSWER = re.compile(ExtConfig().branch_answer_regex)


def duchess(n=4, tau=0.3, patience=2, dup_tau=0.9, max_branches=8, agree=3):
    plan = Duchess(n, tau, patience, dup_tau, max_branches, agree)
    return plan, plan.begin()


def test_duchess_terminates_after_patience_consecutive_low_rounds():
    plan, step = duchess()
    assert len(step.start) == 4
    assert plan.round(0, 0.1).terminate == []         # one low round: not yet
    assert plan.round(0, 0.5).terminate == []         # streak broken
    assert plan.round(0, 0.2).terminate == []
    step = plan.round(0, 0.29)                        # second consecutive low round
    assert step.terminate == [0] and not step.done
    assert plan.branches[0].state == TERMINATED
    assert plan.round(0, 0.01).terminate == []        # a dead branch gets no more actions


def test_duchess_never_terminates_the_last_branch_before_an_answer():
    plan, _ = duchess(n=2, patience=1)
    assert plan.round(0, 0.0).terminate == [0]
    assert plan.round(1, 0.0).terminate == []         # the only live branch, no answer yet
    assert plan.branches[1].state == RUNNING
    assert plan.finish(1, "7").done


def test_duchess_may_drop_the_last_branch_once_an_answer_is_in():
    plan, _ = duchess(n=2, patience=1)
    plan.finish(0, "7")
    step = plan.round(1, 0.0)
    assert step.terminate == [1] and step.done
    assert plan.choose() == ("7", plan.branches[0])


def test_duchess_forks_a_high_scorer_into_a_terminated_slot_up_to_max_branches():
    plan, _ = duchess(n=3, patience=1, dup_tau=0.8, max_branches=5)
    plan.branches[0].tokens = 32
    assert plan.round(0, 0.85).start == []            # all 3 slots busy: no fork
    assert plan.round(1, 0.1).terminate == [1]        # a slot frees up
    step = plan.round(0, 0.85)
    assert len(step.start) == 1
    fork = step.start[0]
    assert (fork.index, fork.parent, fork.inherited) == (3, 0, 32)
    assert plan.round(2, 0.95).start == []            # the slot is taken again
    fork.tokens = 16
    plan.round(2, 0.0)                                # frees a slot: the fork may fork
    assert plan.round(3, 0.9).start[0].inherited == 48
    plan.round(4, 0.0)
    assert plan.round(0, 0.99).start == []            # 5 branches run: the cap


def test_duchess_opens_a_new_window_only_while_no_branch_was_terminated():
    plan = Duchess(6, 0.3, 1, 2.0, 16, 3, start=2)
    assert len(plan.begin().start) == 2
    plan.finish(0, "1")
    step = plan.finish(1, "2")                        # disagree, nothing terminated
    assert [b.index for b in step.start] == [2, 3] and not step.done
    assert plan.round(2, 0.1).terminate == [2]        # the probe judges it hard
    step = plan.finish(3, "2")
    assert step.done and step.start == []             # no third window
    assert plan.choose()[0] == "2"


def test_duchess_windows_stop_at_n_fresh_branches():
    plan = Duchess(3, 0.3, 1, 2.0, 16, 3, start=2)
    plan.begin()
    plan.finish(0, "1")
    assert [b.index for b in plan.finish(1, "2").start] == [2]  # 3 - 2 fresh left
    assert plan.finish(2, "3").done


def test_duchess_stops_at_agreement_and_votes_by_probe_weight():
    plan, _ = duchess(n=5, agree=3)
    for index, score in enumerate([0.9, 0.2, 0.2, 0.2, 0.6]):
        plan.round(index, score)
    assert not plan.finish(0, "12").done
    assert not plan.finish(1, "5").done
    assert not plan.finish(2, "5").done
    # 2 votes for "5" (weight 0.4) vs 1 for "12" (weight 0.9): the weighted vote picks "12"
    answer, carrier = plan.choose()
    assert answer == "12" and carrier.index == 0
    assert plan.finish(3, "5").done                   # third "5": agreement, stop
    assert plan.votes() == {"12": 1.0, "5": 3.0}


def test_without_probe_scores_duchess_behaves_like_self_consistency():
    plan, _ = duchess(n=3)
    for _ in range(10):
        for index in range(3):
            step = plan.round(index, None)
            assert step.terminate == [] and step.start == []
    for index, answer in enumerate(["1", "2", "2"]):
        plan.finish(index, answer)
    assert plan.choose()[0] == "2"


def test_self_consistency_runs_all_and_takes_the_majority():
    plan = SelfConsistency(4)
    assert len(plan.begin().start) == 4
    assert plan.round(0, 0.0).terminate == []         # scores change nothing
    steps = [plan.finish(i, a) for i, a in enumerate(["3", "4", "4", None])]
    assert [s.done for s in steps] == [False, False, False, True]
    assert plan.choose()[0] == "4"


def test_majority_tie_goes_to_the_answer_seen_first():
    plan = SelfConsistency(2)
    plan.begin()
    plan.finish(1, "b")
    plan.finish(0, "a")
    assert plan.choose()[0] == "a"


def test_esc_stops_after_a_unanimous_window():
    plan = EarlyStopping(8, window=2)
    assert len(plan.begin().start) == 2
    assert plan.finish(0, "9").start == []
    assert plan.finish(1, "9").done                   # window unanimous: 2 of 8 run


def test_esc_opens_windows_until_unanimous_or_n():
    plan = EarlyStopping(5, window=2)
    plan.begin()
    plan.finish(0, "1")
    step = plan.finish(1, "2")
    assert [b.index for b in step.start] == [2, 3] and not step.done
    plan.finish(2, "2")
    step = plan.finish(3, None)                       # no answer is not agreement
    assert [b.index for b in step.start] == [4]       # the last window holds what n allows
    assert plan.finish(4, "7").done
    assert plan.choose()[0] == "2"


def test_nothing_finished_means_no_choice():
    plan = SelfConsistency(2)
    plan.begin()
    plan.branches[0].state = plan.branches[1].state = CANCELLED
    assert plan.choose() == (None, None)


def test_no_answer_anywhere_picks_the_best_scoring_finished_branch():
    plan, _ = duchess(n=2)
    plan.round(0, 0.4)
    plan.round(1, 0.7)
    plan.finish(0, None)
    plan.finish(1, None)
    assert plan.choose() == (None, plan.branches[1])
    assert all(b.state == FINISHED for b in plan.branches)


def test_extract_answer_takes_the_last_match_normalised():
    assert extract_answer("answer: 3\nwork\nanswer:  1  2 </s>", ANSWER) == "1 2"
    assert extract_answer("no answer here", ANSWER) is None
    assert extract_answer("answer:   \n", ANSWER) is None
    boxed = re.compile(r"\\boxed\{([^}]*)\}")
    assert extract_answer(r"so \boxed{4} or \boxed{ 5 }", boxed) == "5"


def test_make_plan_reads_the_config():
    ext = ExtConfig(branch_tau=0.4, branch_patience=3, branch_dup_tau=2.0, branch_max=6,
                    branch_agree=2, branch_esc_window=3, branch_start=2)
    plan = make_plan("duchess", 4, ext)
    assert (plan.tau, plan.patience, plan.dup_tau, plan.max_branches, plan.agree,
            plan.width) == (0.4, 3, 2.0, 6, 2, 2)
    assert make_plan("duchess", 4, ExtConfig(branch_start=0)).width == 4
    assert make_plan("duchess", 10, ext).max_branches == 10   # never fewer than n
    assert make_plan("esc", 4, ext).window == 3
    assert isinstance(make_plan("sc", 4, ext), SelfConsistency)
    with pytest.raises(ValueError):
        make_plan("off", 4, ext)


@pytest.mark.parametrize("key,value,word", [
    ("branches", "vote", "--ext-branches"), ("branch_tau", 1.5, "--ext-branch-tau"),
    ("branch_patience", 0, "--ext-branch-patience"), ("branch_max", 0, "--ext-branch-max"),
    ("branch_answer_regex", "answer", "capture group"),
    ("branch_answer_regex", "(", "--ext-branch-answer-regex")])
def test_bad_branch_settings_name_their_flag(key, value, word):
    with pytest.raises(ExtConfigError, match=re.escape(word)):
        ExtConfig.from_dict({key: value})
