"""``openood-diffguard demo``: every part of the product on real images (scikit-learn digits), CPU only."""
