"""Selection strategies and the one drop/keep rule, on realistic Llama names."""

from __future__ import annotations

import pytest

from axolotl_ila.architecture import block_index, module_kind
from axolotl_ila.ranking.file import ModuleScore, Ranking, RankingError
from axolotl_ila.selection import (
    DEFAULT_DROP_FRACTION,
    FUSED_GROUPS,
    STRATEGIES,
    SelectionError,
    importance_order,
    select,
    split_groups,
    units,
)

KINDS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


def llama_names(blocks: int) -> list[str]:
    """Linear modules of a Llama in ``named_modules()`` order."""
    return [f"model.layers.{b}.{kind}" for b in range(blocks) for kind in KINDS]


NAMES = llama_names(4)  # 28 modules


def ranking_for(order: list[str], update_norm_order: list[str] | None = None) -> Ranking:
    """A ranking whose score order is ``order`` (most important first)."""
    norms = None
    if update_norm_order is not None:
        norms = {name: float(len(update_norm_order) - i) for i, name in enumerate(update_norm_order)}
    modules = [
        ModuleScore(name=name, score=float(len(order) - i), update_norm=None if norms is None else norms[name])
        for i, name in enumerate(order)
    ]
    return Ranking(modules=modules, model={"fingerprint": "sha256:test"})


def blocks_of(names) -> list[int]:
    return sorted({block_index(n) for n in names})


# -- importance orders -----------------------------------------------------------


def test_first_drops_block_zero_first():
    order = importance_order(NAMES, "first")
    assert sorted(order[-7:]) == sorted(NAMES[:7])  # block 0 is least important
    sel = select(NAMES, order, "first", drop_fraction=0.25)  # 7 of 28
    assert sel.dropped == tuple(NAMES[:7])
    assert blocks_of(sel.kept) == [1, 2, 3]


def test_last_drops_the_last_block_first():
    order = importance_order(NAMES, "last")
    assert sorted(order[-7:]) == sorted(NAMES[-7:])
    sel = select(NAMES, order, "last", drop_fraction=0.25)
    assert sel.dropped == tuple(NAMES[-7:])
    assert blocks_of(sel.kept) == [0, 1, 2]


def test_first_and_last_are_the_first_and_last_k_modules_in_model_order():
    assert select(NAMES, importance_order(NAMES, "first"), "first", drop_fraction=0.1).dropped == tuple(NAMES[:3])
    assert select(NAMES, importance_order(NAMES, "last"), "last", drop_fraction=0.1).dropped == tuple(NAMES[-3:])


def test_first_and_last_put_lm_head_outside_the_blocks():
    names = NAMES + ["lm_head"]
    assert importance_order(names, "last")[-1] == "lm_head"  # deepest
    assert importance_order(names, "first")[0] == "lm_head"


def test_mid_block_keeps_blocks_between_20_and_80_percent_of_depth():
    names = llama_names(10)
    order = importance_order(names, "mid_block")
    sel = select(names, order, "mid_block", keep_fraction=0.6)
    assert len(sel.kept) == 42
    assert blocks_of(sel.kept) == [2, 3, 4, 5, 6, 7]  # 20% .. 80% of 10 blocks
    assert blocks_of(sel.dropped) == [0, 1, 8, 9]
    # whole blocks: every kept block keeps all seven module types
    assert all(sum(block_index(n) == b for n in sel.kept) == 7 for b in range(2, 8))


def test_mid_block_order_grows_outward_from_the_middle():
    names = llama_names(10)
    order = importance_order(names, "mid_block")
    block_sequence = [block_index(n) for n in order[::7]]
    assert block_sequence == [4, 5, 3, 6, 2, 7, 1, 8, 0, 9]


def test_random_is_seeded_and_depends_on_the_seed():
    a = importance_order(NAMES, "random", seed=1)
    assert a == importance_order(NAMES, "random", seed=1)
    assert sorted(a) == sorted(NAMES)
    assert a != importance_order(NAMES, "random", seed=2)
    assert a != NAMES
    assert select(NAMES, a, "random", drop_fraction=0.25) == select(
        NAMES, importance_order(NAMES, "random", seed=1), "random", drop_fraction=0.25
    )


def test_ila_follows_the_ranking():
    order = list(reversed(NAMES))  # deepest most important
    ranking = ranking_for(order)
    assert importance_order(NAMES, "ila", ranking) == order
    sel = select(NAMES, importance_order(NAMES, "ila", ranking), "ila", drop_fraction=0.25)
    assert sel.dropped == tuple(NAMES[:7])
    assert sel.kept == tuple(NAMES[7:])  # model order, not importance order


