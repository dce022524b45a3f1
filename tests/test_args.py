"""The ``ila_`` keys, validated by axolotl's own config loader.

Each case goes through ``axolotl.cli.config.load_cfg`` on a YAML file, so the
messages tested here are the ones users see; a refused config writes nothing.
"""

from __future__ import annotations

import importlib.metadata
import json

import pytest
from packaging.version import Version

# axolotl 0.20 removed FSDP1 and made fsdp_version default to 2.
AXOLOTL_020 = Version(importlib.metadata.version("axolotl")) >= Version("0.20")

# -- accepted --------------------------------------------------------------------


def test_defaults_are_filled(load):
    cfg = load()
    assert cfg.ila_search == "auto"
    assert cfg.ila_strategy == "ila"
    assert cfg.ila_drop_fraction is None and cfg.ila_keep_fraction is None  # selection defaults to drop 0.25
    assert cfg.ila_gate_steps == 128
    # The stopping rules the planted-task suite chose (docs/planted.md).
    assert cfg.ila_warmup_fraction == 0.75 and cfg.ila_warmup_early_stop is False and cfg.ila_gate_min_steps == 64
    assert cfg.ila_relearn_steps is None  # 32, or 0 under DeepSpeed (engines.relearn_steps)
    assert cfg.ila_seed == 42
    assert cfg.ila_ranking.endswith("tiny.json")


def test_keep_fraction_full_fine_tuning_and_unranked_strategy(load):
    cfg = load(adapter=None, ila_keep_fraction=0.3, ila_strategy="mid_block", ila_ranking=None)
    assert cfg.adapter is None and cfg.ila_keep_fraction == 0.3 and cfg.ila_strategy == "mid_block"


def test_qlora_is_accepted(load):
    cfg = load(adapter="qlora", load_in_4bit=True, ila_drop_fraction=0.2, ila_search="always")
    assert cfg.adapter == "qlora" and cfg.ila_drop_fraction == 0.2 and cfg.ila_search == "always"


# -- refused ---------------------------------------------------------------------


@pytest.mark.parametrize("key", ["ila_drop_fraction", "ila_keep_fraction"])
@pytest.mark.parametrize("value", [0, 1, -0.25, 1.5])
def test_fraction_outside_the_open_unit_interval(refused, key, value):
    message = refused(rf"{key} must be between 0 and 1 \(exclusive\), got {float(value)}", **{key: value})
    assert f"e.g. {key}: 0.25" in message


def test_other_fractions_are_checked_too(refused):
    refused(r"ila_gate_budget must be between 0 and 1", ila_gate_budget=1.0)


def test_both_drop_and_keep(refused):
    refused(
        "set either ila_drop_fraction .* or ila_keep_fraction .*, not both",
        ila_drop_fraction=0.25,
        ila_keep_fraction=0.3,
    )


def test_unknown_strategy(refused):
    message = refused("ila_strategy: unknown strategy 'best'", ila_strategy="best")
    for strategy in ("ila", "update_norm", "random", "first", "last", "mid_block"):
        assert strategy in message


def test_unknown_search_mode(refused):
    refused(r"ila_search\n.*'auto', 'always' or 'never'", ila_search="sometimes")


def test_unsupported_adapter(refused):
    # axolotl itself accepts llama-adapter; the plugin must refuse it.
    refused(
        r"axolotl_ila.ILAPlugin supports adapter: lora, qlora, or no adapter .* not adapter: llama-adapter",
        adapter="llama-adapter",
    )


def test_ila_strategy_without_ranking(refused):
    refused(r"ila_strategy: ila needs a ranking file: set ila_ranking", ila_ranking=None)


def test_update_norm_strategy_without_ranking(refused):
    refused(r"ila_strategy: update_norm needs a ranking file", ila_ranking=None, ila_strategy="update_norm")


def test_search_never_without_ranking(refused):
    refused(r"ila_search: never needs ila_ranking", ila_ranking=None, ila_search="never", ila_strategy="random")


def test_unfrozen_parameters_with_full_fine_tuning(refused):
    refused(
        r"unfrozen_parameters and axolotl_ila.ILAPlugin both decide what full fine-tuning trains",
        adapter=None,
        unfrozen_parameters=[r"model.layers.0.*"],
    )


@pytest.mark.skipif(
    AXOLOTL_020,
    reason="axolotl 0.20+ removed FSDP1: an fsdp_config without fsdp_version is FSDP2 there "
    "(test_an_fsdp_config_without_a_version_is_fsdp2_from_axolotl_020)",
)
def test_fsdp1_is_refused_at_config_load(refused):
    refused(r"supports FSDP version 2 only \(fsdp_version: 2\)", fsdp_config={"auto_wrap_policy": "TRANSFORMER_BASED_WRAP", "transformer_layer_cls_to_wrap": "LlamaDecoderLayer"})


