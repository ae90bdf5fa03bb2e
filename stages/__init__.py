"""The pipeline's stages (one module per DVC stage) and the small modules they share."""
