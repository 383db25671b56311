"""Layer components (``layer.*``): whole residual layers that are not a single mixer or FFN."""