@pytest.mark.skipif(
    not AXOLOTL_020,
    reason="on axolotl 0.19 an fsdp_config without fsdp_version is FSDP1, which ILA refuses "
    "(test_fsdp1_is_refused_at_config_load)",
)
def test_an_fsdp_config_without_a_version_is_fsdp2_from_axolotl_020(load):
    from axolotl_ila.runtime.engines import engine

    cfg = load(fsdp_config={"transformer_layer_cls_to_wrap": "LlamaDecoderLayer", "state_dict_type": "SHARDED_STATE_DICT"})
    assert engine(cfg) == "fsdp2"
    assert engine({"fsdp_config": {"reshard_after_forward": True}}) == "fsdp2"  # the raw config, before validation


def test_continuing_under_fsdp2_with_a_full_state_dict_is_refused(refused):
    message = refused(
        r"ila_continue: true cannot work here: under FSDP2 .* fsdp_config.state_dict_type: FULL_STATE_DICT",
        ila_continue=True,
        fsdp_version=2,
        fsdp_config={"state_dict_type": "FULL_STATE_DICT", "transformer_layer_cls_to_wrap": "LlamaDecoderLayer"},
    )
    assert "Set fsdp_config.state_dict_type: SHARDED_STATE_DICT" in message


def test_fsdp2_continues_by_default_only_with_a_sharded_state_dict(load):
    from axolotl_ila.search.settings import continues_training

    def fsdp2(**block):
        return {"fsdp_version": 2, "fsdp_config": {"transformer_layer_cls_to_wrap": "LlamaDecoderLayer", **block}}

    assert continues_training(load(**fsdp2(state_dict_type="SHARDED_STATE_DICT")))
    assert not continues_training(load(**fsdp2(state_dict_type="FULL_STATE_DICT")))
    assert not continues_training(load(**fsdp2()))  # transformers' default is FULL_STATE_DICT
    assert not continues_training(load(adapter=None, **fsdp2(state_dict_type="SHARDED_STATE_DICT")))


@pytest.mark.parametrize("key", ["ila_gate_steps", "ila_stability_window"])
def test_positive_integers(refused, key):
    refused(rf"{key} must be a positive integer, got 0", **{key: 0})


@pytest.mark.parametrize("key", ["ila_gate_min_steps", "ila_relearn_steps"])
def test_non_negative_integers(refused, key):
    refused(rf"{key} must be >= 0, got -1", **{key: -1})


# -- cross-key checks on the raw dict (no axolotl load needed) ---------------------


ZERO2, ZERO3 = {"zero_optimization": {"stage": 2}}, {"zero_optimization": {"stage": 3}}


@pytest.mark.parametrize("deepspeed", [ZERO2, ZERO3])
def test_deepspeed_zero2_and_zero3_run_lora_and_full_finetuning_and_lora_continues_from_the_warmup(deepspeed):
    from axolotl_ila.args import check_combination, continues_by_default

    cfg = {"ila_strategy": "first", "adapter": "lora", "deepspeed": deepspeed}
    check_combination(cfg)  # not refused
    assert continues_by_default(cfg)
    check_combination({**cfg, "ila_continue": True})
    check_combination({**cfg, "adapter": None})  # full fine-tuning: not refused
    assert not continues_by_default({**cfg, "adapter": None})


@pytest.mark.parametrize("deepspeed", [ZERO2, ZERO3])
def test_deepspeed_zero2_and_zero3_run_qlora_and_continue_from_the_warmup(deepspeed):
    from axolotl_ila.args import check_combination, continues_by_default

    cfg = {"ila_strategy": "first", "adapter": "qlora", "load_in_4bit": True, "deepspeed": deepspeed}
    check_combination(cfg)  # not refused
    assert continues_by_default(cfg)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"deepspeed": {**ZERO2, "optimizer": {"type": "AdamW"}}}, r"brings its own optimizer .* Remove optimizer from the DeepSpeed config"),
        ({"deepspeed": {**ZERO3, "scheduler": {"type": "WarmupLR"}}}, r"brings its own scheduler .* Remove scheduler from the DeepSpeed config"),
        ({"deepspeed": ZERO2, "lora_modules_to_save": ["embed_tokens"]}, r"lora_modules_to_save trains whole copies"),
    ],
)
def test_deepspeed_continuation_is_refused_where_its_handover_is_not_built(overrides, message):
    from axolotl_ila.args import check_combination, continues_by_default

    cfg = {"ila_strategy": "first", "adapter": "lora", **overrides}
    check_combination(cfg)  # the default trains afresh after the search
    assert not continues_by_default(cfg)
    with pytest.raises(ValueError, match=rf"ila_continue: true cannot work here: under DeepSpeed .*{message}"):
        check_combination({**cfg, "ila_continue": True})


