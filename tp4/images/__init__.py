"""Image and volume files, their fit to the network, real datasets, figures."""
