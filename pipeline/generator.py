"""The generator: how a row, or a batch of rows, becomes one diffusers call.

Reads like a diffusers pipeline: `check_request` validates every input before any model work
(shapes included: CFG-shaped embeddings with guidance <= 1 give no error in diffusers, only a
wrong image), then numbered steps, then a typed result. The request schema is
`pipeline.requests`, loading is `pipeline.pipelines`, a call's laid-out inputs and its
result are `pipeline.call_inputs`, and what reaches into diffusers' internals is
`pipeline.diffusers_overrides`.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from core.errors import ErrorCode, ItemError
from pipeline.adapter_windows import FULL, AdapterWindows
from pipeline.call_inputs import CallInputs, GenerationResult, controls_of, image_seeds
from pipeline.diffusers_overrides import per_slot_control, prebuilt_ip_embeds, set_processor_scales
from pipeline.pipelines import WarmPipelines
from pipeline.requests import (
    AdapterInput,
    GenerationRequest,
    batch_key,
    direct_arguments,
    per_slot_scale,
)

log = logging.getLogger(__name__)


def _plain(scale: float | dict) -> float:
    assert not isinstance(scale, dict), "InstantStyle scales are never per slot"
    return float(scale)


class Generator(WarmPipelines):
    """The warm pipelines of one (base model, adapter set), called for rows; built in the
    worker process."""

    def check_request(self, request: GenerationRequest) -> None:
        names = tuple(a.adapter for a in request.adapters)
        if names != self.adapters:
            raise ItemError(
                ErrorCode.INTERNAL, f"request adapters {names} sent to pipeline {self.adapters}"
            )
        for spec, preset, (expected, clip_expected) in zip(
            request.adapters, self.presets, self._projection_shapes, strict=True
        ):
            _check_shape(spec.adapter, spec.pos, spec.neg, expected)
            if self.base.embeds == "cfg_tensor" and spec.pos.shape[0] != 1:
                raise ItemError(
                    ErrorCode.MODEL_ERROR, f"{preset.name} takes one reference's features"
                )
            if clip_expected is not None:
                if spec.clip_pos is None or spec.clip_neg is None:
                    raise ItemError(
                        ErrorCode.MODEL_ERROR, f"{preset.name} needs the face crop's CLIP embeds"
                    )
                _check_shape(spec.adapter, spec.clip_pos, spec.clip_neg, clip_expected)
                if spec.clip_pos.shape[0] != 1:
                    raise ItemError(ErrorCode.MODEL_ERROR, f"{preset.name} takes one face")
        if request.clip_skip is not None:
            # diffusers reads hidden_states[-(clip_skip + 1)] (SDXL: + 2): every encoder must
            # have that many layers, or the call fails with an IndexError deep inside
            layers = min(e.config.num_hidden_layers for e in self.text_encoders)
            if not 1 <= request.clip_skip < layers:
                raise ItemError(
                    ErrorCode.INVALID_ROW,
                    f"clip_skip must be within 1..{layers - 1} for this base model's text "
                    f"encoder ({layers} layers), got {request.clip_skip}",
                )
        width, height = self._size(request)
        multiple = self.size_multiple
        if width % multiple or height % multiple:
            raise ItemError(
                ErrorCode.INVALID_ROW, f"width/height must divide by {multiple}: {width}x{height}"
            )

    @torch.inference_mode()
    def generate(self, request: GenerationRequest) -> GenerationResult:
        """One row, the way the diffusers docs call a pipeline: k images of one prompt, the
        row's strengths set on the pipeline, its control image, init image and mask given
        once (inpainting: once per image, so that image k is seed + k's, see below)."""
        # 1. check inputs before any model work
        self.check_request(request)
        width, height = self._size(request)
        do_cfg = self._stacks_cfg(request)
        k = request.num_images

        # 2. embeddings: [neg, pos] stacked on a new batch axis only when CFG runs; FaceID-Plus
        #    face-crop embeds batched like the images ([neg x k, pos x k]). FLUX: the positive
        #    ones alone, the negative ones passed on their own (always: see `_negatives`)
        embeds = self._embeds_argument(
            [self._cfg_stack(spec.neg, spec.pos, 1, do_cfg) for spec in request.adapters]
        )
        negatives = self._negatives([[spec.neg] for spec in request.adapters])
        clip_embeds = [
            None
            if spec.clip_pos is None or spec.clip_neg is None
            else self._cfg_stack(spec.clip_neg, spec.clip_pos, k, do_cfg)
            for spec in request.adapters
        ]

        # 3. one seeded generator per image: image k matches a solo run with seed + k
        seeds = image_seeds(request.seed, k)
        generators = [torch.Generator(device="cpu").manual_seed(s) for s in seeds]

        # 4. the row's inputs as the docs pass them. Inpainting (and FLUX's and SD3.5's
        #    img2img) encodes a single init image with the first generator only, so images
        #    1.. would not be their seed's: it gets the init image and mask once per image
        per_image = request.mode == "inpaint" or self.base.denoiser == "transformer"
        inputs = CallInputs(
            scales=[spec.scale for spec in request.adapters],
            ip_masks=[self._region_masks(spec, width, height) for spec in request.adapters],
            controls=controls_of(request),
            control_scales=[(c.scale, c.start, c.end) for c in request.controls],
            init_images=None
            if request.init_image is None
            else [self._init_image(request.init_image, width, height)] * (k if per_image else 1),
            masks=None if request.mask is None else [request.mask] * k,
            # the stock call unless an adapter acts on part of the steps only
            windows=[[spec.window] for spec in request.adapters]
            if any(spec.window != FULL for spec in request.adapters)
            else None,
        )

        # 5. denoise and decode: diffusers' stock path, k images of one prompt
        self.set_vae_slicing(k)
        arrays = self._call(
            request,
            prompt=request.prompt,
            negative_prompt=self._negative_prompts([request], solo=True),
            embeds=embeds,
            negatives=negatives,
            clip_embeds=clip_embeds,
            per_prompt=k,
            generators=generators,
            inputs=inputs,
        )
        return GenerationResult(
            images=self._to_pil(arrays),
            seeds=seeds,
            width=width,
            height=height,
            arrays=arrays,
            warning=self.prompt_warning(request),
        )

    def _call(
        self,
        shared: GenerationRequest,
        *,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None,
        embeds: list[torch.Tensor] | torch.Tensor,
        negatives: list[torch.Tensor] | None,
        clip_embeds: list[torch.Tensor | None],
        per_prompt: int,
        generators: list[torch.Generator],
        inputs: CallInputs,
    ) -> list[np.ndarray]:
        """The one diffusers call both paths make: the per-slot inputs given, every shared
        field taken from `shared` (a row of the call: they are equal in all of them), the
        pipeline of the call's mode (text, img2img, inpaint; with its ControlNets)."""
        pipe = self._pipe_of(shared)
        pipe.scheduler = self.scheduler(shared.scheduler)  # set on every call, like strengths
        width, height = self._size(shared)
        # strengths: load_ip_adapter resets them, so they are set on every call
        scales = inputs.scales
        if any(isinstance(scale, torch.Tensor) for scale in scales):  # FLUX, SD3.5: per slot
            set_processor_scales(self.denoiser, scales)
        else:
            self.pipe.set_ip_adapter_scale(scales if len(scales) > 1 else scales[0])
        # FaceID-Plus reads the face crop's CLIP embeds from its projection layer: state on
        # the UNet, set for this call and cleared afterwards (it must not leak into the next)
        stateful = []
        for preset, layer, clip, spec in zip(
            self.presets, self._layers, clip_embeds, shared.adapters, strict=True
        ):
            if clip is not None:
                layer.clip_embeds = clip
                layer.shortcut = preset.shortcut
                layer.shortcut_scale = spec.shortcut_scale
                stateful.append(layer)
        arguments = self._call_arguments(pipe, shared, inputs, width=width, height=height)
        if inputs.windows is not None:  # the adapters' strengths, step by step
            windows = AdapterWindows(inputs.windows, list(scales), inputs.ip_masks)
            windows.begin(pipe)
            arguments["callback_on_step_end"] = windows
        if negatives is not None:
            arguments["negative_ip_adapter_image_embeds"] = negatives
        try:
            output = pipe(
                prompt=prompt,
                negative_prompt=negative_prompt,
                ip_adapter_image_embeds=embeds,
                num_images_per_prompt=per_prompt,
                generator=generators,
                output_type="np",
                **direct_arguments(shared),  # steps, guidance, strength, clip_skip...
                **arguments,
            )
        finally:
            for layer in stateful:
                layer.clip_embeds = None
                layer.shortcut = False
                layer.shortcut_scale = 1.0
        return list(output.images)

    def _call_arguments(
        self, pipe: Any, shared: GenerationRequest, inputs: CallInputs, *, width: int, height: int
    ) -> dict[str, Any]:
        """The mode's arguments, named as this pipeline class names them."""
        inputs.check()
        accepted = inspect.signature(pipe.__call__).parameters
        arguments: dict[str, Any] = {}
        if "width" in accepted:  # img2img takes its size from the (resized) init image
            arguments |= {"width": width, "height": height}
        if any(mask is not None for mask in inputs.ip_masks):
            arguments["cross_attention_kwargs"] = {"ip_adapter_masks": inputs.ip_masks}
        if shared.controls:
            name = "control_image" if "control_image" in accepted else "image"
            several = len(shared.controls) > 1
            arguments[name] = inputs.controls
            if several and inputs.slots is not None and self.base.denoiser == "transformer":
                # FLUX's multi-ControlNet call takes a list per net (SD's pipelines transpose
                # a list per slot themselves)
                arguments[name] = [list(net) for net in zip(*inputs.controls, strict=True)]
            scale, start, end = zip(*inputs.control_scales, strict=True)
            arguments["controlnet_conditioning_scale"] = list(scale) if several else scale[0]
            arguments["control_guidance_start"] = list(start) if several else start[0]
            arguments["control_guidance_end"] = list(end) if several else end[0]
        if inputs.init_images is not None:
            arguments["image"] = inputs.init_images
        if inputs.masks is not None:
            arguments["mask_image"] = inputs.masks
        return arguments

    def _pipe_of(self, request: GenerationRequest) -> Any:
        """The pipeline of the request's mode with its ControlNets (made on first use)."""
        return self.pipe_for(request.mode, tuple(c.model for c in request.controls))

    def _init_image(self, image: Image.Image, width: int, height: int) -> Image.Image:
        """The init image at the output's size, resized as diffusers' image processor does
        (img2img pipelines otherwise take the size from the image itself)."""
        if image.size == (width, height):
            return image
        return self.pipe.image_processor.resize(image, height=height, width=width)

    def _region_masks(
        self, spec: AdapterInput, width: int, height: int, scale: float | None = None
    ) -> torch.Tensor | None:
        """The adapter's regions as diffusers' IPAdapterMaskProcessor makes them, [1, refs, H,
        W], one channel per reference; times `scale` (a per-slot strength), or a constant
        `scale` where the row has no regions. None: no mask (no regions, no per-slot scale)."""
        from diffusers.image_processor import IPAdapterMaskProcessor

        refs = int(spec.pos.shape[0])
        if spec.regions is None:
            if scale is None:
                return None
            return torch.full((1, refs, height, width), float(scale), dtype=self.dtype)
        masks = IPAdapterMaskProcessor().preprocess(spec.regions, height=height, width=width)
        masks = masks.reshape(1, -1, height, width).to(self.dtype)
        if masks.shape[1] == 1 and refs > 1:  # one region for all the references
            masks = masks.repeat(1, refs, 1, 1)
        return masks if scale is None else masks * float(scale)

    def _size(self, request: GenerationRequest) -> tuple[int, int]:
        return request.width or self.native_size[0], request.height or self.native_size[1]

    def generate_batch(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """Several rows in one diffusers call, each with its own references, prompts, seeds,
        strengths, control images, regions, init images and masks.

        Rows must share `batch_key`. Each row's images match its solo run to within float
        rounding (CPU: ~2e-6 before the uint8 conversion). A single request takes diffusers'
        stock path (bitwise as diffusers). On CUDA out-of-memory the batch is split in halves
        and retried.
        """
        if len(requests) == 1 and not self.buckets:
            return [self.generate(requests[0])]
        keys = {batch_key(r) for r in requests}
        if len(keys) != 1:
            raise ItemError(ErrorCode.INTERNAL, "rows that cannot share a call were batched")
        for request in requests:
            self.check_request(request)
        try:
            return self._generate_slots(requests)
        except torch.OutOfMemoryError:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            half = len(requests) // 2
            log.warning(
                "out of memory with %d rows: retrying as %d + %d",
                len(requests),
                half,
                len(requests) - half,
            )
            return self.generate_batch(requests[:half]) + self.generate_batch(requests[half:])

    @torch.inference_mode()
    def _generate_slots(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        first = requests[0]
        width, height = self._size(first)
        do_cfg = self._stacks_cfg(first)
        # 1. one slot per output image: row i's image j is a prompt of its own (diffusers'
        #    num_images_per_prompt would repeat ONE set of IP embeds over the whole batch)
        slots = [(r, seed) for r in requests for seed in image_seeds(r.seed, r.num_images)]
        real = len(slots)
        if self.buckets:  # compiled: pad to a fixed batch size (copies of the last slot)
            size = next((b for b in self.buckets if b >= real), real)
            slots += [slots[-1]] * (size - real)
        rows = [r for r, _ in slots]
        generators = [torch.Generator(device="cpu").manual_seed(seed) for _, seed in slots]

        # 2. embeddings per slot, [neg_1..neg_S, pos_1..pos_S] like diffusers' own CFG layout
        def stacked(halves: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
            neg = torch.stack([n for n, _ in halves])
            pos = torch.stack([p for _, p in halves])
            tensor = torch.cat([neg, pos]) if do_cfg else pos
            return tensor.to(device=self.device, dtype=self.dtype)

        adapters = range(len(self.adapters))
        embeds = self._embeds_argument(
            [stacked([(r.adapters[a].neg, r.adapters[a].pos) for r in rows]) for a in adapters]
        )
        negatives = self._negatives([[r.adapters[a].neg for r in rows] for a in adapters])
        clip_embeds = [
            None
            if first.adapters[a].clip_pos is None
            else stacked([(r.adapters[a].clip_neg, r.adapters[a].clip_pos) for r in rows])  # type: ignore[misc]
            for a in adapters
        ]

        # 3. per-slot strengths and inputs. An adapter whose rows may differ in strength runs
        #    at 1.0 with each slot's strength as a constant mask (times its regions): diffusers
        #    multiplies the adapter's attention output by the mask, as it does by the scale.
        #    ControlNets run at 1.0 too, their residuals multiplied per slot (per_slot_control)
        scales: list[Any] = []
        ip_masks: list[torch.Tensor | None] = []
        for a in adapters:
            if self.base.row_scale == "processor":  # FLUX, SD3.5: a (batch, 1, 1) scale
                values = [_plain(r.adapters[a].scale) for r in rows] * (2 if do_cfg else 1)
                scales.append(
                    torch.tensor(values, dtype=self.dtype, device=self.device)[:, None, None]
                )
                ip_masks.append(None)
                continue
            by_mask = per_slot_scale(first.adapters[a])
            scales.append(1.0 if by_mask else first.adapters[a].scale)
            masks = [
                self._region_masks(
                    r.adapters[a],
                    width,
                    height,
                    scale=_plain(r.adapters[a].scale) if by_mask else None,
                )
                for r in rows
            ]
            if all(m is None for m in masks):
                ip_masks.append(None)
                continue
            mask = torch.cat(masks)  # type: ignore[arg-type]
            ip_masks.append(torch.cat([mask, mask]) if do_cfg else mask)
        inputs = CallInputs(
            scales=scales,
            ip_masks=ip_masks,
            controls=[controls_of(r) for r in rows] if first.controls else None,
            control_scales=[(1.0, 0.0, 1.0)] * len(first.controls),
            init_images=None
            if first.init_image is None
            else [self._init_image(r.init_image, width, height) for r in rows],  # type: ignore[arg-type]
            masks=None if first.mask is None else [r.mask for r in rows],  # type: ignore[misc]
            windows=[[r.adapters[a].window for r in rows] for a in adapters],
            slots=len(slots),
        )

        # 4. denoise and decode, with the per-slot embeds passed through unrepeated
        self.set_vae_slicing(len(slots))
        pipe = self._pipe_of(first)
        given = [embeds] if negatives is None else [embeds, negatives]
        with (
            prebuilt_ip_embeds(pipe, given, slots=len(slots), do_cfg=do_cfg),
            per_slot_control(pipe, rows, do_cfg=do_cfg),
        ):
            arrays = self._call(
                first,
                prompt=[r.prompt for r in rows],
                negative_prompt=self._negative_prompts(rows),
                embeds=embeds,
                negatives=negatives,
                clip_embeds=clip_embeds,
                per_prompt=1,
                generators=generators,
                inputs=inputs,
            )[:real]  # padding slots dropped

        # 5. hand each row its images back
        results = []
        for r in requests:
            mine, arrays = arrays[: r.num_images], arrays[r.num_images :]
            results.append(
                GenerationResult(
                    images=self._to_pil(mine),
                    seeds=image_seeds(r.seed, r.num_images),
                    width=width,
                    height=height,
                    arrays=mine,
                    warning=self.prompt_warning(r),
                )
            )
        return results

    def prompt_warning(self, request: GenerationRequest) -> str | None:
        """The text encoder reads a fixed number of tokens (77 for CLIP); diffusers drops the
        rest with only a log line. Say so in the item instead."""
        tokenizer, limit = self._prompt_reader
        notes = []
        for name, text in (
            ("prompt", request.prompt),
            ("negative_prompt", request.negative_prompt),
        ):
            if text:
                count = len(tokenizer(text, truncation=False).input_ids)
                if count > limit:
                    notes.append(
                        f"{name} is {count} tokens; the text encoder reads the first {limit}, "
                        "the rest was ignored"
                    )
        return "; ".join(notes) or None

    @functools.cached_property
    def _prompt_reader(self) -> tuple[Any, int]:
        """The tokenizer that reads the whole prompt, and how many tokens it reads: T5's
        (FLUX, SD3.5) or ChatGLM's (Kolors), the pipeline's `max_sequence_length`; else
        CLIP's, its `model_max_length` (77)."""
        call = inspect.signature(self.pipe.__call__).parameters
        if "max_sequence_length" in call:
            names = ("tokenizer_3", "tokenizer_2", "tokenizer")  # the last one's
            tokenizer = next(t for n in names if (t := getattr(self.pipe, n, None)) is not None)
            return tokenizer, int(call["max_sequence_length"].default)  # FLUX 512, others 256
        return self.pipe.tokenizer, int(self.pipe.tokenizer.model_max_length)

    def _to_pil(self, arrays: list[np.ndarray]) -> list[Image.Image]:
        """diffusers' own float -> uint8 conversion (what output_type="pil" does)."""
        return list(self.pipe.image_processor.numpy_to_pil(np.stack(arrays)))

    def _cfg_stack(
        self, neg: torch.Tensor, pos: torch.Tensor, repeat: int, do_cfg: bool
    ) -> torch.Tensor:
        """[n, ...] halves -> [(2 if CFG) * repeat, n, ...], negative first like diffusers."""
        pos_b = pos.unsqueeze(0).repeat_interleave(repeat, dim=0)
        tensor = (
            torch.cat([neg.unsqueeze(0).repeat_interleave(repeat, dim=0), pos_b])
            if (do_cfg)
            else pos_b
        )
        return tensor.to(device=self.device, dtype=self.dtype)


def _check_shape(
    adapter: str, pos: torch.Tensor, neg: torch.Tensor, expected: tuple[int, ...]
) -> None:
    trailing = tuple(pos.shape[1:])
    fits = len(trailing) == len(expected) and all(
        e in (-1, t) for e, t in zip(expected, trailing, strict=True)
    )
    if pos.ndim < 2 or not fits or neg.shape != pos.shape:
        raise ItemError(
            ErrorCode.MODEL_ERROR,
            f"embedding for adapter {adapter!r} has shape {tuple(pos.shape)}; "
            f"its projection takes [n, {', '.join(map(str, expected))}]",
        )
