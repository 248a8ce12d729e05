"""Lightning callbacks shared by both backends: step metrics, MFU, W&B identity, export."""
