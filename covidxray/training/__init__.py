"""Images -> tensors -> a model -> a trained run folder."""
