"""Topology components: ``topology.processor`` (Holographic LLM's EfficientTopologyProcessor)."""
