"""SAM 3 (promptable concept segmentation) through transformers, with one shared ViT."""

from models.sam3.checkpoint import CheckpointError, KeyReport, Sam3Models, load_sam3
from models.sam3.predictor import ImageEmbedding, Sam3Predictor

__all__ = ["CheckpointError", "ImageEmbedding", "KeyReport", "Sam3Models", "Sam3Predictor", "load_sam3"]
