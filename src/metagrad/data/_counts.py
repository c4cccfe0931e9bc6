"""How ``metagrad data info`` counts a split's images, for classes of equal or different sizes."""

from __future__ import annotations

from collections.abc import Sequence


def split_counts(class_sizes: Sequence[int]) -> dict[str, int]:
    """``{"classes", "images_per_class"}`` when every class has as many images, else ``{"classes",
    "images", "min_images_per_class", "max_images_per_class"}``."""
    sizes = list(class_sizes)
    if len(set(sizes)) <= 1:
        return {"classes": len(sizes), "images_per_class": sizes[0] if sizes else 0}
    return {"classes": len(sizes), "images": sum(sizes), "min_images_per_class": min(sizes),
            "max_images_per_class": max(sizes)}
