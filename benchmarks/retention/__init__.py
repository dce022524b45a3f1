"""Learning and forgetting: what a fine-tune learns and what it keeps."""
