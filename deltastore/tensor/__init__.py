"""Pure tensor math: bit packing, the counter-based PRNG, compressors and DBMS.

Nothing in this package touches storage; it maps tensors to tensors (and to small dicts of
scalars), on whatever device the inputs live.
"""
