"""What a trained run is: its files, its card, loading it and predicting with it."""
