"""Quantized moment storage, the implementation of :mod:`adam_jax.quantization`.

One concept per module: ``dynamic_map`` (the 8-bit number format and its codec), ``blocks``
(the block layout of a quantized tensor and its sharding), ``eight_bit`` (the 8-bit moment
storage), ``four_bit`` (the 4-bit maps, codec, stored forms and storages), ``placement`` (the
shardings of stored moments). Another format or storage goes in a module of its own next to them.
"""
