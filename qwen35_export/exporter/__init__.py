"""torch.export capture of the model, one graph per layer kind and phase, with weights and state as inputs."""
