"""Loading and running engine directories: state pools, prefill, decode, CUDA graphs, sampling."""
