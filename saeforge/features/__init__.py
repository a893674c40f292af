"""Understanding features: the feature store, harvesting, prompt inspection, contrastive discovery, autointerp."""
