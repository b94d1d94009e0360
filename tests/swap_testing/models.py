"""Tiny timm models built in the test (no download)."""

from __future__ import annotations

# timm_swap.train's flags for a tiny ViT on the 8x8 digit folders (``data.write_digit_folders``).
TINY_VIT_FLAGS = ["--model", "vit_tiny_patch16_224", "--model-kwargs", "patch_size=2", "embed_dim=64", "depth=2",
                  "num_heads=4", "--img-size", "8", "--in-chans", "1", "--mean", "0.5", "--std", "0.5", "--crop-pct",
                  "1.0", "-j", "0", "--no-progress", "--seed", "0", "--log-interval", "0"]
# The same for a tiny distilled DeiT: two classifier heads (``head``, ``head_dist``) whose logits it averages.
TINY_DEIT_FLAGS = ["--model", "deit_tiny_distilled_patch16_224", *TINY_VIT_FLAGS[2:]]


def tiny_vit(num_classes: int = 10, depth: int = 2):
    import timm

    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=8, patch_size=2, in_chans=1,
        embed_dim=32, depth=depth, num_heads=2, num_classes=num_classes,
    )


def tiny_swin(num_classes: int = 10):
    import timm

    return timm.create_model(
        "swin_tiny_patch4_window7_224", pretrained=False, img_size=32, patch_size=4, in_chans=1,
        window_size=4, embed_dim=16, depths=(2, 2), num_heads=(1, 2), num_classes=num_classes,
    )
