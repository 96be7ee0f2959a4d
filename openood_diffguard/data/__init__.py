"""Small real datasets in OpenOOD's batch format (dicts with data / label / index / image_name)."""
from .digits import DigitsOpenSet

__all__ = ["DigitsOpenSet"]
