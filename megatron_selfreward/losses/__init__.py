"""Training losses as small pure functions (DPO variants)."""
