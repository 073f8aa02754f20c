"""The memory plan on the numbers of real cards: what fits is planned, what cannot is refused with the numbers."""

from __future__ import annotations

import pytest

from mergetune.errors import MergetuneError
from mergetune.search.memory import GB, cache_fits, plan_engine, plan_live

B7 = int(7.24e9 * 2)  # a Mistral-7B-shaped model in bfloat16
B70 = int(70.6e9 * 2)
H200 = dict(device="cuda:0", free=int(140 * GB), total=int(141 * GB))
H100 = dict(device="cuda:0", free=int(79 * GB), total=int(80 * GB))


@pytest.mark.parametrize("card", [H200, H100], ids=["141 GB", "80 GB"])
@pytest.mark.parametrize("sources", [2, 3], ids=["slerp", "dare_ties"])
def test_a_7b_search_fits_on_one_card_with_the_engine_given_what_the_sources_leave(card, sources):
    plan = plan_engine(**card, sources=sources * B7, weights=B7)
    assert plan.needed <= card["free"]
    assert plan.working > 15 * GB  # a key/value cache worth having
    assert 0.3 < plan.engine_share < card["free"] / card["total"]


def test_the_fixed_085_share_of_the_old_backend_is_refused_with_the_numbers():
    with pytest.raises(MergetuneError, match=r"gpu_memory_utilization 0.85 asks for 119.8 GB but 80.1 GB are free"):
        plan_engine(**H200, sources=3 * B7 + B7, weights=B7, share=0.85)  # three sources and an HF live model


def test_a_70b_search_is_refused_saying_what_to_change():
    with pytest.raises(MergetuneError, match=r"does not fit on cuda:0.*sources \(resident\) 282.4 GB.*tensor_parallel_size"):
        plan_engine(**H200, sources=2 * B70, weights=B70)
    with pytest.raises(MergetuneError, match=r"does not fit on cuda:0.*smaller dtype"):
        plan_live(**H200, sources=2 * B70, model=B70)


def test_the_hf_backend_counts_the_live_model_and_its_activations():
    plan = plan_live(**H200, sources=2 * B7, model=B7)
    assert plan.needed == 2 * B7 + B7 + B7 // 4
    with pytest.raises(MergetuneError, match="does not fit"):
        plan_live(**H100, sources=5 * B7, model=B7)


def test_task_vectors_are_kept_between_candidates_only_where_they_fit():
    # A 7B DARE TIES of two fine-tunes: three sources, the live model, two task vectors more.
    plan = plan_live(**H200, sources=3 * B7, model=B7)
    assert cache_fits(plan, 2 * B7)  # 61.5 + 29 GB of 140 free
    assert not cache_fits(plan_live(**H100, sources=3 * B7, model=B7), 2 * B7)
