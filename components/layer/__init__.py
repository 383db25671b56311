"""Layers from the QLLM (sschepis/qllm) HEAD architecture (``layer.*``)."""
