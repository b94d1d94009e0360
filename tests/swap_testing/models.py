"""Tiny timm models built in the test (no download)."""

from __future__ import annotations


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
