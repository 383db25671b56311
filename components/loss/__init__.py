"""Loss components (``loss.*``): auxiliary loss terms computed inside the graph, as unweighted
scalar output ports that a blueprint's ``losses:`` section weights."""
