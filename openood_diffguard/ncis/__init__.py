"""NCIS (Doorenbos et al., "Non-linear Class-wise Invariant Sampling"): outliers synthesised in a diffusion
model's conditioning-embedding space, used to train the classifier with an energy regulariser; the test
score is the energy (OpenOOD ``ebo``).

Stages (each reusable on its own, ``openood-diffguard ncis <stage>`` on the command line):
``learn_embeddings`` (embed) -> ``num_invariants`` + ``fit_cvpn`` (fit) -> ``ClassGaussians`` boundary
samples mapped back with the cVPN inverse (sample) -> ``generate_outliers`` (generate) ->
``train_with_outliers`` or OpenOOD's ``train_oe`` pipeline with trainer ``ncis`` (train).
"""
from .backends import EmbeddingBackend, PixelUNetBackend, StableDiffusionBackend, patched_row, substitute_rows
from .cvpn import CVPN, ConditionalCoupling, Orthogonal, fit_cvpn, invariant_mse, num_invariants
from .embed import embed_batch, learn_embeddings
from .generate import generate_outliers, load_outlier_images, write_openood_files
from .sampler import ClassGaussians
from .train import EnergyHead, energy_regularised_loss, energy_scores, ood_transform, random_interpolation_resize, train_with_outliers

__all__ = ["EmbeddingBackend", "PixelUNetBackend", "StableDiffusionBackend", "patched_row", "substitute_rows", "CVPN",
           "ConditionalCoupling", "Orthogonal", "fit_cvpn", "invariant_mse", "num_invariants", "embed_batch",
           "learn_embeddings", "generate_outliers", "load_outlier_images", "write_openood_files", "ClassGaussians",
           "EnergyHead", "energy_regularised_loss", "energy_scores", "ood_transform", "random_interpolation_resize",
           "train_with_outliers"]
