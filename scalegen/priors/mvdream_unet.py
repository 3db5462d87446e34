"""MVDream's multi-view UNet on diffusers' ``UNet2DConditionModel`` (Shi et al. 2023, sd-v2.1-base-4view).

MVDream is Stable Diffusion 2.1's UNet plus two things, and that is all this module adds:

* a camera embedding: ``camera_embed`` = Linear(16 -> 1280), SiLU, Linear(1280 -> 1280) of the flattened
  4x4 camera-to-world matrix, added to the timestep embedding. diffusers' ``class_embed_type="projection"``
  slot is exactly that MLP (``class_embedding.linear_1 / linear_2``, added to the time embedding), so the
  camera goes in as ``class_labels``;
* multi-view self-attention: the self-attention (``attn1``) of every transformer block attends over the
  tokens of all F views of an object: ``(b f) l c -> b (f l) c`` before attention and back after, while
  cross-attention (``attn2``) and the feed-forward stay per view (``MultiViewAttnProcessor``).

Rows of a batch are B objects x F contiguous views. ``MultiViewUNet`` installs the processor on every
attention when it is built, so the multi-view attention survives ``save_pretrained`` / ``from_pretrained``
(diffusers saves no processor; the class name in ``config.json`` brings it back).
"""
from __future__ import annotations

import functools

from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0
from torch import Tensor

CAMERA_DIM = 16  # a flattened 4x4 camera-to-world matrix


class MultiViewAttnProcessor:
    """Self-attention over the tokens of all ``num_frames`` views of an object; cross-attention per
    view. ``inner`` computes the attention itself (default: diffusers' scaled-dot-product processor;
    the FLOPs benchmark passes diffusers' explicit-matmul ``AttnProcessor``)."""

    def __init__(self, inner=None):
        self.inner = inner if inner is not None else AttnProcessor2_0()

    def __call__(self, attn, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, temb: Tensor | None = None, num_frames: int = 1) -> Tensor:
        if encoder_hidden_states is not None or num_frames == 1:  # cross-attention, or one view per object
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        bf, length, channels = hidden_states.shape
        if bf % num_frames:
            raise ValueError(f"{bf} rows do not split into objects of {num_frames} views")
        joint = hidden_states.reshape(bf // num_frames, num_frames * length, channels)  # (b f) l c -> b (f l) c
        out = self.inner(attn, joint, None, attention_mask, temb)
        return out.reshape(bf, length, channels)


class MultiViewUNet(UNet2DConditionModel):
    """diffusers' UNet with MVDream's camera embedding (``class_embed_type="projection"``,
    ``projection_class_embeddings_input_dim=16``) and multi-view self-attention. Built from the same
    config keys as ``UNet2DConditionModel``; ``forward(x, t, context, camera, num_frames)``."""

    @functools.wraps(UNet2DConditionModel.__init__)  # same signature: diffusers reads the config keys from it
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.use_multiview_attention()

    def use_multiview_attention(self, inner=None) -> None:
        """Put ``MultiViewAttnProcessor(inner)`` on every attention layer."""
        self.set_attn_processor(MultiViewAttnProcessor(inner))

    def forward(self, sample: Tensor, timestep: Tensor, encoder_hidden_states: Tensor, camera: Tensor,
                num_frames: int = 1, return_dict: bool = True):
        """``sample`` [B*F, C, h, w] (B objects x F contiguous views), ``timestep`` [B*F], ``encoder_hidden_states``
        [B*F, L, D], ``camera`` [B*F, 16] (flattened camera-to-world in MVDream's convention)."""
        if sample.shape[0] % num_frames:
            raise ValueError(f"{sample.shape[0]} rows do not split into objects of {num_frames} views")
        return super().forward(sample, timestep, encoder_hidden_states, class_labels=camera,
                               cross_attention_kwargs={"num_frames": num_frames}, return_dict=return_dict)


def mvdream_unet_config(model_channels: int = 320, channel_mult=(1, 2, 4, 4), num_res_blocks: int = 2,
                        attention_resolutions=(4, 2, 1), num_head_channels: int = 64, context_dim: int = 1024,
                        in_channels: int = 4, out_channels: int = 4, camera_dim: int = CAMERA_DIM,
                        use_linear_in_transformer: bool = True, transformer_depth: int = 1,
                        image_size: int = 32) -> dict:
    """The diffusers config of an MVDream UNet given in the official (LDM) terms; the defaults are
    sd-v2.1-base-4view's (mvdream/configs/sd-v2-base.yaml)."""
    levels = len(channel_mult)
    attn = [2**level in attention_resolutions for level in range(levels)]
    channels = tuple(model_channels * m for m in channel_mult)
    if any(c % num_head_channels for c in channels):
        raise ValueError(f"block channels {channels} do not split into heads of {num_head_channels}")
    return dict(
        sample_size=image_size, in_channels=in_channels, out_channels=out_channels, layers_per_block=num_res_blocks,
        block_out_channels=channels,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        # diffusers' SD2 convention: ``attention_head_dim`` holds the number of heads per level
        attention_head_dim=tuple(c // num_head_channels for c in channels),
        cross_attention_dim=context_dim, use_linear_projection=use_linear_in_transformer,
        transformer_layers_per_block=transformer_depth, norm_num_groups=32, norm_eps=1e-5, act_fn="silu",
        flip_sin_to_cos=True, freq_shift=0, downsample_padding=1, mid_block_scale_factor=1,
        class_embed_type="projection", projection_class_embeddings_input_dim=camera_dim,
    )


__all__ = ["MultiViewUNet", "MultiViewAttnProcessor", "mvdream_unet_config", "CAMERA_DIM"]
