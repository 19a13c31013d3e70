"""Per-site LoRA adapters: train on a site's text on CPU, evaluate against the base, export.

`slmops adapt BASE --data FILE --out DIR` trains a PEFT LoRA adapter (train.py), measures what it
bought and what it cost (evaluate.py: site perplexity on a held-out split vs the base, KLD to the
base on general text so forgetting is visible), and exports it for llama.cpp as a GGUF LoRA
(export.py). run.py ties the steps into one atomic output folder with a lineage card.
"""