def test_update_norm_follows_the_ranking_update_norms():
    score_order = list(NAMES)
    norm_order = [n for n in NAMES if module_kind(n).startswith("mlp")] + [
        n for n in NAMES if module_kind(n).startswith("self_attn")
    ]
    ranking = ranking_for(score_order, update_norm_order=norm_order)
    assert importance_order(NAMES, "ila", ranking) == score_order
    assert importance_order(NAMES, "update_norm", ranking) == norm_order
    sel = select(NAMES, norm_order, "update_norm", keep_fraction=12 / 28)
    assert {module_kind(n) for n in sel.kept} == {"mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}


def test_update_norm_without_norms_in_the_ranking_is_an_error():
    with pytest.raises(RankingError, match="update_norm"):
        importance_order(NAMES, "update_norm", ranking_for(NAMES))


def test_ranked_strategies_need_a_ranking():
    for strategy in ("ila", "update_norm"):
        with pytest.raises(SelectionError, match="ila_ranking"):
            importance_order(NAMES, strategy, None)


def test_unknown_strategy():
    with pytest.raises(SelectionError, match="ila_strategy: unknown strategy 'best'"):
        importance_order(NAMES, "best")


def test_ranking_missing_candidates_is_an_error():
    ranking = ranking_for(NAMES[:20])
    with pytest.raises(RankingError, match="does not score 8 of the 28 modules") as info:
        importance_order(NAMES, "ila", ranking)
    assert NAMES[20] in str(info.value)


def test_candidates_restrict_a_larger_ranking():
    ranking = ranking_for(list(reversed(NAMES + ["lm_head"])))  # lm_head most important
    attention = [n for n in NAMES if "self_attn" in n]
    order = importance_order(attention, "ila", ranking)
    assert order == list(reversed(attention))
    sel = select(attention, order, "ila", drop_fraction=0.25)  # 4 of 16
    assert sel.dropped == tuple(attention[:4])
    assert "lm_head" not in sel.kept + sel.dropped


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_orders_exactly_the_candidates(strategy):
    ranking = ranking_for(NAMES, update_norm_order=list(reversed(NAMES)))
    order = importance_order(NAMES, strategy, ranking, seed=3)
    assert sorted(order) == sorted(NAMES)
    sel = select(NAMES, order, strategy)
    assert len(sel.kept) == 21 and len(sel.dropped) == 7
    assert set(sel.kept) | set(sel.dropped) == set(NAMES)
    assert list(sel.kept) == [n for n in NAMES if n in sel.kept]  # model order


# -- counts ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "total, fraction, dropped",
    [
        (28, 0.25, 7),
        (225, 0.25, 56),  # 56.25 -> 56
        (10, 0.25, 3),  # 2.5 -> 3: half rounds up (round() would give 2)
        (6, 0.25, 2),  # 1.5 -> 2
        (14, 0.25, 4),  # 3.5 -> 4
        (30, 0.05, 2),  # 1.5 -> 2
        (18, 0.25, 5),  # 4.5 -> 5 (round() would give 4)
    ],
)
def test_drop_count_rounds_half_up(total, fraction, dropped):
    names = llama_names(total // 7 + 1)[:total]
    sel = select(names, names, "first", drop_fraction=fraction)
    assert len(sel.dropped) == dropped
    assert sel.mode == "drop" and sel.fraction == fraction


@pytest.mark.parametrize(
    "total, fraction, kept",
    [
        (28, 0.3, 8),  # 8.4 -> 8
        (225, 0.3, 68),  # 67.5 -> 68
        (10, 0.25, 3),  # 2.5 -> 3
        (18, 0.25, 5),  # 4.5 -> 5
        (28, 0.1, 3),  # 2.8 -> 3
    ],
)
def test_keep_count_rounds_half_up(total, fraction, kept):
    names = llama_names(total // 7 + 1)[:total]
    sel = select(names, names, "first", keep_fraction=fraction)
    assert len(sel.kept) == kept
    assert sel.kept == tuple(names[:kept])  # the head of the order
    assert sel.mode == "keep"


def test_default_is_drop_a_quarter():
    sel = select(NAMES, NAMES, "first")
    assert sel.mode == "drop" and sel.fraction == DEFAULT_DROP_FRACTION
    assert len(sel.dropped) == 7


def test_keep_leaving_nothing_names_the_key():
    with pytest.raises(SelectionError, match="ila_keep_fraction: 0.01 of 28 modules would leave no module to train; raise it"):
        select(NAMES, NAMES, "first", keep_fraction=0.01)


def test_drop_leaving_nothing_names_the_key():
    with pytest.raises(SelectionError, match="ila_drop_fraction: 0.99 of 28 modules would leave no module to train; lower it"):
        select(NAMES, NAMES, "first", drop_fraction=0.99)


def test_drop_of_zero_modules_names_the_key():
    with pytest.raises(SelectionError, match="ila_drop_fraction: 0.01 of 28 modules drops no module; raise it"):
        select(NAMES, NAMES, "first", drop_fraction=0.01)


def test_keep_of_all_modules_names_the_key():
    with pytest.raises(SelectionError, match="ila_keep_fraction: 0.99 of 28 modules drops no module; lower it"):
        select(NAMES, NAMES, "first", keep_fraction=0.99)


def test_both_fractions_are_refused():
    with pytest.raises(SelectionError, match="ila_drop_fraction or ila_keep_fraction"):
        select(NAMES, NAMES, "first", drop_fraction=0.25, keep_fraction=0.3)


def test_no_candidates():
    with pytest.raises(SelectionError, match="lora_target_modules"):
        select([], [], "first")


def test_order_must_cover_the_candidates():
    with pytest.raises(SelectionError, match="does not cover"):
        select(NAMES, NAMES[:-1], "first")


def test_summary_and_json():
    sel = select(NAMES, importance_order(NAMES, "first"), "first", drop_fraction=0.25)
    text = sel.summary()
    assert "kept 21/28 modules, dropped 7" in text
    assert "0:0/7" in text and "3:7/7" in text
    assert "mlp.down_proj 3/4" in text
    data = sel.to_json()
    assert data["strategy"] == "first" and data["mode"] == "drop" and len(data["dropped"]) == 7


# -- fused groups kept whole -------------------------------------------------------


def groups_split(selection, groups) -> list[str]:
    """Fused groups with members on both sides of the selection."""
    return [parent for group in groups for parent in split_groups(selection, group)]


def interleaved_order() -> list[str]:
    """An order that splits every group: each block's modules spread over the whole order."""
    return [NAMES[b * 7 + k] for k in range(7) for b in range(4)]


def test_without_groups_an_interleaved_order_splits_groups():
    sel = select(NAMES, interleaved_order(), "ila", drop_fraction=0.25)
    assert groups_split(sel, ("qkv", "mlp"))


@pytest.mark.parametrize("rule", [{"drop_fraction": 0.25}, {"drop_fraction": 0.5}, {"keep_fraction": 0.3}, {"keep_fraction": 0.1}])
def test_groups_are_kept_or_dropped_whole_within_the_fraction(rule):
    groups = ("qkv", "mlp")
    sel = select(NAMES, interleaved_order(), "ila", groups=groups, **rule)
    assert groups_split(sel, groups) == []
    plain = select(NAMES, interleaved_order(), "ila", **rule)
    if "keep_fraction" in rule:
        assert 0 < len(sel.kept) <= len(plain.kept)
    else:
        assert 0 < len(sel.dropped) <= len(plain.dropped)
    assert sel.groups == groups and sel.to_json()["groups"] == ["qkv", "mlp"]
    assert "whole groups: qkv, mlp" in sel.summary()


def test_only_the_named_groups_are_whole():
    sel = select(NAMES, interleaved_order(), "ila", drop_fraction=0.25, groups=("qkv",))
    assert groups_split(sel, ("qkv",)) == []
    units_of = units(interleaved_order(), ("qkv",))
    assert sorted(map(len, units_of)) == [1] * 16 + [3] * 4  # o_proj and the MLP stay single


def test_a_group_ranks_by_the_mean_position_of_its_members():
    # Block 3's q/k/v are the three least important modules: they go first.
    order = [n for n in NAMES if not (block_index(n) == 3 and "self_attn" in n and "o_proj" not in n)]
    order += ["model.layers.3.self_attn.q_proj", "model.layers.3.self_attn.k_proj", "model.layers.3.self_attn.v_proj"]
    sel = select(NAMES, order, "ila", drop_fraction=0.25, groups=("qkv", "mlp"))  # 7 to drop
    assert set(sel.dropped) >= {"model.layers.3.self_attn.q_proj", "model.layers.3.self_attn.k_proj", "model.layers.3.self_attn.v_proj"}
    assert len(sel.dropped) == 7  # then 4 more: the next units that fit


def test_with_groups_the_same_order_gives_the_plain_selection_when_it_splits_nothing():
    order = importance_order(NAMES, "first")  # blocks from deepest: groups never split at block edges
    assert select(NAMES, order, "first", keep_fraction=0.25, groups=("qkv", "mlp")).kept == select(NAMES, order, "first", keep_fraction=0.25).kept


def test_no_whole_group_fits_names_the_keys():
    qkv_only = [n for n in NAMES if n.rsplit(".", 1)[-1] in FUSED_GROUPS["qkv"]]  # 12 modules, 4 groups of 3
    with pytest.raises(SelectionError, match=r"ila_keep_fraction: 0.1 of 12 modules keeps no module once the fused groups \(qkv\) are kept or dropped whole; raise ila_keep_fraction, or set ila_fused_groups: false"):
        select(qkv_only, qkv_only, "ila", keep_fraction=0.1, groups=("qkv",))
    with pytest.raises(SelectionError, match="ila_drop_fraction: 0.1 of 12 modules drops no module"):
        select(qkv_only, qkv_only, "ila", drop_fraction=0.1, groups=("qkv",))


def test_split_groups_names_the_blocks_whose_group_is_split():
    sel = select(NAMES, interleaved_order(), "ila", drop_fraction=0.25)  # drops 4 down_proj, 3 up_proj
    assert split_groups(sel, "mlp") == [f"model.layers.{b}.mlp" for b in range(4)]
    assert split_groups(sel, "qkv") == []
    assert split_groups(select(NAMES, interleaved_order(), "ila", drop_fraction=0.25, groups=("mlp",)), "mlp") == []


def test_unknown_group():
    with pytest.raises(SelectionError, match="unknown fused group 'attn'"):
        select(NAMES, NAMES, "ila", groups=("attn",))
