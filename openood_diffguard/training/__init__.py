"""Training of the models the detectors need: class-conditional pixel UNet, LFDN, a demo classifier."""
