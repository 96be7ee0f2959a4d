"""Step 'compare': how much the synthesis still resembles the reference (perceptual / classifier space)."""
from .dists import PerceptualDistance, psnr, select_features, weights_dir
from .logits import EMBEDDING_SIMILARITIES, classifier_embedding, embedding_similarities

__all__ = ["PerceptualDistance", "psnr", "select_features", "weights_dir", "EMBEDDING_SIMILARITIES",
           "classifier_embedding", "embedding_similarities"]
