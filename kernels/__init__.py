"""Triton kernels of tinyavl: `sparse_attention` holds the index-list decode attention of A-VL."""
