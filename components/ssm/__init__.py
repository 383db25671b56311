"""State-space and convolutional sequence mixers (``ssm.*``)."""
