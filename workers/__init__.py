"""modelyard workers."""
