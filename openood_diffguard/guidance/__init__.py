"""Guidance: how the synthesis is pulled toward the predicted label (classifier / classifier-free, masks)."""
from .eps import ClassifierFreeGuidance, ClassifierGuidance, ClipConsistent, log_prob_grad, model_eps

__all__ = ["ClassifierFreeGuidance", "ClassifierGuidance", "ClipConsistent", "log_prob_grad", "model_eps"]
