"""modelyard router."""
