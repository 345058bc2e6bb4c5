"""Training: one Trainer loop; objectives as small pure functions; stage entry points."""
