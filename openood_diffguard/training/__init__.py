"""Training of the models the detectors need (classifier for demos, diffusion UNet, LFDN)."""
