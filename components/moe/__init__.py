"""Mixture-of-experts components: ``moe.category`` (Holographic top-1) and ``moe.topk``."""
