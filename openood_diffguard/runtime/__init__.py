"""Infrastructure shared by every detector, apart from the method pipeline: the per-sample score cache and
fingerprints (``cache``), torchrun sharding (``distributed``), out-of-memory-safe batching (``batching``),
device choice (``devices``), the detector / postprocessor name registry (``registry``) and import-time
compatibility fixes (``compat``)."""
