"""Training an IP-Adapter with the paper's recipe (section 3.3 and 4.1.2; tencent's
tutorial_train.py / tutorial_train_plus.py), on diffusers' own classes.

- Frozen: the UNet, the text encoder, the VAE, the CLIP image encoder. Trained: the image
  projection and the new key/value projections of every cross-attention layer (22,319,616
  parameters for SD1.5 base), kept in fp32 whatever precision the UNet runs in.
- Loss: the noise-prediction MSE of the UNet conditioned on the text and the image tokens.
- Mixed precision (tencent trains through accelerate): the UNet stays fp32 and runs under
  autocast; fp16 scales the loss (torch.amp.GradScaler, accelerate's scaled backward) so the
  adapter's small gradients do not flush to zero, and skips the steps whose gradients
  overflow (counted: `skipped_steps`); bf16 has fp32's range and runs unscaled.
- Classifier-free guidance: one u ~ U(0, 1) per sample; u < 0.05 drops the image (zeros for
  the base adapter, the encoder output of an all-zero image for plus: the negative half the
  embed stage caches), u < 0.10 drops the text ("" through the text encoder), u < 0.15 both.
- Everything is precomputed (`Example`): the VAE latent mean/std of the target (a latent is
  sampled each step, as the reference code does with no augmentation), the text embedding,
  the reference's image embedding. The loop reads tensors only.

Every random draw comes from one seeded generator whose state is part of a checkpoint, so a
run resumed from a checkpoint takes the same steps as one that was never interrupted.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from pipeline.adapter_weights import (
    ProjectionShape,
    adapter_parameter_count,
    freeze_all_but_adapter,
    from_h94,
    install,
)
from pipeline.presets import Projection
from pipeline.train_schema import TrainSettings


@dataclass(frozen=True)
class Example:
    """One training row, precomputed: latent_mean/std [4, h, w]; text [77, cross_dim];
    image/image_neg [1, D] (base) or [1, tokens, hidden] (plus). SDXL also: the pooled text
    embedding [pooled_dim] and the time ids [6] (original height, width; crop top, left;
    target height, width), as tutorial_train_sdxl.py feeds its UNet."""

    latent_mean: torch.Tensor
    latent_std: torch.Tensor
    text: torch.Tensor
    image: torch.Tensor
    image_neg: torch.Tensor
    pooled: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None


@dataclass(frozen=True)
class StepResult:
    step: int  # steps done after this one
    loss: float
    learning_rate: float
    skipped: bool = False  # fp16: the gradients overflowed, the optimizer did not step


class AdapterTrainer:
    """The adapter on a frozen UNet, an AdamW over its parameters, the loss scale (fp16),
    the step counter and the run's random generator: everything a checkpoint holds."""

    def __init__(
        self,
        unet: Any,
        scheduler: Any,
        *,
        shape: ProjectionShape,
        settings: TrainSettings,
        uncond_text: torch.Tensor,
        uncond_pooled: torch.Tensor | None = None,
        init_weights: dict[str, torch.Tensor] | None = None,
        vae_scaling_factor: float = 0.18215,
        loss_scale: float = 2.0**16,
    ) -> None:
        self.unet = unet
        self.scheduler = scheduler  # a DDPMScheduler: add_noise and the training timesteps
        self.shape = shape
        self.settings = settings
        self.device = unet.device
        self.uncond_text = uncond_text.to(self.device)  # [77, cross_dim]: "" encoded
        # SDXL: the pooled embedding of "" (a dropped text drops its pooled embedding too)
        self.uncond_pooled = None if uncond_pooled is None else uncond_pooled.to(self.device)
        self.scaling = vae_scaling_factor
        with torch.random.fork_rng(devices=[]):  # a fresh projection's init: the run's seed
            torch.manual_seed(settings.seed)
            install(unet, shape)
        if init_weights is not None:
            from_h94(unet, shape, init_weights)
        self.parameters = freeze_all_but_adapter(unet)
        if settings.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        self.optimizer = torch.optim.AdamW(
            list(self.parameters.values()),
            lr=settings.learning_rate,
            weight_decay=settings.weight_decay,
        )
        # fp16: the loss times a scale (halved after an overflow, doubled after 2000 clean
        # steps: torch's defaults, which accelerate uses); disabled, it is a plain backward
        self.scaler = torch.amp.GradScaler(
            self.device.type, init_scale=loss_scale, enabled=settings.mixed_precision == "fp16"
        )
        self.rng = torch.Generator().manual_seed(settings.seed)
        self.step = 0
        self.skipped_steps = 0

    @property
    def trainable_count(self) -> int:
        return sum(p.numel() for p in self.parameters.values())

    @property
    def adapter_count(self) -> int:
        return adapter_parameter_count(self.unet)

    def _autocast(self) -> Any:
        precision = self.settings.mixed_precision
        if precision == "no":
            return nullcontext()
        dtype = torch.float16 if precision == "fp16" else torch.bfloat16
        return torch.autocast(self.device.type, dtype=dtype)

    def _draw(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        """This step's batch and noise, every draw from the run's generator (on the CPU, so a
        resumed run draws the same numbers on any device)."""
        g = self.rng
        size = self.settings.batch_size
        n = len(examples)
        picks = (
            torch.randperm(n, generator=g)[:size]
            if n >= size
            else torch.randint(0, n, (size,), generator=g)
        )
        batch = [examples[int(i)] for i in picks]
        mean = torch.stack([e.latent_mean for e in batch])
        std = torch.stack([e.latent_std for e in batch])
        latents = (mean + std * torch.randn(mean.shape, generator=g)) * self.scaling
        noise = torch.randn(latents.shape, generator=g)
        steps = self.scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, steps, (size,), generator=g)
        u = torch.rand(size, generator=g)
        s = self.settings
        drop_image = u < s.drop_image
        drop_text = (u >= s.drop_image) & (u < s.drop_image + s.drop_text)
        drop_both = (u >= s.drop_image + s.drop_text) & (
            u < s.drop_image + s.drop_text + s.drop_both
        )
        draw = {
            "latents": latents,
            "noise": noise,
            "timesteps": timesteps,
            "text": torch.stack([e.text for e in batch]),
            "image": torch.stack([e.image for e in batch]),
            "image_neg": torch.stack([e.image_neg for e in batch]),
            "no_image": drop_image | drop_both,
            "no_text": drop_text | drop_both,
        }
        if self.uncond_pooled is not None:  # SDXL's added conditions
            draw["pooled"] = torch.stack([e.pooled for e in batch])  # type: ignore[misc]
            draw["time_ids"] = torch.stack([e.time_ids for e in batch])  # type: ignore[misc]
        return draw

    def loss(self, draw: dict[str, torch.Tensor], *, force_no_image: bool = False) -> torch.Tensor:
        """The noise-prediction loss of one drawn batch (`force_no_image`: every image
        dropped, to see how much the adapter's image tokens help)."""
        device = self.device
        latents = draw["latents"].to(device)
        noise = draw["noise"].to(device)
        timesteps = draw["timesteps"].to(device)
        no_image = draw["no_image"].to(device)
        if force_no_image:
            no_image = torch.ones_like(no_image)
        no_text = draw["no_text"].to(device)
        text = torch.where(
            no_text[:, None, None],
            self.uncond_text.expand_as(draw["text"]),
            draw["text"].to(device),
        )
        shape = (-1,) + (1,) * (draw["image"].dim() - 1)
        image = torch.where(
            no_image.view(shape), draw["image_neg"].to(device), draw["image"].to(device)
        )
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        unet_dtype = self.unet.dtype
        added: dict[str, Any] = {"image_embeds": [image]}  # [B, 1, ...] for one adapter
        if self.uncond_pooled is not None:  # SDXL: pooled text ("" when dropped), time ids
            given = draw["pooled"].to(device)
            pooled = torch.where(no_text[:, None], self.uncond_pooled.expand_as(given), given)
            added |= {
                "text_embeds": pooled.to(device, unet_dtype),
                "time_ids": draw["time_ids"].to(device, unet_dtype),
            }
        with self._autocast():
            prediction = self.unet(
                noisy.to(unet_dtype),
                timesteps,
                encoder_hidden_states=text.to(unet_dtype),
                added_cond_kwargs=added,
            ).sample
        if self.scheduler.config.prediction_type == "v_prediction":
            target = self.scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        return torch.nn.functional.mse_loss(prediction.float(), target.float())

    def train_step(self, examples: Sequence[Example]) -> StepResult:
        self.unet.train()
        loss = self.loss(self._draw(examples))
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        scale = self.scaler.get_scale()
        self.scaler.step(self.optimizer)  # unscales the gradients; no step if any is inf/NaN
        self.scaler.update()
        skipped = self.scaler.get_scale() < scale  # an overflow halves the scale
        self.skipped_steps += skipped
        self.step += 1
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(f"the loss is {value} at step {self.step}")
        return StepResult(self.step, value, self.optimizer.param_groups[0]["lr"], skipped)

    # --- checkpoints: the adapter, AdamW's moments, the generator and the step, as tensors
    def state(self) -> dict[str, torch.Tensor]:
        """A checkpoint as a flat dict of tensors (safetensors: no pickle)."""
        out: dict[str, torch.Tensor] = {
            "step": torch.tensor(self.step, dtype=torch.int64),
            "rng": self.rng.get_state(),
            "skipped_steps": torch.tensor(self.skipped_steps, dtype=torch.int64),
        }
        if self.scaler.is_enabled():
            scaler = self.scaler.state_dict()
            out["scaler.scale"] = torch.tensor(scaler["scale"], dtype=torch.float64)
            out["scaler.growth_tracker"] = torch.tensor(scaler["_growth_tracker"])
        for index, (name, param) in enumerate(self.parameters.items()):
            out[f"param.{name}"] = param.detach().cpu().clone()
            moments = self.optimizer.state.get(param, {})
            for key in ("step", "exp_avg", "exp_avg_sq"):
                if key in moments:
                    out[f"adam.{index}.{key}"] = moments[key].detach().cpu().clone()
        return out

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        names = list(self.parameters)
        missing = [n for n in names if f"param.{n}" not in state]
        if missing:
            raise ValueError(f"the checkpoint lacks adapter weights: {missing[:3]}")
        with torch.no_grad():
            for index, name in enumerate(names):
                param = self.parameters[name]
                param.copy_(state[f"param.{name}"])
                if f"adam.{index}.exp_avg" in state:
                    self.optimizer.state[param] = {
                        key: state[f"adam.{index}.{key}"]
                        .to(param.device if key != "step" else "cpu")
                        .clone()
                        for key in ("step", "exp_avg", "exp_avg_sq")
                    }
        self.rng.set_state(state["rng"])
        self.step = int(state["step"])
        self.skipped_steps = int(state.get("skipped_steps", torch.tensor(0)))
        if self.scaler.is_enabled() and "scaler.scale" in state:
            scaler = self.scaler.state_dict()
            scaler["scale"] = float(state["scaler.scale"])
            scaler["_growth_tracker"] = int(state["scaler.growth_tracker"])
            self.scaler.load_state_dict(scaler)


