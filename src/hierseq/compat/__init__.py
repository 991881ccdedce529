"""The seeds' own APIs as thin adapters over hierseq's parts (import paths changed, code working).

``compat.tree.Decoder``, ``compat.hamt.HAMTConfig`` / ``HAMTModel``, ``compat.maha.MAHATransformer`` /
``MAHABlock``; HAMA's and HiSS's seed classes live with their models (``models.hama.HAMA``,
``models.hiss.LowLevelMamba`` / ``HSSS``).
"""
