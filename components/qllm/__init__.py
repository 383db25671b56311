"""QLLM (``sschepis/qllm`` at ``6a5cb1a``) components: the prime Hilbert embedding, the HCW
memory and the pre-manifest resonance head. See ``../shared/reference/SEEDS.md`` section 4."""
