"""A tiny Kolors (Kwai-Kolors/Kolors-diffusers) in its repository's layout, for the `kolors`
family of `ipbatch models tiny`: ChatGLM3 as the text encoder (with its SentencePiece
tokenizer, trained here on a few sentences), an SDXL-shaped UNet that projects ChatGLM's
states (`text_proj`), the Kolors scheduler. Random weights, shapes from diffusers' Kolors
tests. Its IP-Adapter (h94's layout) and encoder are written by `pipeline.tiny`."""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

import torch

from pipeline import tiny

GLM_DIM = 32  # ChatGLM3-6B's width: 4096


def _tokenizer_model(path: Path) -> None:
    """A small SentencePiece BPE model (ChatGLM's tokenizer format), trained on a few
    sentences: every byte is in it (byte fallback), so any prompt tokenizes."""
    import sentencepiece as spm

    text = [
        "a red cube",
        "two blue spheres on grass",
        "a leather bag on a marble table",
        "a catalog photo of a product in soft light",
        "the quick brown fox jumps over the lazy dog",
    ] * 20
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text),
        model_writer=model,
        vocab_size=300,
        model_type="bpe",
        character_coverage=1.0,
        byte_fallback=True,
        bos_id=1,
        eos_id=2,
        unk_id=0,
        pad_id=-1,
        minloglevel=2,
        hard_vocab_limit=False,
        num_threads=1,
    )
    path.write_bytes(model.getvalue())


def kolors_base(folder: Path) -> None:
    with tempfile.TemporaryDirectory() as scratch:  # the tokenizer reads its file when saved
        vocabulary = Path(scratch) / "tokenizer.model"
        _tokenizer_model(vocabulary)
        _kolors_base(folder, vocabulary)


def _kolors_base(folder: Path, vocabulary: Path) -> None:
    from diffusers import EulerDiscreteScheduler, KolorsPipeline, UNet2DConditionModel
    from diffusers.pipelines.kolors import ChatGLMModel, ChatGLMTokenizer
    from diffusers.pipelines.kolors.text_encoder import ChatGLMConfig, RMSNorm

    tokenizer = ChatGLMTokenizer(vocab_file=str(vocabulary))
    torch.manual_seed(7)
    glm = ChatGLMModel(
        ChatGLMConfig(
            num_layers=2,
            padded_vocab_size=320,
            hidden_size=GLM_DIM,
            ffn_hidden_size=64,
            kv_channels=8,
            num_attention_heads=4,
            seq_length=256,
            multi_query_attention=True,
            multi_query_group_num=2,
            original_rope=True,
        ),
        empty_init=False,
    )
    for module in glm.modules():  # ChatGLM's RMSNorm weights are torch.empty(): fill them
        if isinstance(module, RMSNorm):
            module.weight.data.fill_(1.0)
    time_dim = 8
    unet = UNet2DConditionModel(  # SDXL's blocks (as Kolors'), tiny
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=tiny.SAMPLE_SIZE,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        transformer_layers_per_block=(1, 1),
        use_linear_projection=True,
        cross_attention_dim=tiny.KOLORS_CROSS_DIM,
        encoder_hid_dim=GLM_DIM,  # ChatGLM's states, projected to the cross-attention width
        encoder_hid_dim_type="text_proj",
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=GLM_DIM + 6 * time_dim,
        norm_num_groups=8,
    )
    scheduler = EulerDiscreteScheduler(  # Kolors-diffusers' scheduler config
        beta_start=0.00085,
        beta_end=0.014,
        beta_schedule="scaled_linear",
        num_train_timesteps=1100,
        steps_offset=1,
        timestep_spacing="leading",
    )
    pipe = KolorsPipeline(
        vae=tiny._vae(),
        text_encoder=glm,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)  # type: ignore[attr-defined]
