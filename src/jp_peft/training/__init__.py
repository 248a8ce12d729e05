"""What both backends' training shares: callbacks, FLOP accounting, W&B run identity, the interrupt contract."""
