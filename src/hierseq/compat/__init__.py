"""The seeds' own APIs as thin adapters over hierseq's parts (import paths changed, code working).

``compat.tree.Decoder``, ``compat.hamt.HAMTConfig`` / ``HAMTModel``, ``compat.maha.MAHATransformer`` /
``MAHABlock``, ``compat.hiss.LowLevelMamba`` / ``HSSS``. HAMA's seed class is the registered model
itself (``models.hama.HAMA``).
"""
