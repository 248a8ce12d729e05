"""Backend-neutral export checks: the logits of exported Hugging Face models and adapters against the
trained model's (parity), and their held-out loss (verify). Each backend's own formats live with it."""
