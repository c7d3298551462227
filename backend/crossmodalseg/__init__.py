"""CrossModalSeg: cross-modality medical image segmentation with few labels."""

__version__ = "0.1.0"
