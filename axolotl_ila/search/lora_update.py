"""What the search reads from and does to one PEFT LoRA layer: the size of its
update, and a gate that scales it.

Two kinds of layer need two ways:

- ``lora.Linear`` (on ``nn.Linear`` or ``Conv1D``) computes
  ``lora_B(lora_A(x)) * scaling``; the gate multiplies ``lora_B``'s output.
- ``lora.ParamWrapper`` (on a 3-D expert parameter, ``target_parameters``)
  never calls ``lora_B``: it adds its update to the parameter for the duration
  of the forward, computed by ``get_delta_weight()`` (peft 0.20), or, from
  peft 0.21 on, for one adapter on several experts, as the low-rank factors of
  ``get_delta_factors()`` that it folds into the parameter with one ``baddbmm``.
  The gate multiplies whichever of the two the installed peft has (both where
  it has both: it picks one per forward). Its LoRA matrices hold one rank-r
  block per expert, so the update's norm is taken expert by expert, as PEFT
  lays them out.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from axolotl_ila.runtime.distributed import gathered


def _is_param_wrapper(layer: Any) -> bool:
    from peft.tuners.lora import ParamWrapper

    return isinstance(layer, ParamWrapper)


def lora_parameters(layers: dict[str, Any]) -> list[torch.Tensor]:
    """The LoRA matrices of these layers, in order."""
    params: list[torch.Tensor] = []
    for layer in layers.values():
        for module in (layer.lora_A, layer.lora_B):
            params.extend(module.parameters())
    return params


@torch.no_grad()
def update_norm(layer: Any, adapter: str = "default") -> float:
    """Frobenius norm of the layer's LoRA update ``scaling * B @ A`` (for an
    expert parameter: of the stack of per-expert updates).

    Computed through r x r matrices: ||BA||^2 = trace((B^T B)(A A^T)).
    Under DeepSpeed ZeRO-3 the weights are gathered first (a collective: every
    rank computes every layer's norm, in the same order).
    """
    with gathered([layer.lora_A[adapter].weight, layer.lora_B[adapter].weight]):
        a = layer.lora_A[adapter].weight.float().clone()
        b = layer.lora_B[adapter].weight.float().clone()
    experts = getattr(layer, "num_experts", 1) if _is_param_wrapper(layer) else 1
    # PEFT's layout: A rows are expert-major (experts x r x in), B columns
    # rank-major (out x r x experts).
    a = a.reshape(experts, -1, a.shape[-1])
    b = b.reshape(b.shape[0], -1, experts).permute(2, 0, 1)
    btb = torch.einsum("eor,eos->ers", b, b)
    aat = torch.einsum("eri,esi->ers", a, a)
    squared = (btb * aat.transpose(1, 2)).sum().clamp_min(0)
    return float(layer.scaling[adapter] * squared.sqrt())


class _DeltaGate:
    """Scales a ParamWrapper's update while installed; ``remove()`` undoes it.

    Every method through which the installed peft computes the update is gated
    (``DELTA_METHODS``, those the layer has): gating only ``get_delta_weight``
    on a peft that forwards through ``get_delta_factors`` would scale nothing,
    and the experts would be ranked on a zero gradient."""

    DELTA_METHODS = ("get_delta_weight", "get_delta_factors")

    def __init__(self, layer: Any, gate: Callable[[], torch.Tensor]):
        self.layer = layer
        self.methods = [name for name in self.DELTA_METHODS if hasattr(layer, name)]
        for name in self.methods:
            # An instance attribute shadows the class's method.
            setattr(layer, name, getattr(self, f"_gated_{name}")(getattr(layer, name), gate))

    @staticmethod
    def _gated_get_delta_weight(original, gate):
        def gated(adapter_name, *args, **kwargs):
            delta = original(adapter_name, *args, **kwargs)
            return delta * gate().to(delta.dtype)

        return gated

    @staticmethod
    def _gated_get_delta_factors(original, gate):
        # (lhs, rhs, scaling) with update = scaling * lhs @ rhs: gating one factor gates the update.
        def gated(adapter_name, *args, **kwargs):
            lhs, rhs, scaling = original(adapter_name, *args, **kwargs)
            return lhs * gate().to(lhs.dtype), rhs, scaling

        return gated

    def remove(self) -> None:
        for name in self.methods:
            if name in vars(self.layer):
                delattr(self.layer, name)


def install_gate(layer: Any, gate: Callable[[], torch.Tensor], adapter: str = "default"):
    """Multiply the layer's LoRA update by ``gate()`` on every forward; returns
    a handle whose ``remove()`` restores the layer."""
    if _is_param_wrapper(layer):
        return _DeltaGate(layer, gate)

    def hook(module, inputs, output):
        return output * gate().to(output.dtype)

    return layer.lora_B[adapter].register_forward_hook(hook)
