"""The runtime (``physlm_graph.runtime``): data, training, checkpoints, generation, evaluation."""
