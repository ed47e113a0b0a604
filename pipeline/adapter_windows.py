"""The adapters' step windows: each adapter acts on a fraction of the steps, per row.

A row's adapter acts on step i of the n the pipeline runs when `i / n >= start` (the rule
diffusers applies to a ControlNet's `control_guidance_start`) and `i <= int(n * end)` (the rule
of diffusers' `IPAdapterScaleCutoffCallback`, which sets the scale to 0 after step
`int(n * cutoff_step_ratio)`). Outside its window the adapter's strength is 0 for that row only.

`AdapterWindows` is the call's `callback_on_step_end`: after step i it sets every adapter's
strength for step i + 1, through what carries it in that call: a per-slot mask (each slot's
strength times its regions, `cross_attention_kwargs["ip_adapter_masks"]`) or a per-slot
processor scale (FLUX, SD3.5) multiplied in place by each slot's 0 or 1; otherwise the
pipeline's `set_ip_adapter_scale` (one window for the whole call, which `batch_key` ensures).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

Window = tuple[float, float]
FULL: Window = (0.0, 1.0)


def acts(window: Window, step: int, steps: int) -> bool:
    """Whether an adapter with this window acts on step `step` (0-based) of `steps`."""
    start, end = window
    return not (step / steps < start or step > int(steps * end))


@dataclass
class AdapterWindows:
    """One call's adapter strengths, step by step (see the module's docstring).

    `windows[a][s]`: adapter a's window in slot s (the solo path: one slot, the row);
    `scales[a]`: what the call set as adapter a's strength (a number or block dict, or a
    per-slot processor tensor); `masks[a]`: its per-slot masks, or None. Tensors hold one row
    per slot, or two per slot under CFG ([negative slots; positive slots])."""

    windows: list[list[Window]]
    scales: list[Any]
    masks: list[torch.Tensor | None]
    _originals: list[torch.Tensor | None] = field(default_factory=list, repr=False)
    _applied: list[tuple[bool, ...]] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        self._originals = [
            mask.clone() if mask is not None else scale.clone() if _is_tensor(scale) else None
            for mask, scale in zip(self.masks, self.scales, strict=True)
        ]
        self._applied = [tuple(True for _ in slots) for slots in self.windows]

    def begin(self, pipe: Any) -> None:
        """The strengths of step 0 (any step count: 0 / n is 0), set before the call."""
        self._apply(pipe, 0, 1)

    def __call__(
        self, pipe: Any, step: int, timestep: Any, callback_kwargs: dict[str, Any]
    ) -> dict[str, Any]:
        """diffusers' `callback_on_step_end`, after step `step`: the strengths of the next."""
        self._apply(pipe, step + 1, pipe.num_timesteps)
        return callback_kwargs

    def _apply(self, pipe: Any, step: int, steps: int) -> None:
        shared: list[Any] = []
        call_wide = False
        for a, slots in enumerate(self.windows):
            on = tuple(acts(w, step, steps) for w in slots)
            mask = self.masks[a]
            target = mask if mask is not None else self.scales[a]
            if isinstance(target, torch.Tensor):
                if on != self._applied[a]:
                    original = self._originals[a]
                    assert original is not None
                    target.copy_(original * _factors(on, original))
                shared.append(self.scales[a])
            else:
                if len(set(on)) > 1:
                    raise RuntimeError("slots of one call-wide strength have different windows")
                call_wide = call_wide or on != self._applied[a]
                shared.append(self.scales[a] if on[0] else 0.0)
            self._applied[a] = on
        if call_wide:
            pipe.set_ip_adapter_scale(shared if len(shared) > 1 else shared[0])


def _is_tensor(value: Any) -> bool:
    return isinstance(value, torch.Tensor)


def _factors(on: tuple[bool, ...], like: torch.Tensor) -> torch.Tensor:
    """Each slot's 0 or 1, repeated for CFG's halves, shaped to multiply `like` row-wise."""
    repeat, rest = divmod(like.shape[0], len(on))
    assert rest == 0, f"{like.shape[0]} rows for {len(on)} slots"
    values = torch.tensor([float(v) for v in on] * repeat, dtype=like.dtype, device=like.device)
    return values.view(-1, *[1] * (like.ndim - 1))
