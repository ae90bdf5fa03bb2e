"""Assets for the offline profile: the bundled synthetic dataset and the tiny chat model."""
