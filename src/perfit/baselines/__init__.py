"""The methods PerFit is compared with (`perfit compare`): no-model and retrieval baselines, and LoRA (HF peft)."""
