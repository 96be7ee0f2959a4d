"""Converters from the papers' original checkpoints (ADM, LDM cin256-v2, DiffNB) to diffusers directories."""
