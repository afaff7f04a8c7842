"""Worker side of the prediction channel."""
