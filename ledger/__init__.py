"""modelyard ledger."""
