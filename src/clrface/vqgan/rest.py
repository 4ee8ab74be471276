"""VQVAE-Rest (paper Table 4, an ablation baseline): the VQGAN encoder fine-tuned to restore.

E'(x^d, x^id) -> latent, decoded by the frozen G(Q(.)); the encoder sees the degraded face and the IRN's
estimate side by side (6 input channels). It starts as E(x^id): the x^d half of the first convolution is zero,
so training only has to learn what x^d adds.

Checkpoint folder (kind ``"rest_encoder"``): ``config.json`` holds the VQGAN's config, ``model.safetensors``
the encoder.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from clrface.checkpoint import load_weights, read_config
from clrface.vqgan.model import VQGAN, Encoder, VQGANConfig


class RestEncoder(nn.Module):
    """forward(x_d [B,3,S,S], x_id [B,3,S,S], both in [-1,1]) -> latent [B,d,S/f,S/f] fp32 (VQGAN.encode's space)."""

    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        c = self.encoder.conv_in
        self.encoder.conv_in = nn.Conv2d(6, c.out_channels, c.kernel_size, padding=c.padding)

    @classmethod
    def from_vqgan(cls, vq: VQGAN) -> "RestEncoder":
        """A RestEncoder equal to E(x_id): the VQGAN encoder's weights, zero weights on the x_d channels."""
        rest = cls(vq.config)
        state = {k: v.clone() for k, v in vq.encoder.state_dict().items()}
        w = state["conv_in.weight"]
        state["conv_in.weight"] = torch.cat([torch.zeros_like(w), w], 1)
        rest.encoder.load_state_dict(state)
        return rest

    def forward(self, x_d: Tensor, x_id: Tensor) -> Tensor:
        return self.encoder(torch.cat([x_d, x_id], 1)).float()


def load_rest_encoder(folder: str | Path, device: str | torch.device = "cpu") -> RestEncoder:
    """A frozen RestEncoder (eval mode) from a checkpoint folder of kind ``"rest_encoder"``."""
    cfg, _ = read_config(folder, "rest_encoder", VQGANConfig)
    return load_weights(folder, RestEncoder(cfg)).to(device).eval().requires_grad_(False)