def test_deepspeed_stage_is_read_from_the_json_file(tmp_path):
    from axolotl_ila.runtime.engines import deepspeed_stage, engine_refusal

    path = tmp_path / "zero3.json"
    path.write_text(json.dumps(ZERO3), encoding="utf-8")
    assert deepspeed_stage({"deepspeed": str(path)}) == 3
    assert engine_refusal({"adapter": "lora", "deepspeed": str(path)}) is None
    assert deepspeed_stage({"deepspeed": {"train_batch_size": 8}}) == 0  # no zero_optimization: stage 0
    assert deepspeed_stage({"deepspeed": str(tmp_path / "missing.json")}) is None


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"deepspeed": {"zero_optimization": {"stage": 1}}}, r"supports DeepSpeed ZeRO-2 and ZeRO-3 only .* not stage 1"),
        ({"deepspeed": {"train_batch_size": 8}}, r"supports DeepSpeed ZeRO-2 and ZeRO-3 only .* not stage 0"),
        ({"deepspeed": "deepspeed_configs/absent.json"}, r"could not read the ZeRO stage of deepspeed: 'deepspeed_configs/absent.json'"),
        ({"deepspeed": ZERO2, "load_in_8bit": True}, r"does not support 8-bit models \(load_in_8bit\) under DeepSpeed: no test has run them"),
        ({"deepspeed": ZERO3, "ila_gate_train_lora": True}, r"ila_gate_train_lora: true is not supported under DeepSpeed"),
        ({"deepspeed": ZERO2, "ila_relearn_steps": 32}, r"ila_relearn_steps: 32 is not supported under DeepSpeed: the re-learning check"),
        ({"deepspeed": ZERO2, "rl": "dpo"}, r"does not support a preference loss \(rl: dpo\) under DeepSpeed: no test has run one"),
    ],
)
def test_what_deepspeed_has_not_run_is_refused_with_its_reason(overrides, message):
    from axolotl_ila.args import check_combination

    with pytest.raises(ValueError, match=message):
        check_combination({"ila_strategy": "first", "adapter": "lora", **overrides})


def test_the_relearning_check_runs_32_steps_by_default_and_none_under_deepspeed():
    from axolotl_ila.args import check_combination
    from axolotl_ila.runtime.engines import relearn_steps

    assert relearn_steps({}) == 32 and relearn_steps({"fsdp_config": {"fsdp_version": 2}}) == 32
    assert relearn_steps({"ila_relearn_steps": 8}) == 8 and relearn_steps({"ila_relearn_steps": 0}) == 0
    assert relearn_steps({"deepspeed": ZERO3}) == 0
    check_combination({"ila_strategy": "first", "adapter": "lora", "deepspeed": ZERO2, "ila_relearn_steps": 0})


def test_engine_of_a_raw_or_validated_config():
    from axolotl_ila.runtime.engines import engine, fsdp_state_dict_type

    assert engine({}) is None
    assert engine({"fsdp_config": {"fsdp_version": 2}}) == "fsdp2"
    assert engine({"fsdp_config": {"version": "2"}}) == "fsdp2"
    assert engine({"fsdp_version": 2, "fsdp_config": {}}) == "fsdp2"
    # No version: axolotl's default, FSDP1 on 0.19, FSDP2 from 0.20 on (which removed FSDP1).
    assert engine({"fsdp_config": {"reshard_after_forward": True}}) == ("fsdp2" if AXOLOTL_020 else "fsdp1")
    assert engine({"fsdp": ["full_shard"], "fsdp_version": 1}) == "fsdp1"
    assert engine({"deepspeed": "zero2.json", "fsdp_config": {"fsdp_version": 2}}) == "deepspeed"
    assert fsdp_state_dict_type({"fsdp_config": {"fsdp_state_dict_type": "SHARDED_STATE_DICT"}}) == "SHARDED_STATE_DICT"


# -- fused groups ------------------------------------------------------------------


@pytest.mark.parametrize(
    "adapter, overrides, groups",
    [
        ("lora", {}, ()),
        ("qlora", {"lora_qkv_kernel": True, "lora_mlp_kernel": True, "load_in_4bit": True}, ()),  # only when asked
        ("lora", {"ila_fused_groups": True}, ("qkv", "mlp")),
        (None, {"ila_fused_groups": True}, ("qkv", "mlp")),
    ],
)
def test_fused_groups_only_when_asked(load, adapter, overrides, groups):
    from axolotl_ila.args import fused_groups

    assert fused_groups(load(adapter=adapter, **overrides)) == groups


def test_fused_groups_must_be_a_boolean(refused):
    refused(r"ila_fused_groups\n.*valid boolean", ila_fused_groups="qkv")


def test_the_plugin_warns_when_the_selection_splits_a_kernel_group(load, caplog):
    """With a fused kernel on, a selection that splits its group is logged with the fix."""
    import logging

    from axolotl_ila.plugin import ILAPlugin

    cfg = load(ila_strategy="random", ila_ranking=None, lora_qkv_kernel=True, lora_mlp_kernel=False)
    with caplog.at_level(logging.WARNING, logger="axolotl.ila"):
        plan = ILAPlugin()._ensure_plan(cfg)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "is on" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith("ILA: lora_qkv_kernel is on")
    assert "ila_fused_groups: true" in warnings[0]

    caplog.clear()
    cfg = load(ila_strategy="random", ila_ranking=None, lora_qkv_kernel=True, lora_mlp_kernel=False, ila_fused_groups=True)
    with caplog.at_level(logging.WARNING, logger="axolotl.ila"):
        grouped = ILAPlugin()._ensure_plan(cfg)
    assert not [r for r in caplog.records if "is on" in r.getMessage()]
    assert grouped.selection.groups == ("qkv", "mlp") and plan.selection.groups == ()