def training_crop(
    width: int, height: int, resolution: int
) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
    """tencent's `transforms.Resize(resolution)` + `CenterCrop(resolution)` with torchvision's
    arithmetic (not imported: see facts.md): the shorter side becomes `resolution`, the longer
    `int(resolution * long / short)` (truncated); the crop starts at `int(round((side -
    resolution) / 2))` (Python's round: halves to even). Returns the resized (width, height)
    and the crop box (left, top, right, bottom)."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(resolution * long / short)
    size = (resolution, new_long) if width <= height else (new_long, resolution)
    left = int(round((size[0] - resolution) / 2.0))
    top = int(round((size[1] - resolution) / 2.0))
    return size, (left, top, left + resolution, top + resolution)


def sdxl_training_crop(
    width: int, height: int, resolution: int
) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
    """tutorial_train_sdxl.py's crop: the same `transforms.Resize(resolution)` (shorter side
    to `resolution`, the longer truncated), then a centre crop whose offsets are floored
    (`delta // 2`, not CenterCrop's rounding). Returns the resized (width, height) and the crop
    box (left, top, right, bottom); (top, left) go to the UNet as the crop's time ids."""
    size, _ = training_crop(width, height, resolution)
    top, left = (size[1] - resolution) // 2, (size[0] - resolution) // 2
    return size, (left, top, left + resolution, top + resolution)


class TrainingEncoders:
    """The frozen parts of the base model that make the training tensors: the VAE (latent
    mean/std of a target image) and the tokenizer + text encoder (a prompt's embedding). A
    base model with a second text encoder (SDXL) trains as tutorial_train_sdxl.py does: both
    encoders' penultimate hidden states, the second's pooled embedding, and time ids."""

    def __init__(self, base_folder: str, *, device: torch.device, local_files_only: bool):
        from pathlib import Path

        from diffusers import AutoencoderKL
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        from pipeline.models import folder_fingerprint, loading

        self.device = device
        self.sdxl = (Path(base_folder) / "text_encoder_2").is_dir()
        with loading(f"the base model at {base_folder}", base_folder):
            opts: dict[str, Any] = {"local_files_only": local_files_only}
            self.vae = AutoencoderKL.from_pretrained(base_folder, subfolder="vae", **opts)
            self.tokenizers = [
                CLIPTokenizer.from_pretrained(base_folder, subfolder="tokenizer", **opts)
            ]
            self.text_encoders: list[Any] = [
                CLIPTextModel.from_pretrained(base_folder, subfolder="text_encoder", **opts)
            ]
            if self.sdxl:
                self.tokenizers.append(
                    CLIPTokenizer.from_pretrained(base_folder, subfolder="tokenizer_2", **opts)
                )
                self.text_encoders.append(
                    CLIPTextModelWithProjection.from_pretrained(
                        base_folder, subfolder="text_encoder_2", **opts
                    )
                )
        self.vae.to(device).eval().requires_grad_(False)  # fp32: SDXL's VAE needs it
        for encoder in self.text_encoders:
            encoder.eval().requires_grad_(False)
            encoder.to(device)
        patterns = ("vae/*.json", "vae/*.safetensors", "vae/*.bin")
        self.vae_fingerprint = "vae-" + folder_fingerprint(base_folder, patterns)[:16]
        patterns = ("text_encoder*/*.json", "text_encoder*/*.safetensors", "tokenizer*/*")
        self.text_fingerprint = "text-" + folder_fingerprint(base_folder, patterns)[:16]
        self.scaling_factor = float(self.vae.config.scaling_factor)
        # what the latent cache's entries are made with (`latent`'s crop): bump when it changes
        # (v2: torchvision's crop arithmetic, `training_crop`; v1 rounded the longer side and
        # floored the crop's offset; sdxl-v1: `sdxl_training_crop`, with the time ids)
        self.latent_version = "sdxl-v1" if self.sdxl else "v2"

    @torch.inference_mode()
    def latent(self, image: Any, resolution: int) -> dict[str, torch.Tensor]:
        """The target's VAE latent distribution: resized (shorter side, bilinear) and
        centre-cropped to `resolution`, scaled to [-1, 1] (tutorial_train.py's transforms;
        SDXL: tutorial_train_sdxl.py's crop, and the time ids it gives the UNet)."""
        import numpy as np
        from PIL import Image

        rgb = image.convert("RGB")
        crop = sdxl_training_crop if self.sdxl else training_crop
        size, box = crop(rgb.width, rgb.height, resolution)
        original = (rgb.height, rgb.width)
        if size != rgb.size:
            rgb = rgb.resize(size, Image.Resampling.BILINEAR)
        rgb = rgb.crop(box)
        pixels = torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 127.5 - 1.0)
        pixels = pixels.permute(2, 0, 1)[None].to(self.device, self.vae.dtype)
        dist = self.vae.encode(pixels).latent_dist
        out = {"mean": dist.mean[0].float().cpu(), "std": dist.std[0].float().cpu()}
        if self.sdxl:  # original size, crop top-left, target size: (height, width) pairs
            left, top = box[0], box[1]
            ids = [*original, top, left, resolution, resolution]
            out["time_ids"] = torch.tensor(ids, dtype=torch.float32)
        return out

    @torch.inference_mode()
    def text(self, prompt: str) -> dict[str, torch.Tensor]:
        """{"text": [77, cross_dim]}: the prompt padded to the tokenizer's length, the
        encoder's last hidden states (what the pipeline's `encode_prompt` gives without CLIP
        skip). SDXL: both encoders' penultimate hidden states side by side, and "pooled", the
        second encoder's projected embedding (tutorial_train_sdxl.py)."""
        outputs = []
        for tokenizer, encoder in zip(self.tokenizers, self.text_encoders, strict=True):
            tokens = tokenizer(
                prompt,
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            )
            outputs.append(
                encoder(tokens.input_ids.to(self.device), output_hidden_states=self.sdxl)
            )
        if not self.sdxl:
            return {"text": outputs[0][0][0].float().cpu()}
        hidden = torch.cat([o.hidden_states[-2] for o in outputs], dim=-1)
        return {"text": hidden[0].float().cpu(), "pooled": outputs[1][0][0].float().cpu()}


