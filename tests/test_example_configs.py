"""Every ``example_configs/*.yml`` passes axolotl's own config validation, offline.

``axolotl.cli.config.load_cfg`` registers the plugins, validates the config
against axolotl's schema merged with the plugins' args, then normalizes it;
normalizing reads the model's config from the hub. This test does the first two
steps exactly as ``load_cfg`` does (``prepare_plugins`` + ``validate_config``)
and stops before the hub is needed, with every outgoing connection refused.

Configs written for GPUs (bf16, flash attention) are validated with the
capabilities of a GPU machine; the others also with this machine's own.
"""

from __future__ import annotations

import re
import socket
from pathlib import Path

import pytest
import yaml

EXAMPLES = Path(__file__).resolve().parent.parent / "example_configs"
CONFIGS = sorted(EXAMPLES.glob("*.yml")) + sorted(EXAMPLES.glob("*.yaml"))

# What axolotl.cli.config.gpu_capabilities() reports on one H100.
GPU_CAPABILITIES = {"bf16": True, "fp8": True, "tf32": True, "n_gpu": 1, "compute_capability": "sm_90"}


def _env_capabilities() -> dict:
    import torch

    return {"torch_version": str(torch.__version__).split("+", maxsplit=1)[0]}


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Validation must not need the network: refuse any non-local connection."""
    real_connect = socket.socket.connect

    def connect(self, address):
        host = address[0] if isinstance(address, tuple) else address
        if isinstance(host, str) and host not in ("127.0.0.1", "localhost", "::1") and self.family != socket.AF_UNIX:
            raise OSError(f"network access during config validation: {address}")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("AXOLOTL_DO_NOT_TRACK", "1")


def read_config(path: Path):
    from axolotl.utils.dict import DictDefault

    return DictDefault(yaml.safe_load(path.read_text(encoding="utf-8")))


def validate(path: Path, capabilities: dict | None):
    """What load_cfg does up to and including validation."""
    from axolotl.cli.config import prepare_plugins
    from axolotl.utils.config import validate_config

    cfg = read_config(path)
    cfg.axolotl_config_path = str(path)
    prepare_plugins(cfg)
    env = _env_capabilities() if capabilities is not None else None
    return validate_config(cfg, capabilities=capabilities, env_capabilities=env)


def needs_gpu(cfg) -> bool:
    attention = str(cfg.get("attn_implementation") or "")
    return cfg.get("bf16") is True or attention.startswith("flash") or bool(cfg.get("flash_attention"))


def test_the_folder_has_the_promised_configs():
    names = {p.name for p in CONFIGS}
    for model in ("llama-2-7b", "mistral-7b", "llama-3.1-8b"):
        for kind in ("lora", "qlora", "full"):
            assert f"{model}-{kind}.yml" in names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_validates_as_axolotl_validates_it(path):
    raw = read_config(path)
    capabilities = GPU_CAPABILITIES if needs_gpu(raw) else None
    cfg = validate(path, capabilities)
    # The plugin's args were merged and filled in: validation saw the ila_ keys.
    assert "axolotl_ila.ILAPlugin" in cfg.plugins
    assert cfg.ila_search in ("auto", "always", "never")
    assert cfg.ila_strategy == raw.get("ila_strategy", "ila")
    for key, value in raw.items():
        if key.startswith("ila_"):
            assert cfg[key] == value, f"{key} was changed or dropped by validation"


@pytest.mark.parametrize(
    "path", [p for p in CONFIGS if not needs_gpu(read_config(p))], ids=lambda p: p.name
)
def test_cpu_configs_validate_on_this_machine(path):
    from axolotl.cli.config import gpu_capabilities

    capabilities, _ = gpu_capabilities()
    validate(path, capabilities)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_ila_settings_make_a_selection(path):
    """The fraction works for a model of this size (32 blocks x 7 linear modules)."""
    from axolotl_ila.selection import select

    cfg = read_config(path)
    assert cfg.ila_ranking, "every example names its ranking file"
    assert not (cfg.ila_drop_fraction and cfg.ila_keep_fraction)
    names = [f"model.layers.{b}.m{k}" for b in range(32) for k in range(7)]
    selection = select(names, names, "first", cfg.ila_drop_fraction, cfg.ila_keep_fraction)
    assert selection.kept and selection.dropped


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_header_says_what_it_is_and_how_to_run_it(path):
    text = path.read_text(encoding="utf-8")
    assert text.startswith("#"), "start with a comment saying what the config is"
    # A run command, if any, names this very file (no copy-paste slips).
    for line in text.splitlines():
        if "axolotl.cli.train" in line:
            for named in re.findall(r"example_configs/([\w.\-]+\.ya?ml)", line):
                assert named == path.name, f"{path.name} tells users to run {named}"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_models_and_fine_tuning_kind_match_the_file_name(path):
    cfg = read_config(path)
    name = path.stem
    expected_model = {
        "llama-2-7b": ("Llama-2-7b-hf",),
        "mistral-7b": ("Mistral-7B-v0.1",),
        "llama-3.1-8b": ("Llama-3.1-8B",),
    }
    for prefix, models in expected_model.items():
        if name.startswith(prefix + "-"):
            assert str(cfg.base_model).endswith(models), cfg.base_model
    if name.endswith("-full"):
        assert not cfg.adapter
        assert not cfg.deepspeed  # the full fine-tuning examples shard with FSDP2
    elif name.endswith("-qlora"):
        assert cfg.adapter == "qlora" and cfg.load_in_4bit
    elif name.endswith("-lora"):
        assert cfg.adapter == "lora"


def test_validation_here_does_check_the_ila_keys(tmp_path):
    """Control: the same path refuses a broken copy of an example (so the passes above mean something)."""
    from pydantic import ValidationError

    source = EXAMPLES / "llama-2-7b-full.yml"
    cfg = yaml.safe_load(source.read_text(encoding="utf-8"))
    cfg.update(ila_drop_fraction=0.25, ila_keep_fraction=0.3)
    broken = tmp_path / "broken.yml"
    broken.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    with pytest.raises(ValidationError, match="not both"):
        validate(broken, GPU_CAPABILITIES)

    cfg.pop("ila_keep_fraction")
    cfg.pop("fsdp_version")
    cfg.pop("fsdp_config")
    cfg["deepspeed"] = "deepspeed_configs/zero3_bf16.json"
    broken.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    with pytest.raises(ValidationError, match="could not read the ZeRO stage of deepspeed"):
        validate(broken, GPU_CAPABILITIES)


@pytest.mark.parametrize(
    "path", [p for p in CONFIGS if p.stem.endswith(("-lora", "-qlora")) and needs_gpu(read_config(p))], ids=lambda p: p.name
)
def test_gpu_lora_configs_warn_when_the_selection_splits_fused_groups(path):
    """axolotl turns its fused LoRA kernels on for these configs; a selection that
    splits q/k/v or gate/up/down gets a warning naming the kernel and the fix."""
    from axolotl_ila.args import fused_groups
    from axolotl_ila.plan import kernel_warnings
    from axolotl_ila.selection import importance_order, select

    cfg = validate(path, GPU_CAPABILITIES)
    assert cfg.lora_qkv_kernel and cfg.lora_mlp_kernel
    kinds = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    names = [f"model.layers.{b}.{kind}" for b in range(32) for kind in kinds]
    order = importance_order(names, "random", seed=0)
    split = select(names, order, "random", drop_fraction=0.25, groups=fused_groups(cfg))
    warnings = kernel_warnings(cfg, split)
    assert len(warnings) == 2
    assert "lora_qkv_kernel is on" in warnings[0] and "lora_mlp_kernel is on" in warnings[1]
    assert all("ila_fused_groups: true" in w for w in warnings)
    whole = select(names, order, "random", drop_fraction=0.25, groups=("qkv", "mlp"))
    assert kernel_warnings(cfg, whole) == []
