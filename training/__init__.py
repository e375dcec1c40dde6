"""`deltaserve train`: train task deltas (mask, PASTA, DSEE, LoRA) or a full fine-tune yardstick.

The trainer's forward pass is the spec's formula itself (see `training.model`), so what is
exported is exactly what was evaluated.
"""