def load_trainer(
    base_folder: str,
    *,
    image_encoder_folder: str,
    projection: Projection,
    settings: TrainSettings,
    encoders: TrainingEncoders,
    init: dict[str, torch.Tensor] | None,
    device: torch.device,
    local_files_only: bool,
) -> AdapterTrainer:
    """The frozen UNet (fp32 in every precision, as tencent's script keeps it: autocast
    runs it in fp16/bf16) and the DDPM scheduler of the base model, with a fresh adapter of
    `projection` shaped for the image encoder, or `init`'s (an h94-layout state)."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPVisionConfig

    from pipeline.models import loading

    with loading(f"the base model at {base_folder}", base_folder):
        unet = UNet2DConditionModel.from_pretrained(
            base_folder, subfolder="unet", local_files_only=local_files_only
        )
        scheduler = DDPMScheduler.from_pretrained(
            base_folder, subfolder="scheduler", local_files_only=local_files_only
        )
    unet.to(device)
    uncond = encoders.text("")
    if init is None:
        encoder = CLIPVisionConfig.from_pretrained(image_encoder_folder)
        shape = ProjectionShape.fresh(projection, unet, encoder)
    else:
        shape = ProjectionShape.of_file(init)
    return AdapterTrainer(
        unet,
        scheduler,
        shape=shape,
        settings=settings,
        uncond_text=uncond["text"],
        uncond_pooled=uncond.get("pooled"),
        init_weights=init,
        vae_scaling_factor=encoders.scaling_factor,
    )
