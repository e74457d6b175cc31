"""Policy models.

Shape letters used in names and einsums: B batch, L length, S key/cache length, E model width,
N query heads, K key/value heads, H head dim, F MLP width, V vocab, P vision patches, D ViT width,
M merged image tokens.
"""
