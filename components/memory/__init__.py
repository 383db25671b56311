"""Memory components: key-value stores read (and written) by the residual stream."""
