"""MAE (He et al. 2021, "Masked Autoencoders Are Scalable Vision Learners"): hide a random 75% of
an image's patches, encode only the visible ones with the ViT, and let a small transformer decoder
predict the hidden patches' pixels from the encoded patches and a shared mask token; the loss is
the mean squared error on the masked patches only (Sec. 3), against per-patch normalised pixels
(``norm_pix_loss``, Sec. 3 and Table 1c). lightly's ``MaskedVisionTransformerTorchvision`` runs the
masked encoder over the backbone's own weights and ``MAEDecoder`` is the decoder.

One view per image: there is no second view to compare, so ``forward`` reads ``views[0]`` alone
(the pipeline's second view is not used)."""

from __future__ import annotations

import torch
from lightly.models.modules import MAEDecoder, MaskedVisionTransformerTorchvision
from lightly.models.utils import get_at_index, patchify, random_token_mask, repeat_token, set_at_index
from pydantic import Field, model_validator
from torch import nn

from ssl_pretrain.methods.base import Method, MethodSettings

NAME = "mae"
SUMMARY = "reconstruct the pixels of masked patches from the visible ones (ViT only)"
BACKBONES = ("vit-tiny", "vit-small")
"""The backbones MAE trains: it masks patch tokens, so only the ViTs (``config`` refuses others)."""


class Settings(MethodSettings):
    mask_ratio: float = Field(0.75, gt=0, lt=1)
    """Fraction of patches hidden from the encoder: 75% is the paper's best (Fig. 5)."""
    decoder_dim: int = Field(192, ge=1)
    decoder_depth: int = Field(4, ge=1)
    decoder_heads: int = Field(3, ge=1)
    """A decoder much lighter than the paper's ImageNet one (512-d, 8 blocks, 16 heads, Table 1a-b),
    sized for small images and a ViT-Tiny: 192-d, 4 blocks, 3 heads, as the CIFAR-10 MAE of
    IcarusWizard/MAE (ViT-T/2 encoder). The paper finds 1 block enough for fine-tuning, more
    better for linear probing (Table 1a)."""
    norm_pix_loss: bool = True
    """Targets are each patch's pixels normalised by that patch's mean and standard deviation
    (the paper's default: better representations, Table 1c)."""

    @model_validator(mode="after")
    def _heads_divide_the_width(self) -> "Settings":
        if self.decoder_dim % self.decoder_heads:
            raise ValueError(f"decoder_dim {self.decoder_dim} is not divisible by decoder_heads {self.decoder_heads}")
        return self


class MAE(Method):
    """``backbone`` is the plain ``ViTBackbone`` (class token out, what is exported); ``encoder``
    wraps the same module for masked encoding, so the two share every weight."""

    def __init__(self, backbone: nn.Module, feature_dim: int, settings: Settings, gather_distributed: bool = False):
        super().__init__(backbone, feature_dim)
        # MAE's initialisation of the ViT (Xavier linear layers, fixed 2-D sine-cosine position
        # embeddings, Sec. A.1 of the paper), done by lightly on the backbone itself
        self.encoder = MaskedVisionTransformerTorchvision(vit=backbone)
        # the encoder's own mask token serves masking *inside* the encoder (SimMIM-style), which
        # MAE never does: frozen, so DDP does not wait for a gradient that never comes
        self.encoder.mask_token.requires_grad_(False)
        self.patch_size = backbone.patch_size
        self.decoder = MAEDecoder(
            seq_length=backbone.seq_length, num_layers=settings.decoder_depth, num_heads=settings.decoder_heads,
            embed_input_dim=feature_dim, hidden_dim=settings.decoder_dim, mlp_dim=4 * settings.decoder_dim,
            out_dim=3 * self.patch_size ** 2)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, settings.decoder_dim))
        nn.init.normal_(self.mask_token, std=0.02)  # the authors' code
        self.settings = settings
        # per-image mean squared errors: nothing batch-wide, so nothing to gather across ranks

    def forward(self, views: list[torch.Tensor]) -> torch.Tensor:
        """Shape: ``views[0]`` ``(B, 3, S, S)``, S the size the ViT was built for -> the scalar
        loss; the other views are ignored."""
        images = views[0]
        tokens = self.encoder.sequence_length  # class token + patches
        if self.backbone.patch_grid(images) != (self.backbone.image_size // self.patch_size,) * 2:
            raise ValueError(f"MAE trains at the ViT's own size, {self.backbone.image_size} px, "
                             f"not {tuple(images.shape[-2:])}")
        # the class token is always kept; a random mask_ratio of the patches is dropped
        keep, masked = random_token_mask((len(images), tokens), self.settings.mask_ratio, device=images.device)
        encoded = self.encoder.encode(images, idx_keep=keep)  # (B, 1 + visible, feature_dim)
        predictions = self.decode(encoded, keep, masked)  # (B, masked, 3 p^2)
        targets = get_at_index(patchify(images, self.patch_size), masked - 1)  # patch i is token i + 1
        if self.settings.norm_pix_loss:
            targets = normalise_patches(targets)
        return nn.functional.mse_loss(predictions.float(), targets.float())

    def decode(self, encoded: torch.Tensor, keep: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
        """The full sequence (encoded visible tokens in their places, the mask token elsewhere)
        through the decoder; the pixels predicted for the masked tokens.

        Shape: ``encoded`` ``(B, K, feature_dim)`` at ``keep`` ``(B, K)`` -> ``(B, M, 3 p^2)`` at
        ``masked`` ``(B, M)``.
        """
        embedded = self.decoder.embed(encoded)
        sequence = repeat_token(self.mask_token, (len(encoded), self.encoder.sequence_length))
        sequence = set_at_index(sequence, keep, embedded.type_as(sequence))
        return self.decoder.predict(get_at_index(self.decoder.decode(sequence), masked))


def normalise_patches(patches: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Each patch's pixels less their mean, over their standard deviation (unbiased variance plus
    ``eps``, as the authors' ``norm_pix_loss``). Shape: ``(B, N, P)`` -> ``(B, N, P)``."""
    mean = patches.mean(dim=-1, keepdim=True)
    variance = patches.var(dim=-1, keepdim=True)
    return (patches - mean) / (variance + eps).sqrt()


build = MAE
