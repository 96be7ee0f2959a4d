"""Training of the models the detectors need (LFDN feature denoiser, class-conditional pixel UNet)."""
