"""Seed data: the built-in seed, Open Assistant recipes (IFT/EFT), AlpacaEval prompts; SFT/DPO batches."""
