"""``l2l.vision.transforms``: task transforms for image datasets."""

from metagrad.compat.learn2learn.data.rotation import RandomClassRotation

__all__ = ["RandomClassRotation"]
